"""``make run``'s embedded database shared with the commands a newcomer types next.

The service runs on the embedded default (``DATABASE_URL`` unset); every admin and archive
command is run from another process on the same data directory, and the service must stay
ready and keep staging. A ``kill -9`` of the service leaves the cluster running, and the
next ``serve`` comes up on the same data with nothing lost.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from otelworker.devdb import EmbeddedPostgres
from tests.acceptance.test_serve_cli import Served, _env, _free_port, _one_span, _run, fetchval

pytestmark = pytest.mark.acceptance

COMMANDS = [
    ["migrate"],
    ["batches"],
    ["batches", "--json"],
    ["requeue-dead"],
    ["gc-orphans", "--older-than-s", "3600", "--dry-run"],
    ["prune", "--older-than", "30d", "--dry-run"],
    ["replay", "--to", "http://127.0.0.1:9", "--dry-run"],
]


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's basetemp: a concurrent pytest session resets its mode to 0700,
    # and the server (as the unprivileged ``pgserver`` user when we are root) must reach it.
    root = Path(tempfile.mkdtemp(prefix="otelworker-embedded-serve-"))
    yield root
    EmbeddedPostgres(root / "pgdata").stop("immediate")  # whatever a failed test left
    shutil.rmtree(root, ignore_errors=True)


def _settings(workdir: Path, port: int) -> dict[str, str]:
    return {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "GRPC_PORT": str(_free_port()),
        "EMBEDDED_DB_DIR": str(workdir / "pgdata"),
        "LOCAL_OBJECT_DIR": str(workdir / "objects"),
        "SHUTDOWN_GRACE_S": "5",
    }


def _serve(workdir: Path, settings: dict[str, str], n: int) -> Served:
    stdout, stderr = workdir / f"serve-{n}.out", workdir / f"serve-{n}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "otelworker", "serve"],
            env=_env(**settings),
            cwd=workdir,
            stdout=out,
            stderr=err,
        )
    return Served(proc, f"http://127.0.0.1:{settings['PORT']}", stdout, stderr)


def _accepts_and_is_ready(served: Served, dsn: str) -> str:
    with httpx.Client() as client:
        ready = client.get(f"{served.url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    result, span_id = _one_span(f"{served.url}/v1/traces")
    assert result.name == "SUCCESS"
    return span_id


def _staged_or_exported(dsn: str) -> int:
    return int(
        fetchval(
            dsn,
            "SELECT (SELECT count(*) FROM ingestion_queue)"
            " + (SELECT coalesce(sum(item_count), 0) FROM export_batches)",
        )
    )


def _stop(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0, served.stderr.read_text()


def test_commands_beside_serve_leave_its_database_running(workdir: Path) -> None:
    settings = _settings(workdir, _free_port())
    served = _serve(workdir, settings, 0)
    try:
        served.wait_ready(timeout=120)
        dsn = EmbeddedPostgres(workdir / "pgdata").dsn
        _accepts_and_is_ready(served, dsn)
        for n, command in enumerate(COMMANDS, start=1):
            done = _run(command, _env(**settings), workdir, timeout=120)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            # The service still has its database: ready, and a request is staged.
            _accepts_and_is_ready(served, dsn)
            assert _staged_or_exported(dsn) == n + 1, command
        assert "embedded_database_attached" in done.stderr
    finally:
        if served.proc.poll() is None:
            _stop(served)
    # The service was the last user out and had started the cluster: it stopped it.
    assert not EmbeddedPostgres(workdir / "pgdata").running
    assert "embedded_database_stopped" in served.stdout.read_text()


def test_kill_9_then_serve_again_comes_up_on_the_same_data(workdir: Path) -> None:
    settings = _settings(workdir, _free_port())
    first = _serve(workdir, settings, 0)
    first.wait_ready(timeout=120)
    cluster = EmbeddedPostgres(workdir / "pgdata")
    dsn = cluster.dsn
    acknowledged = [_accepts_and_is_ready(first, dsn) for _ in range(3)]
    first.proc.kill()
    first.proc.wait(10)
    # The cluster outlives the killed service (its postmaster runs in its own session).
    assert cluster.running

    settings["PORT"] = str(_free_port())
    second = _serve(workdir, settings, 1)
    try:
        second.wait_ready(timeout=120)
        assert "embedded_database_attached" in second.stdout.read_text()
        deadline = time.monotonic() + 30
        while _staged_or_exported(dsn) < len(acknowledged):
            assert time.monotonic() < deadline, "acknowledged spans missing after restart"
            time.sleep(0.1)
        _accepts_and_is_ready(second, dsn)
    finally:
        if second.proc.poll() is None:
            _stop(second)
    assert not cluster.running


def test_help_reaches_the_user_without_a_database(workdir: Path) -> None:
    # --help never starts (or stops) a cluster.
    done = _run(["batches", "--help"], _env(**_settings(workdir, 1)), workdir)
    assert done.returncode == 0
    assert not (workdir / "pgdata").exists()
