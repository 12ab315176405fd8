"""Object keys follow the OpenTelemetry Collector's awss3exporter layout for ``otlp_proto``."""

from __future__ import annotations

import gzip
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otelworker.compression import decompress_object
from otelworker.metrics import Metrics
from otelworker.processing.export import Exporter, compress
from otelworker.settings import Compression
from otelworker.sinks.base import object_key
from otelworker.sinks.local import LocalObjectStore
from otelworker.staging.queue import Claimed, Manifest, RetryPolicy

BATCH = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
AT = datetime(2024, 3, 7, 5, 9, 42, tzinfo=UTC)

LAYOUT = re.compile(
    r"^(?P<prefix>.+/)?year=(?P<year>\d{4})/month=(?P<month>\d{2})/day=(?P<day>\d{2})"
    r"/hour=(?P<hour>\d{2})/minute=(?P<minute>\d{2})"
    r"/(?P<signal>traces|metrics|logs)_(?P<uuid>[0-9a-f-]{36})(?P<ext>\.binpb(?:\.gz|\.zst)?)$"
)


@pytest.mark.parametrize(
    ("compression", "extension"),
    [
        (Compression.GZIP, ".binpb.gz"),
        (Compression.ZSTD, ".binpb.zst"),
        (Compression.NONE, ".binpb"),
    ],
)
def test_key_layout_per_compression(compression: Compression, extension: str) -> None:
    key = object_key("otel", "traces", BATCH, AT, compression)
    assert key == (f"otel/year=2024/month=03/day=07/hour=05/minute=09/traces_{BATCH}{extension}")


@pytest.mark.parametrize("signal", ["traces", "metrics", "logs"])
def test_key_names_the_signal(signal: str) -> None:
    key = object_key("otel", signal, BATCH, AT, Compression.GZIP)
    match = LAYOUT.match(key)
    assert match is not None, key
    assert match["signal"] == signal
    assert uuid.UUID(match["uuid"]) == BATCH


@pytest.mark.parametrize(
    ("prefix", "expected_start"),
    [
        ("otel", "otel/year="),
        ("otel/", "otel/year="),
        ("/a/b/", "a/b/year="),
        ("tenant-1/raw", "tenant-1/raw/year="),
        ("", "year="),
        ("/", "year="),
    ],
)
def test_key_prefix_normalised(prefix: str, expected_start: str) -> None:
    key = object_key(prefix, "logs", BATCH, AT, Compression.GZIP)
    assert key.startswith(expected_start), key
    assert "//" not in key
    assert not key.startswith("/")


@pytest.mark.parametrize(
    ("prefix", "expected_start"),
    [("otel", "otel/team-a/year="), ("", "team-a/year="), ("/a/b/", "a/b/team-a/year=")],
)
def test_key_puts_the_tenant_under_the_prefix(prefix: str, expected_start: str) -> None:
    key = object_key(prefix, "logs", BATCH, AT, Compression.GZIP, "team-a")
    assert key.startswith(expected_start), key
    assert LAYOUT.match(key) is not None


def test_key_fields_are_zero_padded() -> None:
    at = datetime(2025, 1, 2, 3, 4, tzinfo=UTC)
    key = object_key("p", "metrics", BATCH, at, Compression.NONE)
    assert "/year=2025/month=01/day=02/hour=03/minute=04/" in key


# --- the exporter writes its objects under the layout, at the UTC upload time ------------


class RecordingQueue:
    """A behavioural QueuePort fake that completes every batch."""

    def __init__(self) -> None:
        self.manifests: list[Manifest] = []

    async def claim(
        self,
        limit: int,
        lease_s: float,
        token: uuid.UUID,
        max_bytes: int = 1 << 62,
        held: Sequence[int] = (),
    ) -> list[Claimed]:
        return []

    async def renew(self, ids: Sequence[int], lease_s: float, token: uuid.UUID) -> None:
        return None

    async def complete(self, manifest: Manifest, ids: Sequence[int], token: uuid.UUID) -> bool:
        self.manifests.append(manifest)
        return True

    async def fail(
        self,
        ids: Sequence[int],
        token: uuid.UUID,
        error: str,
        policy: RetryPolicy,
        *,
        counts: bool = True,
        step: int | None = None,
    ) -> list[tuple[int, str]]:
        raise AssertionError("no failure expected")

    async def kill(self, ids: Sequence[int], token: uuid.UUID, error: str) -> None:
        raise AssertionError("no poison expected")

    async def release(self, ids: Sequence[int], token: uuid.UUID) -> None:
        return None


def _traces_payload(span_id: bytes) -> bytes:
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id = b"\x01" * 16
    span.span_id = span_id
    span.name = "op"
    span.start_time_unix_nano = 1_700_000_000_000_000_000
    span.end_time_unix_nano = 1_700_000_000_500_000_000
    return request.SerializeToString()


DECOMPRESS = {
    Compression.GZIP: gzip.decompress,
    Compression.ZSTD: lambda b: decompress_object(b, "zstd"),
    Compression.NONE: lambda b: b,
}


@pytest.mark.parametrize("compression", list(Compression))
async def test_exporter_writes_under_layout_at_utc_now(
    tmp_path: object, compression: Compression
) -> None:
    store = LocalObjectStore(str(tmp_path))
    queue = RecordingQueue()
    uploaded: list[list[int]] = []
    exporter = Exporter(
        queue,
        store,
        Metrics(),
        token=uuid.uuid4(),
        prefix="otel/",
        compression=compression,
        retry=RetryPolicy(3, 10, 100),
        on_uploaded=uploaded.append,
    )
    items = [Claimed(i, "traces", _traces_payload(i.to_bytes(8, "big")), 1, 0) for i in range(1, 4)]
    batch = list(items)
    before = datetime.now(UTC).replace(second=0, microsecond=0)
    await exporter.flush("traces", batch)
    after = datetime.now(UTC)
    # Once the object is stored the flush lets go of the payloads and says which ids.
    assert batch == []
    assert uploaded == [[1, 2, 3]]

    assert len(queue.manifests) == 1
    manifest = queue.manifests[0]
    match = LAYOUT.match(manifest.object_key)
    assert match is not None, manifest.object_key
    assert match["prefix"] == "otel/default/"  # {S3_PREFIX}/{tenant}/
    assert manifest.tenant == "default"
    assert match["signal"] == "traces"
    assert uuid.UUID(match["uuid"]) == manifest.batch_id
    expected_ext = {
        Compression.GZIP: ".binpb.gz",
        Compression.ZSTD: ".binpb.zst",
        Compression.NONE: ".binpb",
    }[compression]
    assert match["ext"] == expected_ext
    stamped = datetime(
        int(match["year"]),
        int(match["month"]),
        int(match["day"]),
        int(match["hour"]),
        int(match["minute"]),
        tzinfo=UTC,
    )
    # The partition is the UTC minute of the upload (not local time, not the record time).
    assert before <= stamped <= after, (before, stamped, after)

    # The object is where the key says, and is one request holding all three spans.
    async def listed() -> AsyncIterator[str]:
        async for obj in store.list(""):
            yield obj.key

    assert [k async for k in listed()] == [manifest.object_key]
    body = await store.get(manifest.object_key)
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(DECOMPRESS[compression](body))
    ids = [s.span_id for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert ids == [i.to_bytes(8, "big") for i in range(1, 4)]
    assert manifest.item_count == 3
    assert manifest.record_count == 3
    assert manifest.compressed_bytes == len(body)
    assert manifest.raw_bytes == sum(len(i.payload) for i in items)
    assert manifest.min_time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert manifest.max_time == manifest.min_time + timedelta(milliseconds=500)


@pytest.mark.parametrize("level", [None, 1, 3, 4, 9])
def test_gzip_levels_write_standard_gzip(level: int | None) -> None:
    # Levels 1-3 go through ISA-L, higher ones through zlib; both are plain gzip to a reader.
    raw = b"".join(_traces_payload(i.to_bytes(8, "big")) for i in range(1, 200))
    body = compress(raw, Compression.GZIP, level)
    assert body[:2] == b"\x1f\x8b"
    assert gzip.decompress(body) == raw
    assert len(body) < len(raw) // 2
