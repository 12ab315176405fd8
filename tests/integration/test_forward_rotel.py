"""The forwarder's client against a real OTLP receiver nobody here wrote: rotel.

rotel (``rotel-agent``, a Rust OTLP collector shipped in the ``rotel`` wheel) receives
OTLP/HTTP and OTLP/gRPC from :class:`DestinationClient` and exports onward with its own
OTLP exporter to a counting sink written here; every record sent (traces, metrics, logs;
objects of several joined requests, and one large enough to be split) must arrive, over
both protocols. No PostgreSQL is needed.

The objects here are several gzip members each, as the flush writes them: rotel reads
only a body's first member (and answers 200), which is why a destination's bodies are one
member unless it says ``gzip_members: many`` (see otelworker/forwarding/destinations.py).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otelworker.forwarding.client import Outcome, make_client
from otelworker.forwarding.destinations import parse_destinations
from tests.support import free_port
from tests.support.objects import record_ids

pytestmark = pytest.mark.integration

READY_S = 30.0
ARRIVE_S = 30.0  # a deadline, not a wait
REQUEST_TYPES: dict[str, Any] = {
    "traces": trace_service_pb2.ExportTraceServiceRequest,
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
}


def rotel_binary() -> str:
    """The ``rotel-agent`` binary: ROTEL_AGENT, else the ``rotel`` wheel's (beside its
    package, not in bin/), else one on PATH. Not found fails: it is in the test extra."""
    explicit = os.environ.get("ROTEL_AGENT")
    if explicit:
        return explicit
    try:
        import rotel

        candidate = Path(rotel.__file__ or "").parent / "rotel-agent"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("rotel-agent")
    if found is None:
        pytest.fail("no rotel-agent binary: pip install rotel (the test extra), or ROTEL_AGENT")
    return found


# --- records ------------------------------------------------------------------------------


def traces(resources: int, spans: int) -> Any:
    request = trace_service_pb2.ExportTraceServiceRequest()
    now = time.time_ns()
    for r in range(resources):
        entry = request.resource_spans.add()
        entry.resource.attributes.add(key="service.name").value.string_value = f"svc-{r}"
        scope = entry.scope_spans.add()
        for i in range(spans):
            span = scope.spans.add()
            span.trace_id = os.urandom(16)
            span.span_id = os.urandom(8)
            span.name = f"op-{i}"
            span.start_time_unix_nano = now
            span.end_time_unix_nano = now + 1000
    return request


def logs(records: int) -> Any:
    request = logs_service_pb2.ExportLogsServiceRequest()
    entry = request.resource_logs.add()
    entry.resource.attributes.add(key="service.name").value.string_value = "svc-logs"
    scope = entry.scope_logs.add()
    now = time.time_ns()
    for _ in range(records):
        record = scope.log_records.add()
        record.time_unix_nano = now
        record.body.string_value = uuid.uuid4().hex
    return request


def metrics(points: int) -> Any:
    request = metrics_service_pb2.ExportMetricsServiceRequest()
    entry = request.resource_metrics.add()
    entry.resource.attributes.add(key="service.name").value.string_value = "svc-metrics"
    metric = entry.scope_metrics.add().metrics.add()
    metric.name = f"m.{uuid.uuid4().hex[:8]}"
    now = time.time_ns()
    for i in range(points):
        point = metric.gauge.data_points.add()
        point.time_unix_nano = now + i
        point.as_int = i
    return request


@dataclass
class Obj:
    signal: str
    body: bytes  # as archived: requests joined, gzip members joined
    raw_bytes: int
    ids: list[Hashable]


def archived(signal: str, *requests: Any) -> Obj:
    raws = [r.SerializeToString() for r in requests]
    ids = [i for r in requests for i in record_ids(signal, r)]
    return Obj(signal, b"".join(gzip.compress(raw) for raw in raws), sum(map(len, raws)), ids)


# --- the counting sink ------------------------------------------------------------------


class Sink:
    """OTLP/HTTP: every record's id that rotel exported to it, per signal."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ids: dict[str, Counter[Hashable]] = {s: Counter() for s in REQUEST_TYPES}
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=2**26)  # gzip bodies decompressed by aiohttp
        app.router.add_post("/v1/{signal}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        signal = request.match_info["signal"]
        if signal not in REQUEST_TYPES:
            return web.Response(status=404)
        message = REQUEST_TYPES[signal]()
        message.ParseFromString(await request.read())
        self.ids[signal].update(record_ids(signal, message))
        self.requests += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def wait_for(self, expected: dict[str, Counter[Hashable]]) -> None:
        deadline = time.monotonic() + ARRIVE_S
        while any(self.ids[s] < want for s, want in expected.items()):
            if time.monotonic() > deadline:
                missing = {s: sum((want - self.ids[s]).values()) for s, want in expected.items()}
                pytest.fail(f"records not at the sink within {ARRIVE_S} s: missing {missing}")
            await asyncio.sleep(0.05)


@dataclass
class Rotel:
    http_port: int
    grpc_port: int
    log: Path


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    yield server
    await server.stop()


def _ready(port: int) -> bool:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/traces",
        data=b"",
        method="POST",
        headers={"Content-Type": "application/x-protobuf"},
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
async def rotel(sink: Sink, tmp_path: Path) -> AsyncIterator[Rotel]:
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "rotel.log"
    args = [
        rotel_binary(),
        "start",
        "--otlp-http-endpoint",
        f"127.0.0.1:{http_port}",
        "--otlp-grpc-endpoint",
        f"127.0.0.1:{grpc_port}",
        "--exporter",
        "otlp",
        "--otlp-exporter-protocol",
        "http",
        "--otlp-exporter-endpoint",
        f"http://127.0.0.1:{sink.port}",
        "--batch-timeout",
        "50ms",
        "--pid-file",
        str(tmp_path / "rotel.pid"),
        "--log-file",
        str(log),
    ]
    proc = _start(args, log)
    try:
        deadline = time.monotonic() + READY_S
        while not await asyncio.to_thread(_ready, http_port):
            if proc.poll() is not None:
                pytest.fail(f"rotel-agent exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"rotel-agent not ready within {READY_S} s:\n{log.read_text()}")
            await asyncio.sleep(0.05)
        yield Rotel(http_port, grpc_port, log)
    finally:
        await asyncio.to_thread(_stop, proc)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_every_record_sent_through_rotel_arrives(
    rotel: Rotel, sink: Sink, protocol: str
) -> None:
    endpoint = (
        f"http://127.0.0.1:{rotel.http_port}"
        if protocol == "http/protobuf"
        else f"127.0.0.1:{rotel.grpc_port}"
    )
    # Objects as the flush writes them: several requests joined, one gzip member each.
    objects = [archived("traces", traces(2, 20), traces(1, 5)) for _ in range(10)]
    objects += [archived("logs", logs(30), logs(10)), archived("metrics", metrics(25))]
    big = archived("traces", traces(8, 200))
    small_limit = big.raw_bytes // 6  # the large object goes in at least 6 requests
    (d,) = parse_destinations(
        (
            f"destinations:\n  - {{name: rotel, protocol: {protocol}, endpoint: '{endpoint}',"
            f" max_request_bytes: {small_limit}}}\n"
        ).encode(),
        "test",
        {},
    )
    client = make_client(d)
    try:
        results = await asyncio.gather(
            *(
                client.send(o.signal, "team-a", o.body, "gzip", o.raw_bytes, records=len(o.ids))
                for o in [*objects, big]
            )
        )
    finally:
        await client.close()
    for o, result in zip([*objects, big], results, strict=True):
        assert result.outcome is Outcome.DELIVERED, (result, rotel.log.read_text()[-2000:])
        assert result.records == len(o.ids)
        assert result.rejected_records == 0
    assert results[-1].requests >= 6
    expected: dict[str, Counter[Hashable]] = {s: Counter() for s in REQUEST_TYPES}
    for o in [*objects, big]:
        expected[o.signal].update(o.ids)
    await sink.wait_for(expected)
    # Each record exactly once: rotel delivered what it acknowledged, nothing twice.
    assert sink.ids == expected
