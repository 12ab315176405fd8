"""Reading an archived object back: fetch, decompress (per the key's extension), decode;
and the records of a resource that fall in a time window (and belong to a service).

Which timestamp is a record's: a span's start time, a data point's time, a log record's
time, else its observed time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf.message import Message

from otelworker import otlp
from otelworker.archive.selection import Window
from otelworker.compression import decompress_object
from otelworker.exceptions import BadPayload
from otelworker.sinks.base import ObjectStore

# Where the records sit in each signal's resource entry: (scopes field, records field).
LAYOUT: dict[str, tuple[str, str]] = {
    "traces": ("scope_spans", "spans"),
    "metrics": ("scope_metrics", "metrics"),
    "logs": ("scope_logs", "log_records"),
}


def decompress(key: str, body: bytes) -> bytes:
    """Undo the compression the key's extension names (``.binpb.gz``, ``.binpb.zst``).

    An object is several gzip members or zstd frames one after another (the flush joins
    one per staged payload; one stream of their joined contents): all of them are read.
    """
    encoding = "gzip" if key.endswith(".gz") else "zstd" if key.endswith(".zst") else None
    if encoding is None:
        return body
    try:
        return decompress_object(body, encoding)
    except Exception as exc:  # OSError, EOFError, ValueError, ZstdError, ...
        raise BadPayload(f"corrupt compressed object {key}: {exc}") from None


def decode(signal: str, key: str, body: bytes) -> Any:
    """The object's Export*ServiceRequest (CPU work: run it in a thread)."""
    try:
        return otlp.decode(signal, decompress(key, body))
    except BadPayload as exc:
        raise BadPayload(f"{key}: {exc}") from None


async def read_object(store: ObjectStore, signal: str, key: str) -> Any:
    """Fetch an object and decode it, the CPU part off the event loop."""
    body = await store.get(key)
    return await asyncio.to_thread(decode, signal, key, body)


def shell_into(target: Message, source: Message, skip: str) -> None:
    """Copy every field of ``source`` but ``skip`` into ``target`` (an entry without its
    records: a resource with its attributes and schema URL, a scope, a metric)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def service_name(resource_entry: Any) -> str | None:
    for attr in resource_entry.resource.attributes:
        if attr.key == "service.name" and attr.value.HasField("string_value"):
            return str(attr.value.string_value)
    return None


def record_time(signal: str, record: Any) -> int:
    """The timestamp a record is selected by (unix nanoseconds; 0 if unset)."""
    if signal == "traces":
        return int(record.start_time_unix_nano)
    if signal == "logs":
        return int(record.time_unix_nano or record.observed_time_unix_nano)
    return int(record.time_unix_nano)


def metric_points(metric: Any) -> tuple[str | None, Any]:
    """The metric's data field name (gauge, sum, ...) and its repeated data points."""
    kind = metric.WhichOneof("data")
    if kind is None:
        return None, ()
    return kind, getattr(metric, kind).data_points


def metric_shell(metric: Any, into: Any) -> Any:
    """Copy a metric without its data points into ``into``; return its data message."""
    kind = metric.WhichOneof("data")
    shell_into(into, metric, kind or "")
    if kind is None:
        return None
    data = getattr(into, kind)
    data.SetInParent()
    shell_into(data, getattr(metric, kind), "data_points")
    return data


def count(signal: str, resource_entry: Any) -> int:
    """Records (spans, data points, log records) in one resource entry."""
    scopes, records = LAYOUT[signal]
    if signal != "metrics":
        return sum(len(getattr(scope, records)) for scope in getattr(resource_entry, scopes))
    return sum(
        len(metric_points(metric)[1])
        for scope in resource_entry.scope_metrics
        for metric in scope.metrics
    )


def filtered(signal: str, resource_entry: Any, window: Window) -> tuple[Any, int]:
    """The resource entry with only the records in ``window``, and how many.

    The entry itself when the window is unbounded (nothing copied); else a copy holding
    the matching records, their scopes (and metrics) and nothing empty.
    """
    if window.unbounded:
        return resource_entry, count(signal, resource_entry)
    scopes, records = LAYOUT[signal]
    out = type(resource_entry)()
    shell_into(out, resource_entry, scopes)
    kept = 0
    for scope in getattr(resource_entry, scopes):
        copy: Any = None
        if signal == "metrics":
            for metric in scope.metrics:
                points = [p for p in metric_points(metric)[1] if window.contains(p.time_unix_nano)]
                if not points:
                    continue
                if copy is None:
                    copy = out.scope_metrics.add()
                    shell_into(copy, scope, "metrics")
                data = metric_shell(metric, copy.metrics.add())
                data.data_points.extend(points)
                kept += len(points)
            continue
        matching = [r for r in getattr(scope, records) if window.contains(record_time(signal, r))]
        if matching:
            copy = getattr(out, scopes).add()
            shell_into(copy, scope, records)
            getattr(copy, records).extend(matching)
            kept += len(matching)
    return out, kept
