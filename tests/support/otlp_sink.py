"""An OTLP/HTTP destination for the forwarding tests, in the test's own event loop.

    sink = OtlpSink(port)             # not listening yet: a destination that is down
    await sink.start()                # up: POST /v1/{signal} answered by ``sink.behaviour``
    sink.behaviour = Behaviour(status=429, retry_after_s=2)
    ... sink.arrivals, sink.ids("traces"), sink.ids_by_tenant() ...
    await sink.stop()

Every request is recorded (time, signal, headers, the ids of its records, the answer it
got): the ids are those ``tests/support/objects.record_ids`` gives (span ids, log bodies,
metric points), so they compare with what a :class:`~tests.support.objects.Telemetry`
acknowledged. Only requests answered 200 count as delivered (:meth:`ids`).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.objects import record_ids

REQUEST_TYPES: dict[str, Any] = {
    "traces": ExportTraceServiceRequest,
    "metrics": ExportMetricsServiceRequest,
    "logs": ExportLogsServiceRequest,
}


@dataclass
class Behaviour:
    """How the sink answers: 200, or ``status`` (with ``Retry-After`` and a Status message),
    after ``delay_s``."""

    status: int = 200
    retry_after_s: float | None = None
    message: str = ""
    delay_s: float = 0.0


@dataclass
class Arrival:
    at: float  # time.monotonic() when the body was read
    wall: float  # time.time() then
    signal: str
    headers: dict[str, str]  # lower-case names
    ids: list[Hashable]
    status: int
    body_bytes: int

    @property
    def tenant(self) -> str | None:
        return self.headers.get("x-scope-orgid")


@dataclass
class OtlpSink:
    port: int
    host: str = "127.0.0.1"
    behaviour: Behaviour = field(default_factory=Behaviour)
    arrivals: list[Arrival] = field(default_factory=list)
    inflight: int = 0  # requests read and not yet answered
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/{signal:traces|metrics|logs}", self._export)
        app.router.add_post("/custom/{signal:traces|metrics|logs}", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body[:2] == b"\x1f\x8b":  # aiohttp undoes gzip itself; in case it did not
            body = gzip.decompress(body)
        signal = request.match_info["signal"]
        message = REQUEST_TYPES[signal].FromString(body)
        behaviour = self.behaviour
        arrival = Arrival(
            at=time.monotonic(),
            wall=time.time(),
            signal=signal,
            headers={k.lower(): v for k, v in request.headers.items()},
            ids=record_ids(signal, message),
            status=behaviour.status,
            body_bytes=len(body),
        )
        self.arrivals.append(arrival)
        if behaviour.delay_s:
            self.inflight += 1
            try:
                await asyncio.sleep(behaviour.delay_s)
            finally:
                self.inflight -= 1
        if behaviour.status == 200:
            return web.Response(body=b"", content_type="application/x-protobuf")
        headers = {}
        if behaviour.retry_after_s is not None:
            headers["Retry-After"] = str(int(behaviour.retry_after_s))
        status = Status(code=3 if behaviour.status == 400 else 14, message=behaviour.message)
        return web.Response(
            status=behaviour.status,
            body=status.SerializeToString(),
            content_type="application/x-protobuf",
            headers=headers,
        )

    # --- what arrived ---------------------------------------------------------------------

    def delivered(self) -> list[Arrival]:
        return [a for a in self.arrivals if a.status == 200]

    def ids(self, signal: str) -> Counter[Hashable]:
        """How many times each record arrived in a request answered 200."""
        return Counter(i for a in self.delivered() if a.signal == signal for i in a.ids)

    def ids_by_tenant(self, signal: str) -> dict[str | None, set[Hashable]]:
        out: dict[str | None, set[Hashable]] = {}
        for arrival in self.delivered():
            if arrival.signal == signal:
                out.setdefault(arrival.tenant, set()).update(arrival.ids)
        return out
