"""nox sessions: thin wrappers over pytest, ruff/mypy and the stress harness."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test,embedded]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("-e", ".[lint,test,loadtest]")
    paths = ["otelworker", "tests", "loadtest", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    session.run("mypy")
    session.run("hadolint", "Dockerfile")


@nox.session(python="3.11")
def stress(session: nox.Session) -> None:
    """Same as `make stress-verify`; the mode from posargs (`-- stress`) or $MODE."""
    session.install("-e", ".[test,embedded,loadtest]")
    mode = session.posargs[0] if session.posargs else os.environ.get("MODE", "verify")
    session.run("python", "-m", "loadtest.stress", "--mode", mode, *session.posargs[1:])


@nox.session(python="3.11")
def fuzz(session: nox.Session) -> None:
    """The ingress fuzz suite, larger: OTELWORKER_FUZZ_EXAMPLES (default here 3000)."""
    session.install("-e", ".[test,embedded]")
    examples = os.environ.get("OTELWORKER_FUZZ_EXAMPLES", "3000")
    session.run("pytest", "tests/fuzz", env={"OTELWORKER_FUZZ_EXAMPLES": examples})
