"""Hand-built OTLP requests for the tests: n records each, fresh ids."""

from __future__ import annotations

import gzip
import os
import time
import zlib
from collections.abc import Callable

import cramjam
import zstandard
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

SERVICE = "otelworker-test"


def traces(
    spans: int, service: str = "otelworker-test"
) -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource = request.resource_spans.add()
    resource.resource.attributes.add(key="service.name").value.string_value = service
    scope = resource.scope_spans.add()
    now = time.time_ns()
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id = os.urandom(16)
        span.span_id = os.urandom(8)
        span.name = f"op-{i}"
        span.start_time_unix_nano = now
        span.end_time_unix_nano = now + 1_000_000
    return request


def metrics(
    points: int, service: str = "otelworker-test"
) -> metrics_service_pb2.ExportMetricsServiceRequest:
    request = metrics_service_pb2.ExportMetricsServiceRequest()
    resource = request.resource_metrics.add()
    resource.resource.attributes.add(key="service.name").value.string_value = service
    metric = resource.scope_metrics.add().metrics.add()
    metric.name = "queue.depth"
    now = time.time_ns()
    for i in range(points):
        point = metric.gauge.data_points.add()
        point.time_unix_nano = now + i
        point.as_int = i
    return request


def logs(
    records: int, service: str = "otelworker-test"
) -> logs_service_pb2.ExportLogsServiceRequest:
    request = logs_service_pb2.ExportLogsServiceRequest()
    resource = request.resource_logs.add()
    resource.resource.attributes.add(key="service.name").value.string_value = service
    scope = resource.scope_logs.add()
    now = time.time_ns()
    for i in range(records):
        record = scope.log_records.add()
        record.time_unix_nano = now + i
        record.body.string_value = f"line {i}"
    return request


def unstage(payload: bytes) -> bytes:
    """A staged payload (``ingestion_queue.payload``) as the canonical protobuf request.

    The door stores payloads in the object's codec (``payload_encoding``); told apart here
    by their magic bytes, which no serialized Export*ServiceRequest starts with (its first
    byte is field 1's tag, 0x0a).
    """
    payload = bytes(payload)
    if payload[:2] == b"\x1f\x8b":
        return gzip.decompress(payload)
    if payload[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompress(payload)
    return payload


# A reference encoder for every Content-Encoding the service decodes (other code than its
# decoders: the stdlib, zstandard, cramjam's encoders).
ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
    "deflate": zlib.compress,
    "zlib": zlib.compress,
    "snappy": lambda b: bytes(cramjam.snappy.compress_raw(b)),
    "x-snappy-framed": lambda b: bytes(cramjam.snappy.compress(b)),
    "lz4": lambda b: bytes(cramjam.lz4.compress(b)),
}
