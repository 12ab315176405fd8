"""Cut an archived request into requests of at most ``max_bytes`` for replay.

Whole resource entries are packed greedily, in order; an entry is split only when it
alone is larger than the limit, and then by its records (by data points for a metric
that is itself too large), each part keeping its resource and scope. A single record
larger than the limit goes alone, in a request over the limit: nothing smaller holds it.

The request is built on the wire: an Export*ServiceRequest is its resource entries
(field 1) one after another, so a part is the concatenation of the entries' bytes, and
its size is known exactly before it is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.metrics.v1 import metrics_pb2

from otelworker import otlp
from otelworker.archive.reader import (
    LAYOUT,
    filtered,
    metric_points,
    metric_shell,
    service_name,
    shell_into,
)
from otelworker.archive.selection import Window

# A nested message costs its tag (one byte: every field here is numbered below 16) and
# its length (at most five bytes of varint) on top of its own size.
_OVERHEAD = 6
_RESOURCES_FIELD = {
    "traces": "resource_spans",
    "metrics": "resource_metrics",
    "logs": "resource_logs",
}


@dataclass(frozen=True, slots=True)
class Piece:
    """One request to send: a serialized Export*ServiceRequest and its record count."""

    body: bytes
    records: int


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(signal: str) -> bytes:
    field = otlp.REQUEST_TYPES[signal].DESCRIPTOR.fields_by_name[_RESOURCES_FIELD[signal]]
    return _varint(field.number << 3 | 2)


_TAGS: dict[str, bytes] = {signal: _tag(signal) for signal in otlp.SIGNALS}


def _wire(signal: str, entry: Any) -> bytes:
    """A resource entry as it sits in a request: tag, length, bytes."""
    data: bytes = entry.SerializeToString()
    return _TAGS[signal] + _varint(len(data)) + data


def pieces(
    signal: str,
    request: Any,
    *,
    max_bytes: int,
    window: Window | None = None,
    service: str | None = None,
) -> Iterator[Piece]:
    """The records of ``request`` in ``window`` (of resources of ``service``), in requests
    of at most ``max_bytes`` uncompressed bytes. Lazy: one request built at a time."""
    window = window or Window()
    parts: list[bytes] = []
    size = records = 0
    for entry in otlp.resources(signal, request):
        if service is not None and service_name(entry) != service:
            continue
        kept, n = filtered(signal, entry, window)
        if not n:
            continue
        wire = _wire(signal, kept)
        if parts and size + len(wire) > max_bytes:
            yield Piece(b"".join(parts), records)
            parts, size, records = [], 0, 0
        if len(wire) <= max_bytes:
            parts.append(wire)
            size += len(wire)
            records += n
            continue
        del wire
        for part, m in split_entry(signal, kept, max_bytes):
            yield Piece(_wire(signal, part), m)
    if parts:
        yield Piece(b"".join(parts), records)


def _empty_like(message: Any, skip: str) -> Any:
    out = type(message)()
    shell_into(out, message, skip)
    return out


def split_entry(signal: str, entry: Any, max_bytes: int) -> Iterator[tuple[Any, int]]:
    """One resource entry too large for a request, as entries of at most ``max_bytes``
    on the wire, each with the resource and the scopes of its records."""
    scopes_field, records_field = LAYOUT[signal]
    base = _empty_like(entry, scopes_field).ByteSize() + _OVERHEAD
    piece: Any = None
    size = n = 0
    for scope in getattr(entry, scopes_field):
        scope_shell = _empty_like(scope, records_field)
        scope_cost = scope_shell.ByteSize() + _OVERHEAD
        current: Any = None  # this scope's copy in the current piece
        for unit, unit_records in _units(signal, scope, max_bytes - base - scope_cost):
            cost = unit.ByteSize() + _OVERHEAD
            if piece is not None and n and size + cost + (0 if current else scope_cost) > max_bytes:
                yield piece, n
                piece = None
            if piece is None:
                piece = _empty_like(entry, scopes_field)
                size, n, current = base, 0, None
            if current is None:
                current = getattr(piece, scopes_field).add()
                current.CopyFrom(scope_shell)
                size += scope_cost
            getattr(current, records_field).add().CopyFrom(unit)
            size += cost
            n += unit_records
    if piece is not None and n:
        yield piece, n


def _units(signal: str, scope: Any, room: int) -> Iterator[tuple[Any, int]]:
    """What a scope's part is made of: its records, or for metrics each metric (a metric
    larger than ``room`` cut into metrics of fewer data points)."""
    _, records_field = LAYOUT[signal]
    if signal != "metrics":
        for record in getattr(scope, records_field):
            yield record, 1
        return
    for metric in scope.metrics:
        kind, points = metric_points(metric)
        if kind is None or len(points) <= 1 or metric.ByteSize() + _OVERHEAD <= room:
            yield metric, len(points)
            continue
        shell = metrics_pb2.Metric()
        metric_shell(metric, shell)
        shell_cost = shell.ByteSize() + _OVERHEAD
        part: Any = None
        size = n = 0
        for point in points:
            cost = point.ByteSize() + _OVERHEAD
            if part is not None and n and size + cost > room:
                yield part, n
                part = None
            if part is None:
                part = metrics_pb2.Metric()
                part.CopyFrom(shell)
                size, n = shell_cost, 0
            getattr(part, kind).data_points.add().CopyFrom(point)
            size += cost
            n += 1
        if part is not None and n:
            yield part, n
