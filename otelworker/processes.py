"""``python -m otelworker serve --processes N`` (``PROCESSES``): N service processes.

Each child is a whole service (its own event loop, ingress, gRPC server and pipeline) on
the one database, listening on the same ports with ``SO_REUSEPORT``, so the kernel spreads
connections over them. The parent owns nothing but the children: it resolves the
database once (an embedded PostgreSQL is started here, not N times), forwards SIGTERM and
SIGINT to every child, and waits for each to drain in its own order (readiness, in-flight
requests and their commits, the pipeline). A child that exits on its own stops the others
and the parent exits 1, so an orchestrator restarts the instance whole.

What holds across processes: the staging backlog cap (each process recounts the shared
queue every BACKLOG_REFRESH_INTERVAL_MS; between counts it can overshoot by what the others
staged, as with several replicas); claims (FOR UPDATE SKIP LOCKED). What does not:
``/metrics`` answers for the process that accepted the scrape's connection
(docs/operations.md says how to read it).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from otelworker.logs import log_event
from otelworker.settings import Settings

# Set in each child's environment: bind with SO_REUSEPORT, beside its siblings.
CHILD_ENV = "OTELWORKER_PROCESS_INDEX"


def is_child() -> bool:
    return CHILD_ENV in os.environ


class _Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self.stopping = True
        for child in self.procs:
            if child.poll() is None:
                child.send_signal(signum)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop(signum)


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the parent dies (Linux), so a parent
    killed outright never leaves service processes behind, still polling the database."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def serve_processes(settings: Settings, processes: int) -> int:
    env = dict(os.environ)
    env["OTEL_PROCESSES"] = "1"
    env["OTEL_GRPC_ENABLED"] = "false" if settings.grpc_enabled is False else "true"
    embedded = None
    if settings.dsn is None:
        from otelworker.devdb import EmbeddedPostgres

        embedded = EmbeddedPostgres(settings.embedded_db_dir)
        env["OTEL_DATABASE_URL"] = embedded.attach()
    children = _Children()
    handlers = {s: signal.signal(s, children.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(processes):
            children.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "otelworker", "serve"],
                    env={**env, CHILD_ENV: str(index)},
                    preexec_fn=_stop_with_parent,
                )
            )
        log_event(
            "processes_started",
            "otelworker started its service processes",
            reason="startup",
            processes=processes,
            pids=[c.pid for c in children.procs],
        )
        return _wait(children, settings)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for child in children.procs:
            if child.poll() is None:
                child.kill()
                child.wait()
        if embedded is not None:
            embedded.detach()


def _wait(children: _Children, settings: Settings) -> int:
    """Until every child has exited; one that exits on its own stops the others."""
    # Readiness drain, then each of the ordered drain's bounded steps (the requests read
    # when the graceful timeout ends wait for their commits, at most twice the commit
    # timeout: otelworker/front/server.py), and a margin.
    budget = (
        settings.readiness_drain_delay_s
        + 4 * settings.shutdown_grace_s
        + 2 * settings.staging_commit_timeout_s
        + 10
    )
    deadline: float | None = None
    code = 0
    seen: set[int] = set()
    while True:
        running = 0
        for child in children.procs:
            if child.poll() is None:
                running += 1
            elif child.pid not in seen:
                seen.add(child.pid)
                if child.returncode != 0 or not children.stopping:
                    code = 1
                    log_event(
                        "process_exited",
                        "a service process exited; stopping the others",
                        reason=f"exit_{child.returncode}",
                        level=logging.ERROR,
                        pid=child.pid,
                    )
                    children.stop()
        if not running:
            return code
        if children.stopping and deadline is None:
            deadline = time.monotonic() + budget
        if deadline is not None and time.monotonic() > deadline:
            for child in children.procs:
                if child.poll() is None:
                    log_event(
                        "process_killed",
                        "a service process outlived the shutdown budget",
                        reason="shutdown_budget",
                        level=logging.ERROR,
                        pid=child.pid,
                    )
                    child.kill()
            code = 1
        time.sleep(0.1)  # a supervisor's poll of its children, not a wait for a result
