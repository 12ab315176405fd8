"""Compaction with the S3 object store (otelworker/sinks/s3.py) against the session's real
S3 server and PostgreSQL: OTLP objects of all three signals and two tenants are read from
the bucket, their Parquet files written back to it; every record is in exactly one
recorded file (read back from S3 with boto3 and pyarrow, apart from the service's own
client), the manifest rows describe the files in the bucket (size, metadata, content
type, no file unrecorded), and ``otelworker query`` answers counts by fetching them from
S3. A store that cannot be reached fails the pass, counted as object_store_error.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otelworker.columnar.compact import PARQUET_CONTENT_TYPE, Compactor
from otelworker.exceptions import ObjectStoreError
from otelworker.metrics import Metrics
from otelworker.settings import Settings, load_settings
from otelworker.sinks.base import ObjectStore
from otelworker.sinks.factory import open_store
from tests.integration.test_failures import proxied_s3, s3_settings
from tests.support.columnar import cli
from tests.support.compaction import (
    PREFIX,
    Seeded,
    assert_exactly_once,
    hour_of,
    migrated_pool,
    seed,
)
from tests.support.objects import S3Access

pytestmark = pytest.mark.integration

SIGNALS = ("traces", "logs", "metrics")
TENANTS = ("acme", "globex")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url) as p:
        yield p


def settings_for(database_url: str, s3_server: Any, bucket: str, **extra: Any) -> Settings:
    return load_settings(
        database_url=database_url, s3_prefix=PREFIX, **s3_settings(s3_server, bucket, **extra)
    )


@pytest.fixture
async def store(database_url: str, s3_server: Any, s3_bucket: str) -> AsyncIterator[ObjectStore]:
    s3 = await open_store(settings_for(database_url, s3_server, s3_bucket))
    try:
        yield s3
    finally:
        await s3.close()


def bucket_reader(access: S3Access) -> tuple[Callable[[str], bytes], Callable[[str], list[str]]]:
    """``get(key)`` and ``keys(prefix)`` on the bucket, with boto3 (not the service's client)."""
    client = access.client()

    def get(key: str) -> bytes:
        body: bytes = client.get_object(Bucket=access.bucket, Key=key)["Body"].read()
        return body

    def keys(prefix: str) -> list[str]:
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=access.bucket, Prefix=prefix
        ):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return found

    return get, keys


def query_env(database_url: str, s3_server: Any, bucket: str, tmp_path: Path) -> dict[str, str]:
    """``otelworker query``'s environment: the bucket, and a local object directory that
    does not exist (nothing can be read but from S3)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "S3_", "DATABASE_URL", "LOCAL_OBJECT_DIR", "QUERY_", "AUTH_"))
        and k != "OTELWORKER_TOKEN"
    }
    env.update(
        DATABASE_URL=database_url,
        S3_ENDPOINT_URL=s3_server.endpoint_url,
        S3_BUCKET=bucket,
        S3_ACCESS_KEY_ID=s3_server.access_key_id,
        S3_SECRET_ACCESS_KEY=s3_server.secret_access_key,
        S3_REGION=getattr(s3_server, "region", None) or "us-east-1",
        S3_FORCE_PATH_STYLE="true",
        S3_PREFIX=PREFIX,
        LOCAL_OBJECT_DIR=str(tmp_path / "no-such-directory"),
        QUERY_CACHE_DIR=str(tmp_path / "query-cache"),
        LOG_LEVEL="INFO",
    )
    return env


async def count(env: dict[str, str], sql: str, *args: str) -> tuple[int, set[str]]:
    """The query's ``n``, and the keys it fetched into its cache (``query_file_fetched``)."""
    run = await cli(env, "query", "--format", "json", *args, sql)
    assert run.code == 0, (run.out, run.err)
    [row] = run.json()
    fetched = set(re.findall(r'"object_key": ?"([^"]+)"', run.err))
    return int(row["n"]), fetched


async def test_a_pass_over_s3_records_every_record_once_and_query_reads_it_from_s3(
    pool: asyncpg.Pool,
    store: ObjectStore,
    database_url: str,
    s3_server: Any,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    seeded = Seeded()
    now = datetime.now(UTC)
    first = hour_of(now) - timedelta(hours=2)
    for tenant in TENANTS:
        for signal in SIGNALS:
            for hour in (first, first + timedelta(hours=1)):
                await seed(
                    pool,
                    store,
                    seeded,
                    tenant=tenant,
                    signal=signal,
                    objects=3,
                    records=25,
                    created_at=hour + timedelta(minutes=7),
                )
    metrics = Metrics()
    compactor = Compactor(
        pool, store, prefix=PREFIX, grace_s=300, target_bytes=4096, metrics=metrics
    )
    result = await compactor.run_once(now=now)
    assert (result.unreadable, result.lost_races) == (0, 0)
    assert result.sources == len(seeded.batches) == 2 * 3 * 2 * 3

    get, keys = bucket_reader(S3Access.of(s3_server, s3_bucket))
    # Every record in exactly one recorded file, the files read back from the bucket.
    await assert_exactly_once(pool, get, seeded)

    # The manifest rows describe the files in the bucket, and no file is unrecorded.
    rows = await pool.fetch("SELECT * FROM parquet_files ORDER BY object_key")
    assert len(rows) == result.files
    in_bucket = {k for k in keys(f"{PREFIX}/") if k.endswith(".parquet")}
    assert in_bucket == {r["object_key"] for r in rows}
    head = S3Access.of(s3_server, s3_bucket).client().head_object
    for row in rows:
        key = row["object_key"]
        assert key.startswith(f"{PREFIX}/{row['tenant']}/parquet/{row['table_name']}/date="), key
        meta = head(Bucket=s3_bucket, Key=key)
        assert meta["ContentLength"] == row["compressed_bytes"], key
        assert meta["ContentType"] == PARQUET_CONTENT_TYPE, key
        parquet = pq.read_metadata(pa.BufferReader(get(key)))
        assert parquet.num_rows == row["row_count"], key
        kv = parquet.metadata
        assert kv[b"otelworker.table"].decode() == row["table_name"]
        assert kv[b"otelworker.tenant"].decode() == row["tenant"]
        sources = {uuid.UUID(b) for b in json.loads(kv[b"otelworker.source_batches"])}
        assert sources == set(row["source_batches"]), key
        assert row["service_names"] == ["checkout"]
    assert result.bytes == sum(r["compressed_bytes"] for r in rows)
    assert metrics.registry.get_sample_value(
        "otelworker_compact_bytes_total", {"table": "otel_traces"}
    ) == sum(r["compressed_bytes"] for r in rows if r["table_name"] == "otel_traces")

    # `otelworker query` answers counts, fetching the files from S3 into its cache.
    env = query_env(database_url, s3_server, s3_bucket, tmp_path)
    tables = {"traces": "otel_traces", "logs": "otel_logs", "metrics": "otel_metrics_gauge"}
    for signal, table in tables.items():
        n, fetched = await count(env, f"SELECT count(*) AS n FROM {table}")
        assert n == seeded.records(signal), table
        assert fetched == {r["object_key"] for r in rows if r["table_name"] == table}, table
    acme_logs = len(seeded.ids[("acme", "logs")])
    n, fetched = await count(env, "SELECT count(*) AS n FROM otel_logs", "--tenant", "acme")
    assert n == acme_logs
    assert not fetched  # cached by the query before
    assert not (tmp_path / "no-such-directory").exists()

    # A rerun finds nothing left to do.
    again = await compactor.run_once(now=now)
    assert (again.sources, again.files) == (0, 0)


async def test_an_unreachable_store_fails_the_pass_as_object_store_error(
    pool: asyncpg.Pool,
    store: ObjectStore,
    database_url: str,
    s3_server: Any,
    s3_bucket: str,
    tcp_proxy: Callable[[str, int], Any],
) -> None:
    seeded = Seeded()
    now = datetime.now(UTC)
    at = hour_of(now) - timedelta(hours=1)
    await seed(pool, store, seeded, tenant="t", signal="logs", objects=2, records=5, created_at=at)
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    proxy.refuse()
    settings = settings_for(
        database_url, s3_server, s3_bucket, s3_endpoint_url=endpoint, s3_timeout_s=2
    )
    unreachable = await open_store(settings.model_copy(update={"s3_create_bucket": False}))
    metrics = Metrics()
    try:
        compactor = Compactor(
            pool, unreachable, prefix=PREFIX, grace_s=300, target_bytes=10**9, metrics=metrics
        )
        with pytest.raises(ObjectStoreError):
            await compactor.run_once(now=now)
    finally:
        await unreachable.close()
    failures = metrics.registry.get_sample_value(
        "otelworker_compact_failures_total", {"reason": "object_store_error"}
    )
    assert failures == 1
    # Nothing recorded, and the lag still refreshed from the database: the objects' age.
    assert await pool.fetchval("SELECT count(*) FROM parquet_files") == 0
    lag = metrics.registry.get_sample_value("otelworker_compact_lag_seconds")
    assert lag == pytest.approx((now - at).total_seconds(), abs=0.01)
    # With the store back, the same objects are compacted, each record once.
    back = Compactor(pool, store, prefix=PREFIX, grace_s=300, target_bytes=10**9)
    assert (await back.run_once(now=now)).sources == 2
    get, _ = bucket_reader(S3Access.of(s3_server, s3_bucket))
    await assert_exactly_once(pool, get, seeded)
