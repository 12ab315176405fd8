"""The Makefile's targets install only the extras they need (`make -n`, nothing is run)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _installs(target: str, venv: Path) -> list[set[str]]:
    """The extras each `pip install -e '.[...]'` that `make target` would run installs."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [set(m.split(",")) for m in re.findall(r"pip install -q -e '\.\[([^\]]*)\]'", out)]


def test_run_installs_the_package_and_its_embedded_database_only(tmp_path: Path) -> None:
    assert _installs("run", tmp_path / "venv") == [{"embedded"}]


@pytest.mark.parametrize(
    ("target", "needs"),
    [
        ("test", {"test", "embedded"}),
        ("lint", {"lint"}),
        ("bench", {"test", "embedded", "loadtest"}),
        ("soak", {"test", "embedded", "loadtest"}),
        ("stress-verify", {"test", "embedded", "loadtest"}),
    ],
)
def test_each_target_installs_its_own_extras(tmp_path: Path, target: str, needs: set[str]) -> None:
    installs = _installs(target, tmp_path / "venv")
    assert installs, f"make {target} installs nothing"
    assert set().union(*installs) == needs


def test_the_stamps_compose(tmp_path: Path) -> None:
    """After `make run`, `make test` still installs the test tools (one stamp per extra set)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-run").touch()
    assert _installs("run", venv) == []
    assert _installs("test", venv) == [{"test", "embedded"}]


def test_stress_verify_runs_the_ci_safe_mode_by_default(tmp_path: Path) -> None:
    # .ci/run calls `make stress-verify` with no MODE: it must run the CI-safe harness.
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "stress-verify", f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"-m loadtest\.stress --mode verify\b", out), out
