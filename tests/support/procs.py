"""The service as an operator runs it: ``python -m hypercorn otelworker.app:app`` in a subprocess.

    proc = run_service({"DATABASE_URL": dsn, ...})
    proc.wait_ready()
    ... proc.url ...
    proc.terminate(30)           # SIGTERM, then wait for a clean exit
    proc.events("claims_released")

Processes still running when the interpreter exits are killed and their directories removed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
_live: set[ServiceProcess] = set()
_workdirs: list[Path] = []


class ServiceProcess:
    def __init__(self, popen: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.popen = popen
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / "service.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def wait_ready(self, timeout: float = 60) -> None:
        """Poll GET /readyz until it answers 200; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while True:
                if self.popen.poll() is not None:
                    raise RuntimeError(
                        f"service exited with {self.popen.returncode} before it was ready:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service not ready within {timeout} s:\n{self.log_tail()}")
                time.sleep(0.05)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit status; SIGKILL and raise if it takes too long."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # nothing may outlive the service
            return code
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"service did not exit within {timeout} s of SIGTERM:\n{self.log_tail()}"
            ) from None
        finally:
            _live.discard(self)

    def kill(self) -> None:
        """SIGKILL (a crash) of hypercorn and its worker process, and reap.

        hypercorn serves from a spawned worker process: killing only the parent would
        leave that worker running under init, still polling its database.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        _live.discard(self)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log records so far (other lines skipped)."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def events(self, event_name: str) -> list[dict[str, Any]]:
        return [r for r in self.log_lines() if r.get("event") == event_name]

    def __repr__(self) -> str:
        return f"ServiceProcess(pid={self.pid}, url={self.url}, returncode={self.returncode})"


def run_service(
    env: dict[str, str], *, port: int | None = None, entry: str = "hypercorn"
) -> ServiceProcess:
    """Start the service on 127.0.0.1:``port`` (a free one if None), ``env`` over os.environ:
    ``hypercorn otelworker.app:app``, or with ``entry="serve"`` ``python -m otelworker
    serve`` (HTTP only unless ``env`` says ``GRPC_ENABLED``).

    It runs in its own temporary directory (no stray .env; an embedded database, if one
    is asked for, lands there) with stdout and stderr both in ``service.log``.
    """
    port = port if port is not None else free_port()
    workdir = Path(tempfile.mkdtemp(prefix="otelworker-service-"))
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "hypercorn", "otelworker.app:app", "--bind", f"127.0.0.1:{port}"]
    if entry == "serve":
        argv = [sys.executable, "-m", "otelworker", "serve"]
        env = {"GRPC_ENABLED": "false", **env, "HOST": "127.0.0.1", "PORT": str(port)}
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath, **env}
    with open(workdir / "service.log", "wb") as log:
        popen = subprocess.Popen(
            argv,
            env=full_env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: kill() reaches the worker too
        )
    proc = ServiceProcess(popen, port, workdir)
    _live.add(proc)
    _workdirs.append(workdir)
    return proc


@atexit.register
def _clean_up() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()
    for workdir in _workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
