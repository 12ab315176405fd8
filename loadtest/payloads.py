"""Realistic OTLP trace payloads, prebuilt before any timing starts.

A request is an ``ExportTraceServiceRequest`` with one resource (service.name,
service.version, host, SDK attributes), one instrumentation scope and N spans spread
over traces of ten spans each: a server span at the root, then database, HTTP-client
and internal children with the attributes that the OpenTelemetry semantic conventions
give them (method, route, status code, db.system, db.statement, ...), an exception
event now and then.

Building every request with the protobuf library costs milliseconds; a benchmark
needs tens of thousands of them. So a :class:`TraceRequestFactory` serializes a few
templates once, records where each trace id and span id sits in the bytes, and makes
each request by copying a template and overwriting those ids with fresh random bytes:
every request has unique ids and parses to the same shape, at tens of microseconds
each.

A :class:`LogRequestFactory` does the same for ``ExportLogsServiceRequest`` bodies (the
benchmark's ``logs8192`` size: 8,192 log records, the Collector's default batch): one
resource, one scope, records with a severity, a body line like an application's log,
attributes (code location, HTTP route, user id) and the trace and span ids of the span
they were logged in (fresh in every request, as the spans' are).

:func:`factory_for` picks one by signal: ``factory_for("traces", 100)``,
``factory_for("logs", 8192)``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, SeverityNumber
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

SPANS_PER_TRACE = 10
SERVICES = ("checkout", "cart", "payment", "inventory")
ROUTES = ("/api/orders/{id}", "/api/cart", "/api/payments", "/api/items/{sku}", "/healthz")
STATEMENTS = (
    "SELECT id, sku, quantity FROM order_lines WHERE order_id = $1",
    "UPDATE carts SET updated_at = now() WHERE id = $1",
    "INSERT INTO payments (order_id, amount, currency) VALUES ($1, $2, $3)",
)


def _attr(key: str, value: str | int | bool | float) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _span(
    rng: random.Random,
    trace_id: bytes,
    span_id: bytes,
    parent: bytes,
    index: int,
    start_ns: int,
) -> Span:
    duration = rng.randint(200_000, 80_000_000)
    span = Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=start_ns + duration,
    )
    route = rng.choice(ROUTES)
    if index == 0:
        span.name = f"GET {route}"
        span.kind = Span.SPAN_KIND_SERVER
        status = rng.choice((200, 200, 200, 201, 404, 500))
        span.attributes.extend(
            [
                _attr("http.request.method", "GET"),
                _attr("http.route", route),
                _attr("url.path", route.replace("{id}", str(rng.randint(1, 99999)))),
                _attr("url.scheme", "https"),
                _attr("http.response.status_code", status),
                _attr("server.address", "shop.example.com"),
                _attr("server.port", 443),
                _attr("network.protocol.version", "1.1"),
                _attr("client.address", f"10.1.{rng.randint(0, 255)}.{rng.randint(1, 254)}"),
                _attr("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
            ]
        )
        if status >= 500:
            span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="upstream error"))
    elif index % 3 == 1:
        statement = rng.choice(STATEMENTS)
        span.name = statement.split()[0] + " shop"
        span.kind = Span.SPAN_KIND_CLIENT
        span.attributes.extend(
            [
                _attr("db.system", "postgresql"),
                _attr("db.namespace", "shop"),
                _attr("db.query.text", statement),
                _attr("db.operation.name", statement.split()[0]),
                _attr("server.address", "db.internal"),
                _attr("server.port", 5432),
            ]
        )
    elif index % 3 == 2:
        span.name = "POST"
        span.kind = Span.SPAN_KIND_CLIENT
        span.attributes.extend(
            [
                _attr("http.request.method", "POST"),
                _attr("url.full", "https://payments.internal/v2/charge"),
                _attr("http.response.status_code", 200),
                _attr("server.address", "payments.internal"),
                _attr("http.request.resend_count", 0),
            ]
        )
    else:
        span.name = "render_response"
        span.kind = Span.SPAN_KIND_INTERNAL
        span.attributes.extend(
            [_attr("code.function", "render"), _attr("code.namespace", "shop.views")]
        )
    if rng.random() < 0.05:
        event = span.events.add(name="exception", time_unix_nano=start_ns + duration // 2)
        event.attributes.extend(
            [
                _attr("exception.type", "TimeoutError"),
                _attr("exception.message", "deadline exceeded after 30s"),
            ]
        )
    return span


def build_request(
    spans: int, *, service: str = "checkout", seed: int = 0, now_ns: int | None = None
) -> ExportTraceServiceRequest:
    """One request with ``spans`` spans, in traces of ten, from one service."""
    rng = random.Random(seed)
    now = now_ns if now_ns is not None else time.time_ns()
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.extend(
        [
            _attr("service.name", service),
            _attr("service.version", "2.14.1"),
            _attr("service.instance.id", f"{service}-7d9f8c6b5-{rng.randint(10000, 99999)}"),
            _attr("deployment.environment.name", "production"),
            _attr("host.name", f"node-{rng.randint(1, 40):02d}.eu-west-1.compute.internal"),
            _attr("host.arch", "amd64"),
            _attr("os.type", "linux"),
            _attr("process.runtime.name", "cpython"),
            _attr("process.runtime.version", "3.12.4"),
            _attr("telemetry.sdk.name", "opentelemetry"),
            _attr("telemetry.sdk.language", "python"),
            _attr("telemetry.sdk.version", "1.27.0"),
        ]
    )
    ss = rs.scope_spans.add()
    ss.scope.name = "opentelemetry.instrumentation.starlette"
    ss.scope.version = "0.48b0"
    trace_id = b""
    root = b""
    for i in range(spans):
        index = i % SPANS_PER_TRACE
        span_id = rng.randbytes(8)
        if index == 0:
            trace_id = rng.randbytes(16)
            root = span_id
        parent = b"" if index == 0 else root
        start = now - rng.randint(0, 5_000_000_000)
        ss.spans.append(_span(rng, trace_id, span_id, parent, index, start))
    return request


def _id_offsets(data: bytes, ids: list[bytes]) -> list[list[int]]:
    """Every offset of each id in the serialized request (random ids occur nowhere else).

    In protobuf every id is a bytes field, so each occurrence follows its length byte
    (16 or 8): the scan visits only the bytes after such a byte and looks the slice up,
    one pass per id length instead of one search of the whole request per id (seconds
    for a 1.8 MB request of 8,192 log records). Overlapping occurrences are found too
    (the scan moves one byte on)."""
    index: dict[bytes, int] = {value: i for i, value in enumerate(ids)}
    offsets: list[list[int]] = [[] for _ in ids]
    for size in sorted({len(v) for v in ids}):
        if size > 127:  # a longer id would need a multi-byte length: search for it whole
            continue
        marker = bytes([size])
        at = data.find(marker)
        while at >= 0:
            value = data[at + 1 : at + 1 + size]
            i = index.get(value)
            if i is not None and len(value) == size:
                offsets[i].append(at + 1)
            at = data.find(marker, at + 1)
    for i, value in enumerate(ids):
        if not offsets[i]:
            at = data.find(value)
            while at >= 0:
                offsets[i].append(at)
                at = data.find(value, at + 1)
        if not offsets[i]:
            raise ValueError("an id is missing from the serialized template")
    return offsets


def _id_offsets_naive(data: bytes, ids: list[bytes]) -> list[list[int]]:
    """The plain search :func:`_id_offsets` must agree with (a test aid)."""
    offsets: list[list[int]] = []
    for value in ids:
        found: list[int] = []
        at = data.find(value)
        while at >= 0:
            found.append(at)
            at = data.find(value, at + 1)
        offsets.append(found)
    return offsets


def _trace_ids(request: ExportTraceServiceRequest) -> tuple[list[bytes], list[bytes]]:
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                if span.trace_id not in trace_ids:
                    trace_ids.append(span.trace_id)
                span_ids.append(span.span_id)
    return trace_ids, span_ids


def _log_ids(request: ExportLogsServiceRequest) -> tuple[list[bytes], list[bytes]]:
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    seen_traces: set[bytes] = set()
    seen_spans: set[bytes] = set()
    for rl in request.resource_logs:
        for sl in rl.scope_logs:
            for record in sl.log_records:
                if record.trace_id and record.trace_id not in seen_traces:
                    seen_traces.add(record.trace_id)
                    trace_ids.append(record.trace_id)
                if record.span_id and record.span_id not in seen_spans:
                    seen_spans.add(record.span_id)
                    span_ids.append(record.span_id)
    return trace_ids, span_ids


class _Template:
    def __init__(self, request: ExportTraceServiceRequest | ExportLogsServiceRequest) -> None:
        self.data = request.SerializeToString()
        if isinstance(request, ExportLogsServiceRequest):
            trace_ids, span_ids = _log_ids(request)
        else:
            trace_ids, span_ids = _trace_ids(request)
        self.ids = trace_ids + span_ids
        self.sizes = [len(v) for v in self.ids]
        self.random_bytes = sum(self.sizes)
        offsets = _id_offsets(self.data, self.ids)
        expected = len(trace_ids) * 16 + len(span_ids) * 8
        if self.random_bytes != expected or len(set(self.ids)) != len(self.ids):
            raise ValueError("template ids are not unique")
        # The template cut at every id: fixed pieces between id slots, and for each slot
        # which id goes there; a request is the join of pieces and fresh ids.
        starts = [0]
        at = 0
        for size in self.sizes:
            starts.append(at := at + size)
        slots = sorted((o, i) for i, found in enumerate(offsets) for o in found)
        self._pieces: list[bytes] = []
        self._slices: list[slice] = []
        cursor = 0
        for offset, index in slots:
            self._pieces.append(self.data[cursor:offset])
            self._slices.append(slice(starts[index], starts[index + 1]))
            cursor = offset + self.sizes[index]
        self._tail = self.data[cursor:]

    def fresh(self) -> bytes:
        noise = os.urandom(self.random_bytes)
        parts: list[bytes] = []
        append = parts.append
        for piece, where in zip(self._pieces, self._slices, strict=True):
            append(piece)
            append(noise[where])
        append(self._tail)
        return b"".join(parts)


class TraceRequestFactory:
    """Serialized ``ExportTraceServiceRequest`` bodies with unique trace and span ids."""

    signal = "traces"

    def __init__(self, spans: int = 100, *, services: tuple[str, ...] = SERVICES, seed: int = 1):
        if spans < 1:
            raise ValueError("spans must be at least 1")
        self.spans = spans
        now = time.time_ns()
        self._templates = [
            _Template(build_request(spans, service=name, seed=seed + n, now_ns=now))
            for n, name in enumerate(services)
        ]
        self._next = 0

    @property
    def approx_size(self) -> int:
        return len(self._templates[0].data)

    def make(self) -> bytes:
        template = self._templates[self._next]
        self._next = (self._next + 1) % len(self._templates)
        return template.fresh()

    def many(self, count: int) -> list[bytes]:
        return [self.make() for _ in range(count)]

    def stream(self) -> Iterator[bytes]:
        while True:
            yield self.make()


# --- logs ------------------------------------------------------------------------------

_SEV = SeverityNumber
LOG_LINES = (
    (_SEV.SEVERITY_NUMBER_INFO, "INFO", "request completed in {ms} ms"),
    (_SEV.SEVERITY_NUMBER_INFO, "INFO", "order {id} placed: {n} lines, total {ms}.00 EUR"),
    (_SEV.SEVERITY_NUMBER_DEBUG, "DEBUG", "cache miss for key cart:{id}, loading from db"),
    (_SEV.SEVERITY_NUMBER_WARN, "WARN", "slow query ({ms} ms): SELECT * FROM order_lines"),
    (_SEV.SEVERITY_NUMBER_ERROR, "ERROR", "payment provider timeout after {ms} ms, retry {n}"),
)
LOGS_PER_SPAN = 4  # a span logs a few lines: records share trace and span ids in fours


def build_logs_request(
    records: int, *, service: str = "checkout", seed: int = 0, now_ns: int | None = None
) -> ExportLogsServiceRequest:
    """One request with ``records`` log records from one service, four per span."""
    rng = random.Random(seed)
    now = now_ns if now_ns is not None else time.time_ns()
    request = ExportLogsServiceRequest()
    rl = request.resource_logs.add()
    rl.resource.attributes.extend(
        [
            _attr("service.name", service),
            _attr("service.version", "2.14.1"),
            _attr("service.instance.id", f"{service}-7d9f8c6b5-{rng.randint(10000, 99999)}"),
            _attr("deployment.environment.name", "production"),
            _attr("host.name", f"node-{rng.randint(1, 40):02d}.eu-west-1.compute.internal"),
            _attr("telemetry.sdk.name", "opentelemetry"),
            _attr("telemetry.sdk.language", "python"),
            _attr("telemetry.sdk.version", "1.27.0"),
        ]
    )
    sl = rl.scope_logs.add()
    sl.scope.name = "shop.orders"
    trace_id = span_id = b""
    for i in range(records):
        if i % LOGS_PER_SPAN == 0:
            span_id = rng.randbytes(8)
            if i % (LOGS_PER_SPAN * SPANS_PER_TRACE) == 0:
                trace_id = rng.randbytes(16)
        number, text, line = rng.choice(LOG_LINES)
        at = now - rng.randint(0, 5_000_000_000)
        record = LogRecord(
            time_unix_nano=at,
            observed_time_unix_nano=at + rng.randint(10_000, 2_000_000),
            severity_number=number,
            severity_text=text,
            trace_id=trace_id,
            span_id=span_id,
            flags=1,
        )
        record.body.string_value = line.format(
            ms=rng.randint(1, 3000), id=rng.randint(1, 999_999), n=rng.randint(1, 9)
        )
        record.attributes.extend(
            [
                _attr("code.function", rng.choice(("place_order", "load_cart", "charge"))),
                _attr("code.lineno", rng.randint(10, 900)),
                _attr("http.route", rng.choice(ROUTES)),
                _attr("enduser.id", f"user-{rng.randint(1, 50_000)}"),
            ]
        )
        sl.log_records.append(record)
    return request


class LogRequestFactory:
    """Serialized ``ExportLogsServiceRequest`` bodies with fresh trace and span ids."""

    signal = "logs"

    def __init__(self, records: int = 8192, *, services: tuple[str, ...] = SERVICES, seed: int = 1):
        if records < 1:
            raise ValueError("records must be at least 1")
        self.spans = records  # records per request, under the name the traces factory uses
        now = time.time_ns()
        self._templates = [
            _Template(build_logs_request(records, service=name, seed=seed + n, now_ns=now))
            for n, name in enumerate(services)
        ]
        self._next = 0

    @property
    def approx_size(self) -> int:
        return len(self._templates[0].data)

    def make(self) -> bytes:
        template = self._templates[self._next]
        self._next = (self._next + 1) % len(self._templates)
        return template.fresh()


def factory_for(signal: str, records: int) -> TraceRequestFactory | LogRequestFactory:
    """The request factory for ``signal`` (``traces`` or ``logs``)."""
    if signal == "traces":
        return TraceRequestFactory(records)
    if signal == "logs":
        return LogRequestFactory(records)
    raise ValueError(f"no payload factory for signal {signal!r}")
