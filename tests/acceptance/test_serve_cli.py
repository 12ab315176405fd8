"""The command line as an operator runs it: ``python -m otelworker serve|migrate``."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.payloads import unstage

pytestmark = pytest.mark.acceptance

GRACE_S = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**settings: str) -> dict[str, str]:
    """The calling environment without any otelworker setting, plus ``settings``."""
    from otelworker.settings import Settings, env_key

    keys = {env_key(n) for n in Settings.model_fields}
    keys |= {f"OTEL_{k}" for k in keys}
    env = {k: v for k, v in os.environ.items() if k.upper() not in keys}
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "otelworker", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def _fetchval(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def fetchval(dsn: str, sql: str) -> Any:
    return asyncio.run(_fetchval(dsn, sql))


async def _span_ids_accounted(dsn: str, objects: Path) -> list[str]:
    """Span ids staged in the queue plus those in exported (local, gzip) objects."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            payloads = [
                unstage(r["payload"])
                for r in await conn.fetch(
                    "SELECT payload FROM ingestion_queue WHERE signal = 'traces'"
                )
            ]
            keys = [
                r["object_key"]
                for r in await conn.fetch(
                    "SELECT object_key FROM export_batches WHERE signal = 'traces'"
                )
            ]
    finally:
        await conn.close()
    payloads += [gzip.decompress((objects / key).read_bytes()) for key in keys]
    ids = []
    for payload in payloads:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(payload)
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                ids += [span.span_id.hex() for span in ss.spans]
    return ids


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"serve exited with {self.proc.returncode} before becoming ready:\n"
                        f"{self.stderr.read_text()}\n{self.stdout.read_text()}"
                    )
                try:
                    if client.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"serve not ready within {timeout} s:\n{self.stderr.read_text()}")
                time.sleep(0.1)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(**settings: str) -> Served:
        settings.setdefault("GRPC_PORT", str(_free_port()))
        stdout = tmp_path / f"stdout-{len(started)}.log"
        stderr = tmp_path / f"stderr-{len(started)}.log"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "otelworker", "serve"],
                env=_env(**settings),
                cwd=tmp_path,
                stdout=out,
                stderr=err,
            )
        started.append(proc)
        return Served(proc, f"http://127.0.0.1:{settings['PORT']}", stdout, stderr)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _one_span(endpoint: str) -> tuple[SpanExportResult, str]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "acceptance"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("acceptance").start_as_current_span("cli-span") as span:
        span_id = format(span.get_span_context().span_id, "016x")
    provider.shutdown()
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=10)
    try:
        return exporter.export(memory.get_finished_spans()), span_id
    finally:
        exporter.shutdown()


def test_serve_accepts_a_span_and_exits_zero_on_sigterm(
    serve: Any, database_url: str, tmp_path: Path
) -> None:
    port = _free_port()
    served = serve(
        DATABASE_URL=database_url,
        PORT=str(port),
        HOST="127.0.0.1",
        SHUTDOWN_GRACE_S=str(GRACE_S),
        LOCAL_OBJECT_DIR=str(tmp_path / "objects"),
        EMBEDDED_DB_DIR=str(tmp_path / "never-used"),
    )
    served.wait_ready()

    result, span_id = _one_span(f"{served.url}/v1/traces")
    assert result is SpanExportResult.SUCCESS
    # Acknowledged means committed: the span is in the queue, or already exported (the
    # worker deletes the rows and writes the manifest in one transaction).
    assert asyncio.run(_span_ids_accounted(database_url, tmp_path / "objects")) == [span_id]

    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    try:
        code = served.proc.wait(timeout=GRACE_S + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running {GRACE_S + 10} s after SIGTERM")
    assert code == 0, served.stderr.read_text()
    assert time.monotonic() - started < GRACE_S + 10

    events = [e.get("event") for e in served.events()]
    assert "service_started" in events
    assert "service_stopped" in events
    assert events.index("service_started") < events.index("service_stopped")
    # Where to send OTLP is printed for the operator.
    assert f"http://localhost:{port}" in served.stderr.read_text() or (
        f"127.0.0.1:{port}" in served.stderr.read_text()
    )
    # Nothing secret in the logs: the DSN (with its password, if any) never appears.
    assert database_url not in served.stdout.read_text()


def test_serve_refuses_an_invalid_setting(database_url: str, tmp_path: Path) -> None:
    settings = {"DATABASE_URL": database_url, "PORT": str(_free_port()), "OVERFLOW_POLICY": "foo"}
    done = _run(["serve"], _env(**settings), tmp_path, timeout=30)
    assert done.returncode != 0
    assert "OVERFLOW_POLICY" in done.stderr
    assert "reject" in done.stderr  # what is allowed
    assert "Traceback" not in done.stderr


def test_serve_refuses_an_invalid_dotenv_value(database_url: str, tmp_path: Path) -> None:
    # The other spelling, from the .env file in the working directory.
    (tmp_path / ".env").write_text("OTEL_OVERFLOW_POLICY=foo\n")
    done = _run(["serve"], _env(DATABASE_URL=database_url), tmp_path, timeout=30)
    assert done.returncode != 0
    assert "OVERFLOW_POLICY" in done.stderr
    assert "Traceback" not in done.stderr


def test_migrate_applies_once_and_exits_zero(database_url: str, tmp_path: Path) -> None:
    env = _env(DATABASE_URL=database_url)

    first = _run(["migrate"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert fetchval(database_url, "SELECT to_regclass('ingestion_queue') IS NOT NULL")
    assert fetchval(database_url, "SELECT to_regclass('export_batches') IS NOT NULL")
    versions = fetchval(database_url, "SELECT count(*) FROM otelworker_migrations")
    assert versions >= 1

    again = _run(["migrate"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert fetchval(database_url, "SELECT count(*) FROM otelworker_migrations") == versions


def test_a_command_against_a_read_only_server_says_so_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    # Every session read-only, as on a standby reached by mistake (asyncpg passes unknown
    # DSN parameters as server settings).
    sep = "&" if "?" in database_url else "?"
    env = _env(DATABASE_URL=f"{database_url}{sep}default_transaction_read_only=on")
    done = _run(["migrate"], env, tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert "ReadOnlySQLTransactionError" in done.stderr
    assert "takes no writes" in done.stderr


def test_sigterm_during_grpc_load_loses_no_acknowledged_record(
    serve: Any, database_url: str, tmp_path: Path
) -> None:
    import threading

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    from tests.support.objects import span_request

    port, grpc_port = _free_port(), _free_port()
    served = serve(
        DATABASE_URL=database_url,
        PORT=str(port),
        GRPC_PORT=str(grpc_port),
        HOST="127.0.0.1",
        SHUTDOWN_GRACE_S=str(GRACE_S),
        LOCAL_OBJECT_DIR=str(tmp_path / "objects"),
        EMBEDDED_DB_DIR=str(tmp_path / "never-used"),
    )
    served.wait_ready()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            for n in range(100_000):
                if stop.is_set():
                    return
                ids = [bytes([worker, 0]) + (n * 4 + i).to_bytes(6, "big") for i in range(4)]
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(
                    span_request(ids, service_name="grpc-sigterm")
                )
                try:
                    stub.Export(request, timeout=GRACE_S + 5)
                except grpc.RpcError:
                    if served.proc.poll() is not None:
                        return
                    continue  # refused while stopping: not acknowledged, try again
                with lock:
                    acknowledged.extend(i.hex() for i in ids)

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 400:  # load is flowing
        assert time.monotonic() < deadline, "no gRPC load acknowledged"
        time.sleep(0.05)
    served.proc.send_signal(signal.SIGTERM)
    code = served.proc.wait(timeout=GRACE_S + 15)
    stop.set()
    for thread in threads:
        thread.join(timeout=GRACE_S + 10)
    assert code == 0, served.stderr.read_text()[-2000:]

    accounted = asyncio.run(_span_ids_accounted(database_url, tmp_path / "objects"))
    assert len(accounted) == len(set(accounted))
    missing = set(acknowledged) - set(accounted)
    assert not missing, f"{len(missing)} acknowledged spans lost of {len(acknowledged)}"
    events = [e.get("event") for e in served.events()]
    assert "grpc_listening" in events and "service_stopped" in events


def test_serve_processes_2_share_the_port_and_drain_on_sigterm(
    serve: Any, database_url: str, tmp_path: Path
) -> None:
    port = _free_port()
    served = serve(
        DATABASE_URL=database_url,
        PORT=str(port),
        HOST="127.0.0.1",
        PROCESSES="2",
        SHUTDOWN_GRACE_S=str(GRACE_S),
        LOCAL_OBJECT_DIR=str(tmp_path / "objects"),
        EMBEDDED_DB_DIR=str(tmp_path / "never-used"),
    )
    served.wait_ready()
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection each request
    with httpx.Client(limits=fresh, timeout=10) as client:
        # Both processes answer: over fresh connections, scrapes reach each of them.
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"one process answered every scrape: {seen}"
            text = client.get(f"{served.url}/metrics").text
            line = next(x for x in text.splitlines() if x.startswith("otelworker_process_index"))
            seen.add(float(line.split()[-1]))
        assert seen == {0.0, 1.0}
        acked = []
        for n in range(40):
            result, span_id = _one_span(f"{served.url}/v1/traces")
            assert result is SpanExportResult.SUCCESS, n
            acked.append(span_id)

    served.proc.send_signal(signal.SIGTERM)
    code = served.proc.wait(timeout=GRACE_S * 4 + 20)
    assert code == 0, served.stderr.read_text()[-2000:]
    events = [e.get("event") for e in served.events()]
    assert events.count("service_started") == 2 and events.count("service_stopped") == 2
    assert "processes_started" in events
    accounted = asyncio.run(_span_ids_accounted(database_url, tmp_path / "objects"))
    assert sorted(accounted) == sorted(acked)  # every acknowledged span, once


def test_serve_processes_stop_when_the_parent_is_killed(
    serve: Any, database_url: str, tmp_path: Path
) -> None:
    served = serve(
        DATABASE_URL=database_url,
        PORT=str(_free_port()),
        HOST="127.0.0.1",
        PROCESSES="2",
        SHUTDOWN_GRACE_S="2",
        LOCAL_OBJECT_DIR=str(tmp_path / "objects"),
        EMBEDDED_DB_DIR=str(tmp_path / "never-used"),
    )
    served.wait_ready()
    [started] = [e for e in served.events() if e.get("event") == "processes_started"]
    children = started["pids"]
    assert len(children) == 2
    served.proc.kill()  # the parent dies outright: no SIGTERM of its own to forward
    served.proc.wait(10)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie (exited, not reaped by init yet) is gone for our purpose.
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, "service processes outlived their parent"
        time.sleep(0.1)
