"""End to end: OTel SDK exporters -> the service -> PostgreSQL -> S3 (moto) / a local directory.

Every record acknowledged must be in exactly one object the manifest names, the manifest's
counts must add up, the keys must follow the awss3exporter layout, and the queue must be
empty afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.objects import (
    EXTENSIONS,
    KEY_LAYOUT,
    S3Access,
    Sent,
    Store,
    Telemetry,
    decompress,
    manifest_rows,
    migrate,
    queue_rows,
    read_exported,
    span_request,
    stage_rows,
    wait_drained,
    wait_for,
)
from tests.support.server import running_service

pytestmark = pytest.mark.integration

SPANS, POINTS, LOGS = 120, 90, 75
BATCH_MAX = 10
DEADLINE_S = 120  # a deadline, not a wait: generous for a loaded CI machine

FAST = {
    "poll_interval_ms": 50,
    "batch_flush_interval_ms": 50,
    "batch_max_size": BATCH_MAX,
    "lease_timeout_s": 10,
    "shutdown_grace_s": 5,
    "log_aggregation_window_s": 0,
}


def s3_settings(s3_server: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_bucket": bucket,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
        "s3_region": getattr(s3_server, "region", None) or "us-east-1",
        "s3_force_path_style": True,
        "s3_create_bucket": True,
        **extra,
    }


async def count_queue(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ingestion_queue"))
    finally:
        await conn.close()


def assert_exactly_once(sent: Sent, exported: Any) -> None:
    for signal in ("traces", "metrics", "logs"):
        got = exported.counts(signal)
        want = Counter(sent.acked[signal])
        assert sum(want.values()) > 0
        missing = want - got
        extra = got - want
        assert not missing, f"{signal}: {sum(missing.values())} acknowledged records not exported"
        assert not extra, f"{signal}: {sum(extra.values())} records exported twice or never sent"


def assert_manifest_consistent(
    exported: Any, store: Store, *, prefix: str, compression: str, service_name: str
) -> None:
    assert exported.manifest, "no objects"
    for row, obj in zip(exported.manifest, exported.objects, strict=True):
        key = row["object_key"]
        match = KEY_LAYOUT.match(key)
        assert match is not None, key
        assert match["prefix"] == prefix
        assert match["signal"] == row["signal"] == obj.signal
        assert match["ext"] == EXTENSIONS[compression]
        assert uuid.UUID(match["uuid"]) == row["batch_id"]
        # The partition is the UTC upload minute, just before the manifest row's commit.
        stamped = datetime(
            *(int(match[f]) for f in ("year", "month", "day", "hour", "minute")), tzinfo=UTC
        )
        created = row["created_at"].astimezone(UTC)
        assert stamped <= created < stamped + timedelta(minutes=2), (key, created)

        assert row["record_count"] == len(obj.ids)
        assert row["compressed_bytes"] == obj.size
        assert row["raw_bytes"] == len(decompress(key, store.get(key)))
        if compression == "none":
            assert row["raw_bytes"] == row["compressed_bytes"]
        # One staged request per item; each SDK request carries one resource.
        field = {"traces": "resource_spans", "metrics": "resource_metrics", "logs": "resource_logs"}
        assert row["item_count"] == len(getattr(obj.request, field[obj.signal]))
        assert 1 <= row["item_count"] <= BATCH_MAX
        assert row["service_names"] == [service_name]
        assert row["min_time"] is not None and row["max_time"] is not None
        assert row["min_time"] <= row["max_time"]
    assert len(set(exported.keys)) == len(exported.keys)


def assert_counts_add_up(sent: Sent, exported: Any) -> None:
    for signal in ("traces", "metrics", "logs"):
        rows = [r for r in exported.manifest if r["signal"] == signal]
        assert sum(r["record_count"] for r in rows) == len(sent.acked[signal])
    # Every acknowledged request was staged as one item and exported in one object.
    assert sum(r["item_count"] for r in exported.manifest) == sent.requests


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_sdk_records_land_in_s3_exactly_once(
    database_url: str, s3_server: Any, s3_bucket: str, compression: str
) -> None:
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket, s3_compression=compression),
        **FAST,
    ) as svc:
        telemetry = Telemetry(svc.url, service_name="e2e")
        sent = await asyncio.to_thread(telemetry.send_all, SPANS, POINTS, LOGS)
        assert sent.refused == {"traces": [], "metrics": [], "logs": []}
        assert len(sent.acked["traces"]) == SPANS
        assert len(sent.acked["metrics"]) == POINTS
        assert len(sent.acked["logs"]) == LOGS
        assert sent.requests >= 40
        status = await wait_drained(database_url, within_s=DEADLINE_S)
        assert status == {}, status  # nothing dead either
        store = Store(s3=S3Access.of(s3_server, s3_bucket))
        exported = await read_exported(database_url, store)

    assert await count_queue(database_url) == 0
    assert_exactly_once(sent, exported)
    assert_counts_add_up(sent, exported)
    assert_manifest_consistent(
        exported, store, prefix="otel/default", compression=compression, service_name="e2e"
    )
    # Every object in the bucket is in the manifest: no orphans on the happy path.
    assert store.keys() == sorted(exported.keys)
    head = store.head(exported.keys[0])
    assert head["ContentType"] == "application/x-protobuf"
    if compression != "none":
        assert head.get("ContentEncoding") == compression
    # The CRC-32 the exporter computed (with ISA-L) is the object's, in S3's form.
    for key in exported.keys:
        body = store.get(key)
        expected = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        assert store.head(key).get("ChecksumCRC32") == expected, key


async def test_local_directory_store(database_url: str, tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    async with running_service(
        database_url=database_url,
        s3_bucket=None,
        local_object_dir=str(objects),
        s3_prefix="local/otel",
        **FAST,
    ) as svc:
        assert svc.service.store is not None
        assert type(svc.service.store).__name__ == "LocalObjectStore"
        telemetry = Telemetry(svc.url, service_name="local-e2e")
        sent = await asyncio.to_thread(telemetry.send_all, 40, 30, 25)
        assert sum(len(v) for v in sent.refused.values()) == 0
        await wait_drained(database_url, within_s=DEADLINE_S)
        store = Store(local_dir=objects)
        exported = await read_exported(database_url, store)

    assert await count_queue(database_url) == 0
    assert_exactly_once(sent, exported)
    assert_counts_add_up(sent, exported)
    assert_manifest_consistent(
        exported, store, prefix="local/otel/default", compression="gzip", service_name="local-e2e"
    )
    assert store.keys() == sorted(exported.keys)  # no temp files left behind


async def test_full_batches_flush_at_once_and_shutdown_flushes_the_open_one(
    database_url: str, s3_server: Any, s3_bucket: str
) -> None:
    """25 staged items, BATCH_MAX_SIZE 10, a flush timer far away: two full batches go at
    once; the open batch of five waits (claimed, in memory) until the graceful stop flushes it.
    """
    await migrate(database_url)
    span_ids = [n.to_bytes(8, "big") for n in range(1, 26)]
    ids = await stage_rows(database_url, [("traces", span_request([s]), 1) for s in span_ids])
    assert len(ids) == 25
    store = Store(s3=S3Access.of(s3_server, s3_bucket))
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket),
        **{**FAST, "batch_flush_interval_ms": 600_000, "batch_max_size": 10},
    ):
        full = await wait_for(
            lambda: manifest_rows(database_url),
            lambda rows: len(rows) >= 2,
            within_s=DEADLINE_S,
            what="the two full batches",
        )
        assert sorted(r["item_count"] for r in full) == [10, 10]
        left = await queue_rows(database_url)
        # The remainder is claimed and held in an open batch, not exported, not lost.
        assert len(left) == 5
        assert {r["status"] for r in left} == {"processing"}
        assert {r["id"] for r in left} == set(ids[20:])
    # The graceful stop flushed the open batch (it did not wait ten minutes for the timer).
    exported = await read_exported(database_url, store)
    assert sorted(r["item_count"] for r in exported.manifest) == [5, 10, 10]
    assert await count_queue(database_url) == 0
    assert sorted(exported.ids("traces")) == sorted(s.hex() for s in span_ids)
    assert all(r["service_names"] == ["staged"] for r in exported.manifest)


async def test_buffer_and_batches_stay_within_their_limits(
    database_url: str, s3_server: Any, s3_bucket: str
) -> None:
    """A backlog larger than the buffer: payloads held never exceed PROCESSING_QUEUE_MAX_DEPTH.

    An item frees its room once its object is stored and stays claimed until its index
    commit, so claims may exceed the buffer by at most the batches in flight."""
    await migrate(database_url)
    await stage_rows(
        database_url,
        [("traces", span_request([n.to_bytes(8, "big")]), 1) for n in range(1, 201)],
    )
    capacity = 15
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket),
        **{
            **FAST,
            "processing_queue_max_depth": capacity,
            "batch_max_size": 4,
            "worker_concurrency": 2,
        },
    ) as svc:
        pipeline = svc.service.pipeline
        assert pipeline is not None
        processing: list[int] = []
        depths: list[int] = []

        async def sample() -> None:
            while True:
                depths.append(pipeline.buffer.depth)
                rows = await queue_rows(database_url)
                processing.append(sum(1 for r in rows if r["status"] == "processing"))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            await wait_drained(database_url, within_s=DEADLINE_S)
        finally:
            sampler.cancel()
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))

    # A single worker never holds more payloads than its buffer, nor more claims than its
    # buffer plus the batches still committing their index.
    assert depths and max(depths) <= capacity
    assert processing and max(processing) <= capacity + 2 * 4
    assert max(processing) > 0
    assert all(r["item_count"] <= 4 for r in exported.manifest)
    assert sum(r["item_count"] for r in exported.manifest) == 200
    assert len(exported.ids("traces")) == len(set(exported.ids("traces"))) == 200
