"""The compiled OTLP walker (otelworker/_wire.c), or None where the install had no C
compiler (setup.py builds it optionally): each caller then takes the Python path the
walker mirrors, slower but the same answer.

Importing this configures the walker's :func:`inspect` with the schema of the installed
protobuf descriptors (:func:`schema`): the fields it checks are the ones upb knows."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

compiled: ModuleType | None
try:
    from otelworker import _wire as compiled
except ImportError:  # pragma: no cover - an install without a C compiler
    compiled = None

# The walker's kinds of field (_wire.c's K_*) and roles of message (R_*).
K_VARINT, K_FIXED64, K_FIXED32, K_STRING, K_BYTES, K_MESSAGE = range(1, 7)
R_NONE, R_SPAN, R_LOG, R_POINT, R_RESOURCE, R_METRIC = range(6)

_KINDS = {
    FieldDescriptor.TYPE_DOUBLE: K_FIXED64,
    FieldDescriptor.TYPE_FLOAT: K_FIXED32,
    FieldDescriptor.TYPE_INT64: K_VARINT,
    FieldDescriptor.TYPE_UINT64: K_VARINT,
    FieldDescriptor.TYPE_INT32: K_VARINT,
    FieldDescriptor.TYPE_FIXED64: K_FIXED64,
    FieldDescriptor.TYPE_FIXED32: K_FIXED32,
    FieldDescriptor.TYPE_BOOL: K_VARINT,
    FieldDescriptor.TYPE_STRING: K_STRING,
    FieldDescriptor.TYPE_MESSAGE: K_MESSAGE,
    FieldDescriptor.TYPE_BYTES: K_BYTES,
    FieldDescriptor.TYPE_UINT32: K_VARINT,
    FieldDescriptor.TYPE_ENUM: K_VARINT,
    FieldDescriptor.TYPE_SFIXED32: K_FIXED32,
    FieldDescriptor.TYPE_SFIXED64: K_FIXED64,
    FieldDescriptor.TYPE_SINT32: K_VARINT,
    FieldDescriptor.TYPE_SINT64: K_VARINT,
}

# The messages whose fields are the door's facts, and which fields (by name: the numbers
# come from the descriptors). Times are read from the first field, else the second.
_TRACE = "opentelemetry.proto.trace.v1."
_LOGS = "opentelemetry.proto.logs.v1."
_METRICS = "opentelemetry.proto.metrics.v1."
_ROLES: dict[str, tuple[int, str, str]] = {
    _TRACE + "Span": (R_SPAN, "start_time_unix_nano", "end_time_unix_nano"),
    _LOGS + "LogRecord": (R_LOG, "time_unix_nano", "observed_time_unix_nano"),
    _METRICS + "NumberDataPoint": (R_POINT, "time_unix_nano", ""),
    _METRICS + "HistogramDataPoint": (R_POINT, "time_unix_nano", ""),
    _METRICS + "ExponentialHistogramDataPoint": (R_POINT, "time_unix_nano", ""),
    _METRICS + "SummaryDataPoint": (R_POINT, "time_unix_nano", ""),
    "opentelemetry.proto.resource.v1.Resource": (R_RESOURCE, "attributes", ""),
    _METRICS + "Metric": (R_METRIC, "", ""),
}

ROOTS = (
    trace_service_pb2.ExportTraceServiceRequest.DESCRIPTOR,
    metrics_service_pb2.ExportMetricsServiceRequest.DESCRIPTOR,
    logs_service_pb2.ExportLogsServiceRequest.DESCRIPTOR,
)


def _repeated(field: FieldDescriptor) -> bool:
    # protobuf 6.31+ says is_repeated (7 dropped label); before, only label.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    label = getattr(field, "label")  # noqa: B009 - gone from the stubs of protobuf 7
    return bool(label == FieldDescriptor.LABEL_REPEATED)


def schema() -> tuple[list[Any], tuple[int, int, int]]:
    """The messages reachable from the three requests, as ``configure`` takes them:
    (role, a, b, oneof mask, [(number, kind, repeated, child index)]) each, and the
    requests' indexes."""
    index: dict[str, int] = {}
    order: list[Descriptor] = []

    def visit(descriptor: Descriptor) -> int:
        if descriptor.full_name not in index:
            index[descriptor.full_name] = len(order)
            order.append(descriptor)
            for field in descriptor.fields:
                if field.message_type is not None:
                    visit(field.message_type)
        return index[descriptor.full_name]

    roots = (visit(ROOTS[0]), visit(ROOTS[1]), visit(ROOTS[2]))
    messages: list[Any] = []
    for descriptor in order:
        fields = []
        for field in descriptor.fields:
            kind = _KINDS[field.type]  # a group (proto2 only) has no kind: KeyError
            child = -1
            if field.message_type is not None:
                child = index[field.message_type.full_name]
            repeated = _repeated(field)
            fields.append((field.number, kind, int(repeated), child))
        role, first, second = _ROLES.get(descriptor.full_name, (R_NONE, "", ""))
        a = descriptor.fields_by_name[first].number if first else 0
        b = descriptor.fields_by_name[second].number if second else 0
        oneof = 0
        if role == R_METRIC:
            for field in descriptor.oneofs_by_name["data"].fields:
                oneof |= 1 << field.number
        if a >= 32 or b >= 32 or oneof >= 1 << 64:
            raise ValueError(f"{descriptor.full_name}: fact fields past the walker's range")
        messages.append((role, a, b, oneof, fields))
    return messages, roots


if compiled is not None:
    compiled.configure(*schema())
