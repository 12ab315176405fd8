"""What went in and what came out of the pipeline, for end-to-end assertions.

Out: :func:`read_exported` reads every object that ``export_batches`` lists, from the
S3 bucket (boto3, independent of the service's aiobotocore adapter) or from the local
object directory, decompresses it per its extension, decodes it into the signal's
``Export*ServiceRequest`` and extracts record ids:

- traces: span ids (hex),
- logs: log bodies (string values),
- metrics: ``(metric name, value, time_unix_nano)`` per data point.

In: :class:`Telemetry` makes records with the OpenTelemetry Python SDK and sends them with
the SDK's OTLP/HTTP exporters in many requests of varied sizes, keeping the ids of those
acknowledged (200) apart from those that were not.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import boto3
from botocore.config import Config as BotoConfig
from google.protobuf.message import Message
from opentelemetry.exporter.otlp.proto.http import Compression as OTLPCompression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import (
    InMemoryLogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otelworker.compression import decompress_object

SIGNALS = ("traces", "metrics", "logs")
REQUEST_TYPES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceRequest,
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
}

#: The awss3exporter layout: ``{prefix}/year=/month=/day=/hour=/minute=/{signal}_{uuid}{ext}``.
KEY_LAYOUT = re.compile(
    r"^(?:(?P<prefix>.+)/)?year=(?P<year>\d{4})/month=(?P<month>\d{2})/day=(?P<day>\d{2})"
    r"/hour=(?P<hour>\d{2})/minute=(?P<minute>\d{2})"
    r"/(?P<signal>traces|metrics|logs)_(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}"
    r"-[0-9a-f]{12})(?P<ext>\.binpb(?:\.gz|\.zst)?)$"
)
EXTENSIONS = {"gzip": ".binpb.gz", "zstd": ".binpb.zst", "none": ".binpb"}


# --- reading objects back ----------------------------------------------------------------


def decompress(key: str, body: bytes) -> bytes:
    """Undo the compression the key's extension names (and nothing else)."""
    if key.endswith(".binpb.gz"):
        return gzip.decompress(body)  # every member: the flush joins one per payload
    if key.endswith(".binpb.zst"):
        return decompress_object(body, "zstd")  # every frame
    if key.endswith(".binpb"):
        return body
    raise AssertionError(f"unexpected object extension: {key}")


def signal_of(key: str) -> str:
    match = KEY_LAYOUT.match(key)
    if match is None:
        raise AssertionError(f"object key does not follow the awss3exporter layout: {key}")
    return match["signal"]


def decode_object(key: str, body: bytes) -> Any:
    """The object's Export*ServiceRequest (strict: unknown bytes fail the parse)."""
    message = REQUEST_TYPES[signal_of(key)]()
    message.ParseFromString(decompress(key, body))
    return message


def record_ids(signal: str, message: Any) -> list[Hashable]:
    """The ids of the records in a request, in order (duplicates kept)."""
    if signal == "traces":
        return [
            span.span_id.hex()
            for rs in message.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]
    if signal == "logs":
        return [
            rec.body.string_value
            for rl in message.resource_logs
            for sl in rl.scope_logs
            for rec in sl.log_records
        ]
    out: list[Hashable] = []
    for rm in message.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    continue
                for point in getattr(metric, kind).data_points:
                    which = point.WhichOneof("value") if kind in ("gauge", "sum") else None
                    value = getattr(point, which) if which else point.sum
                    out.append((metric.name, value, point.time_unix_nano))
    return out


@dataclass(frozen=True)
class S3Access:
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    @classmethod
    def of(cls, s3_server: Any, bucket: str) -> S3Access:
        """From the ``s3_server`` fixture (direct, never through a test proxy)."""
        return cls(
            s3_server.endpoint_url,
            bucket,
            s3_server.access_key_id,
            s3_server.secret_access_key,
            getattr(s3_server, "region", "us-east-1") or "us-east-1",
        )


class Store:
    """Read-only access to where the service writes: an S3 bucket or a local directory."""

    def __init__(self, s3: S3Access | None = None, local_dir: str | Path | None = None) -> None:
        if (s3 is None) == (local_dir is None):
            raise ValueError("give exactly one of s3 and local_dir")
        self.s3 = s3
        self.local_dir = Path(local_dir) if local_dir is not None else None
        self._client = s3.client() if s3 is not None else None

    def keys(self, prefix: str = "") -> list[str]:
        if self.s3 is not None:
            keys: list[str] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return sorted(keys)
        assert self.local_dir is not None
        if not self.local_dir.exists():
            return []
        found = (
            p.relative_to(self.local_dir).as_posix()
            for p in self.local_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
        return sorted(k for k in found if k.startswith(prefix))

    def get(self, key: str) -> bytes:
        if self.s3 is not None:
            response = self._client.get_object(Bucket=self.s3.bucket, Key=key)
            data: bytes = response["Body"].read()
            return data
        assert self.local_dir is not None
        return (self.local_dir / key).read_bytes()

    def head(self, key: str) -> dict[str, Any]:
        """S3 object metadata (ContentType, ContentEncoding, the stored ChecksumCRC32, ...)."""
        assert self.s3 is not None
        head: dict[str, Any] = self._client.head_object(
            Bucket=self.s3.bucket, Key=key, ChecksumMode="ENABLED"
        )
        return head

    def put(self, key: str, body: bytes) -> None:
        """Write an object behind the service's back (to make an orphan)."""
        if self.s3 is not None:
            self._client.put_object(Bucket=self.s3.bucket, Key=key, Body=body)
            return
        assert self.local_dir is not None
        path = self.local_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


@dataclass
class ExportedObject:
    key: str
    signal: str
    request: Any
    size: int
    ids: list[Hashable]


@dataclass
class Exported:
    """The manifest and every object it names, decoded."""

    manifest: list[dict[str, Any]]
    objects: list[ExportedObject]

    def ids(self, signal: str) -> list[Hashable]:
        """Record ids of a signal across all objects (duplicates kept)."""
        return [i for obj in self.objects if obj.signal == signal for i in obj.ids]

    def counts(self, signal: str) -> Counter[Hashable]:
        return Counter(self.ids(signal))

    @property
    def keys(self) -> list[str]:
        return [row["object_key"] for row in self.manifest]


async def manifest_rows(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT * FROM export_batches ORDER BY created_at, object_key")
    finally:
        await conn.close()
    return [dict(r) for r in rows]


def _read_all(store: Store, manifest: list[dict[str, Any]]) -> list[ExportedObject]:
    objects = []
    for row in manifest:
        key = row["object_key"]
        body = store.get(key)
        signal = signal_of(key)
        request = decode_object(key, body)
        objects.append(ExportedObject(key, signal, request, len(body), record_ids(signal, request)))
    return objects


async def read_exported(dsn: str, store: Store) -> Exported:
    """Every object the manifest lists, read from the store and decoded."""
    manifest = await manifest_rows(dsn)
    objects = await asyncio.to_thread(_read_all, store, manifest)
    return Exported(manifest, objects)


# --- database probes and direct staging ---------------------------------------------------


def span_request(span_ids: Sequence[bytes], service_name: str = "staged") -> bytes:
    """A canonical ExportTraceServiceRequest holding one span per id (8 bytes each)."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attr = resource_spans.resource.attributes.add()
    attr.key = "service.name"
    attr.value.string_value = service_name
    scope = resource_spans.scope_spans.add()
    now = time.time_ns()
    for n, span_id in enumerate(span_ids):
        span = scope.spans.add()
        span.trace_id = span_id * 2
        span.span_id = span_id
        span.name = f"staged-{n}"
        span.start_time_unix_nano = now
        span.end_time_unix_nano = now + 1000
    return request.SerializeToString()


async def migrate(dsn: str) -> None:
    """Create the schema the way the service does (to stage rows before any service runs)."""
    from otelworker.staging.database import migrate as apply

    conn = await asyncpg.connect(dsn)
    try:
        await apply(conn)
    finally:
        await conn.close()


async def stage_rows(dsn: str, rows: Sequence[tuple[str, bytes, int]]) -> list[int]:
    """Insert ``(signal, payload, record_count)`` rows into ``ingestion_queue``; their ids."""
    conn = await asyncpg.connect(dsn)
    try:
        inserted = await conn.fetch(
            "INSERT INTO ingestion_queue (signal, payload, record_count) "
            "SELECT * FROM unnest($1::text[], $2::bytea[], $3::integer[]) RETURNING id",
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
        )
    finally:
        await conn.close()
    return sorted(r["id"] for r in inserted)


async def queue_rows(dsn: str) -> list[dict[str, Any]]:
    """Every ``ingestion_queue`` row (without payloads), with the database's ``now``."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, signal, status, attempts, available_at, lease_expires_at, lease_token,"
            " received_at, last_error, record_count, now() AS db_now"
            " FROM ingestion_queue ORDER BY id"
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def queue_status(dsn: str) -> dict[str, int]:
    """Rows of ``ingestion_queue`` by status."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM ingestion_queue GROUP BY status")
    finally:
        await conn.close()
    return {r["status"]: int(r["n"]) for r in rows}


async def wait_for(
    probe: Callable[[], Any],
    done: Callable[[Any], bool],
    *,
    within_s: float = 60.0,
    interval: float = 0.1,
    what: str = "",
) -> Any:
    """Await ``probe()`` until ``done(result)``; fail with the last result after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}: last {result!r}")
        await asyncio.sleep(interval)


async def until(predicate: Callable[[], Any], within_s: float = 20.0, what: str = "") -> Any:
    """Await ``predicate()`` until it is truthy; return that value."""
    return await wait_for(predicate, bool, within_s=within_s, interval=0.05, what=what)


async def wait_drained(dsn: str, within_s: float = 60.0) -> dict[str, int]:
    """Until no row is pending, processing or failed (dead rows may stay)."""
    return await wait_for(
        lambda: queue_status(dsn),
        lambda s: not any(s.get(k) for k in ("pending", "processing", "failed")),
        within_s=within_s,
        what="the queue to drain",
    )


# --- sending telemetry -----------------------------------------------------------------


def chunks(items: Sequence[Any], sizes: Iterable[int]) -> list[Sequence[Any]]:
    """Split ``items`` into consecutive chunks cycling through ``sizes``."""
    out: list[Sequence[Any]] = []
    sizes = list(sizes)
    i = n = 0
    while i < len(items):
        size = sizes[n % len(sizes)]
        out.append(items[i : i + size])
        i += size
        n += 1
    return out


CHUNK_SIZES = (1, 7, 3, 12, 5, 2, 9)


@dataclass
class Sent:
    """Record ids the service acknowledged (200) and those it did not, per signal."""

    acked: dict[str, list[Hashable]] = field(default_factory=lambda: {s: [] for s in SIGNALS})
    refused: dict[str, list[Hashable]] = field(default_factory=lambda: {s: [] for s in SIGNALS})
    requests: int = 0


class Telemetry:
    """Spans, metric points and log records made with the OTel SDK, sent with its exporters."""

    def __init__(
        self,
        base_url: str,
        *,
        service_name: str = "e2e",
        tag: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.tag = tag
        self.headers = headers  # on every request (a tenant's X-Scope-OrgID, a token)
        self.resource = Resource.create({"service.name": service_name})
        self.sent = Sent()
        self._seq = 0

    # Records -------------------------------------------------------------------------
    def spans(self, n: int) -> list[Any]:
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=self.resource)
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("tests.e2e")
        for i in range(n):
            with tracer.start_as_current_span(f"op-{self.tag}-{i}") as span:
                span.set_attribute("seq", i)
        provider.shutdown()
        return list(memory.get_finished_spans())

    def log_records(self, n: int) -> list[Any]:
        memory = InMemoryLogRecordExporter()
        provider = LoggerProvider(resource=self.resource)
        provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
        logger = provider.get_logger("tests.e2e")
        for i in range(n):
            logger.emit(body=f"log-{self.tag}-{i}", attributes={"seq": i}, timestamp=time.time_ns())
        provider.shutdown()
        return list(memory.get_finished_logs())

    def metric_points(self, n: int) -> list[NumberDataPoint]:
        now = time.time_ns()
        points = []
        for _ in range(n):
            self._seq += 1
            points.append(
                NumberDataPoint(
                    attributes={"seq": self._seq},
                    start_time_unix_nano=now - 1_000_000_000,
                    time_unix_nano=now + self._seq,
                    value=self._seq * 10,
                )
            )
        return points

    def _metrics_data(self, points: Sequence[NumberDataPoint]) -> MetricsData:
        metric = Metric(
            name=f"e2e.gauge{self.tag}",
            description="",
            unit="1",
            data=Gauge(data_points=list(points)),
        )
        scope = ScopeMetrics(
            scope=InstrumentationScope("tests.e2e"), metrics=[metric], schema_url=""
        )
        return MetricsData(
            resource_metrics=[
                ResourceMetrics(resource=self.resource, scope_metrics=[scope], schema_url="")
            ]
        )

    # Ids as the objects show them ------------------------------------------------------
    @staticmethod
    def span_id(span: Any) -> str:
        return f"{span.context.span_id:016x}"

    @staticmethod
    def log_id(record: Any) -> str:
        log = getattr(record, "log_record", record)
        return str(log.body)

    def point_id(self, point: NumberDataPoint) -> tuple[str, int, int]:
        return (f"e2e.gauge{self.tag}", int(point.value), point.time_unix_nano)

    # Sending -------------------------------------------------------------------------
    def send_spans(self, spans: Sequence[Any], *, sizes: Iterable[int] = CHUNK_SIZES) -> None:
        exporter = OTLPSpanExporter(
            endpoint=f"{self.base_url}/v1/traces",
            compression=OTLPCompression.Gzip,
            timeout=10,
            headers=self.headers,
        )
        try:
            for chunk in chunks(spans, sizes):
                ok = exporter.export(chunk) is SpanExportResult.SUCCESS
                self._note("traces", ok, [self.span_id(s) for s in chunk])
        finally:
            exporter.shutdown()

    def send_logs(self, records: Sequence[Any], *, sizes: Iterable[int] = CHUNK_SIZES) -> None:
        exporter = OTLPLogExporter(
            endpoint=f"{self.base_url}/v1/logs", timeout=10, headers=self.headers
        )
        try:
            for chunk in chunks(records, sizes):
                ok = exporter.export(chunk) is LogRecordExportResult.SUCCESS
                self._note("logs", ok, [self.log_id(r) for r in chunk])
        finally:
            exporter.shutdown()

    def send_metrics(
        self, points: Sequence[NumberDataPoint], *, sizes: Iterable[int] = CHUNK_SIZES
    ) -> None:
        exporter = OTLPMetricExporter(
            endpoint=f"{self.base_url}/v1/metrics", timeout=10, headers=self.headers
        )
        try:
            for chunk in chunks(points, sizes):
                result = exporter.export(self._metrics_data(chunk))
                self._note(
                    "metrics",
                    result is MetricExportResult.SUCCESS,
                    [self.point_id(p) for p in chunk],
                )
        finally:
            exporter.shutdown()

    def _note(self, signal: str, ok: bool, ids: list[Hashable]) -> None:
        self.sent.requests += 1
        (self.sent.acked if ok else self.sent.refused)[signal].extend(ids)

    def send_all(self, spans: int, points: int, logs: int) -> Sent:
        """Make and send the records, every signal in many requests; return what was acked."""
        self.send_spans(self.spans(spans))
        self.send_metrics(self.metric_points(points))
        self.send_logs(self.log_records(logs))
        return self.sent


def gzip_members(body: bytes) -> int:
    """gzip members in a body (zlib stops at each member's end)."""
    count = 0
    while body:
        inflater = zlib.decompressobj(wbits=31)
        inflater.decompress(body)
        assert inflater.eof
        body = inflater.unused_data
        count += 1
    return count
