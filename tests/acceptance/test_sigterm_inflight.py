"""SIGTERM with requests in flight: every request the server had accepted gets an answer.

A real server process (``hypercorn otelworker.app:app``, ``hypercorn -w 2 ...`` and
``python -m otelworker serve``) on a real PostgreSQL, ROLE=ingress. Before the signal:

- steady clients post on kept-alive connections, one request after another, until a lock
  on ``ingestion_queue`` (held by the test) stalls the commits: each then has a request
  *being committed*;
- slow clients have sent half a body: their requests are *being read*; the rest follows
  shortly after the signal (within hypercorn's graceful timeout);
- stalled clients have sent half a body and send nothing more: the server must give up on
  them, and say so.

"Accepted" is exact: every request is sent with ``Expect: 100-continue`` and its body only
after the ``100 Continue``, which hypercorn sends once it has parsed the request head and
handed the request to the app. An accepted request must end in an HTTP answer, never in a
connection closed unanswered: a 200 (then its span is in ``ingestion_queue``) or a 503
with ``Retry-After``. The lock is released once every stalled request has its outcome,
so the commits outlast hypercorn's graceful timeout (3 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.support import free_port
from tests.support.objects import span_request
from tests.support.payloads import unstage

pytestmark = pytest.mark.acceptance

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_S = 90  # deadlines, not waits: generous for a loaded CI machine
DEADLINE_S = 60
STEADY = 6  # clients posting back to back on kept-alive connections
SLOW = 4  # half a body at the signal, the rest shortly after
STALLED = 3  # half a body at the signal, and nothing more
SLOW_PAUSE_S = 0.5  # the slow clients' pause between their two halves, after the signal


@dataclass
class Outcome:
    kind: str
    span_id: bytes
    accepted: bool = False  # the server sent 100 Continue: it has the request
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # how it ended without an answer
    ended_at: float = 0.0  # time.monotonic()
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def final(self) -> bool:
        return self.done.is_set()

    def __repr__(self) -> str:
        state = self.status if self.status is not None else self.error
        return f"<{self.kind} {self.span_id.hex()} accepted={self.accepted} {state}>"


class Connection:
    """One HTTP/1.1 connection; ``post`` sends with Expect: 100-continue, reads the answer
    while it sends (as Go's and the Collector's clients do)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.open = True

    @classmethod
    async def open_to(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def close(self) -> None:
        self.open = False
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def _response(self, outcome: Outcome, continued: asyncio.Event) -> None:
        while True:
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if status == 100:
                outcome.accepted = True
                continued.set()
                continue
            await self.reader.readexactly(int(headers.get("content-length", "0")))
            outcome.status, outcome.headers = status, headers
            if headers.get("connection", "").lower() == "close":
                self.open = False
            return

    async def post(
        self,
        port: int,
        outcome: Outcome,
        body: bytes,
        *,
        first: int | None = None,
        rest: Callable[[], Awaitable[bool]] | None = None,
        on_accepted: Callable[[], None] | None = None,
    ) -> None:
        """Send the head; after 100 Continue, ``body[:first]``; then, once ``rest()``
        says so (True), the remainder. ``outcome`` is final when this returns."""
        head = (
            f"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/x-protobuf\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        continued = asyncio.Event()
        answer = asyncio.create_task(self._response(outcome, continued))
        try:
            self.writer.write(head)
            await self.writer.drain()
            accepted = asyncio.create_task(continued.wait())
            await asyncio.wait({answer, accepted}, return_when=asyncio.FIRST_COMPLETED)
            accepted.cancel()
            if continued.is_set() and not answer.done():
                if on_accepted is not None:
                    on_accepted()
                self.writer.write(body[:first])
                await self.writer.drain()
                if first is not None and rest is not None and await rest():
                    self.writer.write(body[first:])
                    await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            outcome.error = f"while sending: {type(exc).__name__}"  # the answer may follow
        try:
            async with asyncio.timeout(DEADLINE_S):
                await answer
            outcome.error = None
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            outcome.error = f"closed unanswered: {type(exc).__name__}"
            self.open = False
        except TimeoutError:
            outcome.error = f"no answer within {DEADLINE_S} s"
            self.open = False
        finally:
            answer.cancel()
            outcome.ended_at = time.monotonic()
            outcome.done.set()


def _env(database_url: str, **settings: str) -> dict[str, str]:
    """The calling environment without any otelworker setting, plus these."""
    from otelworker.settings import Settings, env_key

    keys = {env_key(n) for n in Settings.model_fields}
    keys |= {f"OTEL_{k}" for k in keys}
    env = {k: v for k, v in os.environ.items() if k.upper() not in keys}
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=pythonpath,
        DATABASE_URL=database_url,
        ROLE="ingress",
        LOG_AGGREGATION_WINDOW_S="0",
        STAGING_COMMIT_TIMEOUT_S="30",  # the test's lock, not a commit timeout, decides
        STAGING_MAX_BACKLOG="100000",
        DB_POOL_MIN_SIZE="1",
        GRPC_ENABLED="false",
    )
    env.update(settings)
    return env


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(f"http://127.0.0.1:{self.port}/readyz")
                    if response.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready within {READY_S} s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)  # a poll's interval

    async def wait_exit(self) -> int:
        deadline = time.monotonic() + DEADLINE_S
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"server still running {DEADLINE_S} s after SIGTERM")
            await asyncio.sleep(0.05)  # a poll's interval
        return self.proc.returncode


@contextlib.contextmanager
def server(argv: list[str], env: dict[str, str], port: int, workdir: Path) -> Iterator[Server]:
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group: its workers are ours to end
        )
    try:
        yield Server(proc, port, log)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def _lock_waiters(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def _staged_span_ids(dsn: str) -> Counter[bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT payload FROM ingestion_queue WHERE signal = 'traces'")
    finally:
        await conn.close()
    ids: Counter[bytes] = Counter()
    for row in rows:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(unstage(row["payload"]))
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                ids.update(span.span_id for span in ss.spans)
    return ids


async def _until(check: Callable[[], Awaitable[bool]], what: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.02)  # a poll's interval


@dataclass
class Result:
    outcomes: list[Outcome]
    code: int  # the server's exit status
    log: str
    signalled_at: float  # time.monotonic()
    exited_at: float


async def run_sigterm_scenario(
    database_url: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    workdir: Path,
    *,
    whole_group: bool,
) -> Result:
    """Requests in flight, SIGTERM (to the server's process, or its whole process group),
    and every request's outcome."""
    signalled_at = 0.0
    numbers = iter(range(1, 1_000_000))
    outcomes: list[Outcome] = []

    def new(kind: str) -> tuple[Outcome, bytes]:
        span_id = next(numbers).to_bytes(8, "big")
        outcome = Outcome(kind, span_id)
        outcomes.append(outcome)
        return outcome, span_request([span_id], service_name=f"sigterm-{kind}")

    signalled = asyncio.Event()
    stop_sending = asyncio.Event()
    stuck: set[int] = set()  # steady clients whose current request is accepted, unanswered

    async def steady(n: int) -> None:
        conn = await Connection.open_to(port)
        try:
            while not stop_sending.is_set() and conn.open:
                outcome, body = new("steady")
                await conn.post(port, outcome, body, on_accepted=lambda: stuck.add(n))
                stuck.discard(n)
        finally:
            await conn.close()

    async def slow_rest() -> bool:
        await signalled.wait()
        await asyncio.sleep(SLOW_PAUSE_S)  # the slow client's pause: it is still sending
        return True

    async def never() -> bool:
        return False

    async def partial(kind: str, rest: Callable[[], Awaitable[bool]]) -> None:
        conn = await Connection.open_to(port)
        try:
            outcome, body = new(kind)
            await conn.post(port, outcome, body, first=len(body) // 2, rest=rest)
        finally:
            await conn.close()

    with server(argv, env, port, workdir) as srv:
        await srv.wait_ready()
        tasks = [asyncio.create_task(steady(n)) for n in range(STEADY)]

        async def flowing() -> bool:
            return sum(o.status == 200 for o in outcomes) >= 5 * STEADY

        await _until(flowing, "steady load answered", DEADLINE_S)

        lock = await asyncpg.connect(database_url)
        try:
            # Commits stall on the lock: the steady clients' requests are being committed.
            tx = lock.transaction()
            await tx.start()
            await lock.execute("LOCK TABLE ingestion_queue IN EXCLUSIVE MODE")
            watch = await asyncpg.connect(database_url)
            try:

                async def committing() -> bool:
                    return len(stuck) == STEADY and await _lock_waiters(watch) > 0

                await _until(committing, "every steady client waiting on its commit", DEADLINE_S)
            finally:
                await watch.close()
            stop_sending.set()
            tasks += [asyncio.create_task(partial("slow", slow_rest)) for _ in range(SLOW)]
            tasks += [asyncio.create_task(partial("stalled", never)) for _ in range(STALLED)]

            async def all_accepted() -> bool:
                partials = [o for o in outcomes if o.kind != "steady"]
                return len(partials) == SLOW + STALLED and all(o.accepted for o in partials)

            await _until(all_accepted, "the slow and stalled requests accepted", DEADLINE_S)

            if whole_group:
                os.killpg(srv.proc.pid, signal.SIGTERM)  # as systemd's KillMode=control-group
            else:
                srv.proc.send_signal(signal.SIGTERM)  # as Kubernetes does: PID 1 only
            signalled_at = time.monotonic()
            signalled.set()

            # The commits outlast hypercorn's graceful timeout: the lock stays until the
            # server has given up on the stalled requests (or dropped them).
            stalled = [o for o in outcomes if o.kind == "stalled"]
            async with asyncio.timeout(DEADLINE_S):
                for o in stalled:
                    await o.done.wait()
            await tx.commit()
        finally:
            await lock.close()

        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*tasks)
        code = await srv.wait_exit()
        return Result(outcomes, code, srv.log_tail(), signalled_at, time.monotonic())


async def check(result: Result, database_url: str) -> None:
    outcomes, code, log = result.outcomes, result.code, result.log
    accepted = [o for o in outcomes if o.accepted]
    unanswered = [o for o in accepted if o.status is None]
    summary = Counter((o.kind, o.status or o.error) for o in outcomes)
    assert not unanswered, (
        f"{len(unanswered)} of {len(accepted)} accepted requests got no answer: {unanswered}\n"
        f"outcomes: {dict(summary)}\n{log}"
    )
    assert {o.status for o in accepted} <= {200, 503}, dict(summary)
    assert all("retry-after" in o.headers for o in accepted if o.status == 503), dict(summary)
    # The requests in flight at the signal: those being committed answer 200 after their
    # commit, those still being read at the end of the grace 503.
    assert all(o.status == 200 for o in accepted if o.kind in ("steady", "slow")), dict(summary)
    assert all(o.status == 503 for o in accepted if o.kind == "stalled"), dict(summary)

    staged = await _staged_span_ids(database_url)
    acked = [o.span_id for o in accepted if o.status == 200]
    missing = [s.hex() for s in acked if staged[s] == 0]
    assert not missing, f"{len(missing)} acknowledged spans not in ingestion_queue: {missing}"
    assert code == 0, f"exit status {code}\n{log}"


CASES = {
    # Kubernetes sends SIGTERM to PID 1: the hypercorn parent, which owns the signals.
    "hypercorn": (["-m", "hypercorn", "otelworker.app:app"], False, {}),
    # Both workers and the parent at once (systemd's control group, `kill -TERM -PGID`).
    "hypercorn -w 2, group": (["-m", "hypercorn", "-w", "2", "otelworker.app:app"], True, {}),
    # The parent alone: once one worker has exited it SIGTERMs the others, still draining.
    "hypercorn -w 2": (["-m", "hypercorn", "-w", "2", "otelworker.app:app"], False, {}),
    # serve's own graceful timeout is SHUTDOWN_GRACE_S: 2 s here, before the commits end.
    "serve": (["-m", "otelworker", "serve"], False, {"SHUTDOWN_GRACE_S": "2"}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_request_accepted_before_sigterm_gets_an_answer(
    case: str, database_url: str, tmp_path: Path
) -> None:
    args, whole_group, settings = CASES[case]
    port = free_port()
    argv = [sys.executable, *args]
    if args[1] == "hypercorn":
        argv += ["--bind", f"127.0.0.1:{port}"]
    env = _env(database_url, HOST="127.0.0.1", PORT=str(port), **settings)
    result = await run_sigterm_scenario(
        database_url, argv, env, port, tmp_path, whole_group=whole_group
    )
    await check(result, database_url)
