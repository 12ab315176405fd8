"""Records with ids the harness can find again, and reading them back out of objects.

Every record the stress harness sends carries a unique 64-bit id: ``request << 16 | n``
(the request's index in the run and the record's position in it), so an id found in an
object names the request it came from. Where the id sits:

- traces: the span id (8 bytes, big-endian);
- logs: the log record attribute ``stress.id`` (``bytes_value``, 8 bytes);
- metrics: the gauge data point attribute ``stress.id`` (``bytes_value``, 8 bytes).

Requests are built from templates: one message per (signal, records, padding) is
serialized once with random placeholder ids, and each request is that byte string with
the placeholders overwritten, so building costs microseconds, not protobuf calls.
"""

from __future__ import annotations

import base64
import gzip
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from otelworker.compression import decompress_object as _decompress_object

SIGNALS = ("traces", "metrics", "logs")
ID_KEY = "stress.id"
MAX_RECORDS = 1 << 16
REQUEST_TYPES: dict[str, Any] = {
    "traces": ExportTraceServiceRequest,
    "metrics": ExportMetricsServiceRequest,
    "logs": ExportLogsServiceRequest,
}
_ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def record_id(request: int, n: int) -> int:
    return (request << 16) | n


def request_of(rid: int) -> int:
    return rid >> 16


def _kv(key: str, value: str | int | bytes) -> KeyValue:
    if isinstance(value, bytes):
        return KeyValue(key=key, value=AnyValue(bytes_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _pad(rng: random.Random, size: int) -> str:
    return bytes(rng.choice(_ALPHABET) for _ in range(size)).decode()


def _build(
    signal: str,
    placeholders: list[bytes],
    trace_slot: bytes,
    pad: int,
    pad_text: str | None = None,
) -> Any:
    """One request whose record n carries ``placeholders[n]`` where its id goes.

    Each record's ``stress.pad`` attribute is ``pad`` random characters, or ``pad_text``
    itself when given (big bodies: built in microseconds, compressible or not as chosen).
    """
    rng = random.Random(len(placeholders) * 7919 + pad)
    now = time.time_ns()
    resource = [
        _kv("service.name", f"stress-{signal}"),
        _kv("service.instance.id", "stress-harness"),
        _kv("host.name", "loadtest.local"),
    ]
    message = REQUEST_TYPES[signal]()
    if signal == "traces":
        rs = message.resource_spans.add()
        rs.resource.attributes.extend(resource)
        ss = rs.scope_spans.add()
        ss.scope.name = "loadtest.stress"
        for n, slot in enumerate(placeholders):
            span = ss.spans.add(
                trace_id=trace_slot,
                span_id=slot,
                name=f"GET /api/items/{n % 50}",
                kind=2,
                start_time_unix_nano=now - 2_000_000 * (n + 1),
                end_time_unix_nano=now - 1_000_000 * n,
            )
            span.attributes.extend([_kv("http.request.method", "GET"), _kv("seq", n)])
            if pad_text is not None:
                span.attributes.append(_kv("stress.pad", pad_text))
            elif pad:
                span.attributes.append(_kv("stress.pad", _pad(rng, pad)))
    elif signal == "logs":
        rl = message.resource_logs.add()
        rl.resource.attributes.extend(resource)
        sl = rl.scope_logs.add()
        sl.scope.name = "loadtest.stress"
        for n, slot in enumerate(placeholders):
            rec = sl.log_records.add(
                time_unix_nano=now - 1_000_000 * n,
                observed_time_unix_nano=now,
                severity_number=9,
                severity_text="INFO",
            )
            rec.body.string_value = f"request handled in {n % 97} ms"
            rec.attributes.extend([_kv(ID_KEY, slot), _kv("seq", n)])
            if pad_text is not None:
                rec.attributes.append(_kv("stress.pad", pad_text))
            elif pad:
                rec.attributes.append(_kv("stress.pad", _pad(rng, pad)))
    else:
        rm = message.resource_metrics.add()
        rm.resource.attributes.extend(resource)
        sm = rm.scope_metrics.add()
        sm.scope.name = "loadtest.stress"
        metric = sm.metrics.add(name="stress.queue.depth", unit="1")
        for n, slot in enumerate(placeholders):
            point = metric.gauge.data_points.add(
                time_unix_nano=now - 1_000_000 * n, as_int=n % 1000
            )
            point.attributes.extend([_kv(ID_KEY, slot)])
            if pad_text is not None:
                point.attributes.append(_kv("stress.pad", pad_text))
            elif pad:
                point.attributes.append(_kv("stress.pad", _pad(rng, pad)))
    return message


def _cut(data: bytes, holes: list[tuple[int, int, int]]) -> tuple[list[bytes], list[int], bytes]:
    """Pieces between holes, what goes in each hole (record n, or -1: the trace id), tail."""
    holes = sorted(holes)
    pieces: list[bytes] = []
    fills: list[int] = []
    cursor = 0
    for offset, length, n in holes:
        pieces.append(data[cursor:offset])
        fills.append(n)
        cursor = offset + length
    return pieces, fills, data[cursor:]


def _holes(data: bytes, slots: list[bytes], trace_slot: bytes | None) -> list[tuple[int, int, int]]:
    """Where each placeholder sits; empty if one is not exactly where expected."""
    holes: list[tuple[int, int, int]] = []
    for n, slot in enumerate(slots):
        if data.count(slot) != 1:
            return []
        holes.append((data.index(slot), len(slot), n))
    if trace_slot is not None:
        at = data.find(trace_slot)
        while at >= 0:
            holes.append((at, len(trace_slot), -1))
            at = data.find(trace_slot, at + 1)
        if len(holes) != 2 * len(slots):
            return []
    return holes


def _b64(value: bytes) -> bytes:
    return base64.b64encode(value)


class Template:
    """A serialized request (protobuf, and its OTLP/JSON form) with holes where ids go.

    ``pad_text``, when given, is every record's ``stress.pad`` value instead of ``pad``
    random characters; ``with_json=False`` skips the OTLP/JSON form (no ``make_json``).
    """

    def __init__(
        self,
        signal: str,
        records: int,
        pad: int = 0,
        *,
        pad_text: str | None = None,
        with_json: bool = True,
    ) -> None:
        if not 1 <= records < MAX_RECORDS:
            raise ValueError(f"records per request must be in 1..{MAX_RECORDS - 1}")
        self.signal = signal
        self.records = records
        traces = signal == "traces"
        while True:
            slots = [os.urandom(8) for _ in range(records)]
            trace_slot = os.urandom(16)
            data = _build(signal, slots, trace_slot, pad, pad_text).SerializeToString()
            holes = _holes(data, slots, trace_slot if traces else None)
            if not holes:
                continue
            if not with_json:
                text, json_holes = b"", []
                break
            text = to_json(signal, data)
            # In OTLP/JSON trace and span ids are hex; other bytes values are base64.
            encode = (lambda b: b.hex().encode()) if traces else _b64
            json_holes = _holes(
                text, [encode(s) for s in slots], trace_slot.hex().encode() if traces else None
            )
            if json_holes:
                break
        self.size = len(data)
        self.json_size = len(text)
        self._proto = _cut(data, holes)
        self._json = _cut(text, json_holes)

    @staticmethod
    def _fill(
        cut: tuple[list[bytes], list[int], bytes], trace_id: bytes, ids: list[bytes]
    ) -> bytes:
        pieces, fills, tail = cut
        parts: list[bytes] = []
        append = parts.append
        for piece, n in zip(pieces, fills, strict=True):
            append(piece)
            append(trace_id if n < 0 else ids[n])
        append(tail)
        return b"".join(parts)

    def make(self, request: int) -> bytes:
        """The request's protobuf body: record n has id ``record_id(request, n)``."""
        base = request << 16
        trace_id = b"\x5a" * 8 + request.to_bytes(8, "big")
        ids = [(base | n).to_bytes(8, "big") for n in range(self.records)]
        return self._fill(self._proto, trace_id, ids)

    def make_json(self, request: int) -> bytes:
        """The same request as OTLP/JSON."""
        if not self._json[0] and not self._json[2]:
            raise ValueError("this template was built with_json=False")
        base = request << 16
        raw = [(base | n).to_bytes(8, "big") for n in range(self.records)]
        if self.signal == "traces":
            trace_id = (b"\x5a" * 8 + request.to_bytes(8, "big")).hex().encode()
            return self._fill(self._json, trace_id, [r.hex().encode() for r in raw])
        return self._fill(self._json, b"", [_b64(r) for r in raw])


def to_json(signal: str, body: bytes) -> bytes:
    """The OTLP/JSON form of a protobuf body (trace and span ids as hex)."""
    message = REQUEST_TYPES[signal]()
    message.ParseFromString(body)
    tree = json_format.MessageToDict(message)

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (
                    base64.b64decode(v).hex()
                    if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str)
                    else fix(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return orjson.dumps(fix(tree))


# --- reading ids back ----------------------------------------------------------------


def decompress_object(key: str, body: bytes) -> bytes:
    if key.endswith(".gz"):
        return gzip.decompress(body)
    if key.endswith(".zst"):
        return _decompress_object(body, "zstd")  # every frame: one per staged payload
    return body


def signal_of_key(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    signal = name.split("_", 1)[0]
    if signal not in SIGNALS:
        raise ValueError(f"object key names no signal: {key}")
    return signal


def _attr_id(attributes: Any) -> int | None:
    for kv in attributes:
        if kv.key == ID_KEY:
            return int.from_bytes(kv.value.bytes_value, "big")
    return None


def iter_ids(signal: str, message: Any) -> Iterator[int | None]:
    """The id of every record in a request, in order (None where a record has none)."""
    if signal == "traces":
        for rs in message.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    yield int.from_bytes(span.span_id, "big") if len(span.span_id) == 8 else None
    elif signal == "logs":
        for rl in message.resource_logs:
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    yield _attr_id(rec.attributes)
    else:
        for rm in message.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if kind is None:
                        continue
                    for point in getattr(metric, kind).data_points:
                        yield _attr_id(point.attributes)


def ids_in_payload(signal: str, data: bytes) -> list[int | None]:
    message = REQUEST_TYPES[signal]()
    message.ParseFromString(data)
    return list(iter_ids(signal, message))
