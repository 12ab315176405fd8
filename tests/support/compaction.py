"""A seeded archive for the compaction tests, and what its Parquet copy holds.

The manifest is seeded directly (objects written in the archive's layout into any object
store, local or S3, rows inserted with chosen arrival times) so that windows and hours are
the test's to choose. Every record has an id (a span's or a log record's span id, a gauge
point's attribute ``n``) to check the copy against: :func:`assert_exactly_once`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otelworker.settings import Compression
from otelworker.sinks.base import ObjectStore, object_key
from otelworker.staging.database import migrate

PREFIX = "otel"
NS = 1_767_225_600 * 10**9  # data time: 2026-01-01T00:00:00Z

#: How the tests read a file of the copy back: a local object directory, or a function of
#: the key (an S3 bucket read with boto3, apart from the service's own client).
Where = Path | Callable[[str], bytes]


@dataclass
class Seeded:
    """What the test put in the archive: per (tenant, signal), the record ids."""

    ids: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    batches: list[uuid.UUID] = field(default_factory=list)

    def add(self, tenant: str, signal: str, ids: list[str]) -> None:
        self.ids.setdefault((tenant, signal), []).extend(ids)

    def records(self, signal: str) -> int:
        return sum(len(ids) for (_, s), ids in self.ids.items() if s == signal)


_counter = iter(range(1, 10**9))


def make_request(signal: str, records: int, service: str) -> tuple[Any, list[str]]:
    """A request of ``records`` records, each with a unique id (span id; a log record's
    span id; a gauge point's attribute ``n``)."""
    ids: list[str] = []
    if signal == "traces":
        req: Any = trace_service_pb2.ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = service
        ss = rs.scope_spans.add()
        for _ in range(records):
            n = next(_counter)
            span = ss.spans.add(
                name="op", start_time_unix_nano=NS + n, end_time_unix_nano=NS + n + 5
            )
            span.trace_id = n.to_bytes(16, "big")
            span.span_id = n.to_bytes(8, "big")
            span.attributes.add(key="k").value.int_value = n
            ids.append(span.span_id.hex())
    elif signal == "logs":
        req = logs_service_pb2.ExportLogsServiceRequest()
        rl = req.resource_logs.add()
        rl.resource.attributes.add(key="service.name").value.string_value = service
        sl = rl.scope_logs.add()
        for _ in range(records):
            n = next(_counter)
            rec = sl.log_records.add(time_unix_nano=NS + n, severity_text="INFO")
            rec.span_id = n.to_bytes(8, "big")
            rec.body.string_value = f"line {n}"
            ids.append(rec.span_id.hex())
    else:
        req = metrics_service_pb2.ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.add(key="service.name").value.string_value = service
        metric = rm.scope_metrics.add().metrics.add(name="g")
        for _ in range(records):
            n = next(_counter)
            p = metric.gauge.data_points.add(time_unix_nano=NS + n, as_double=float(n))
            p.attributes.add(key="n").value.string_value = str(n)
            ids.append(str(n))
    return req, ids


async def seed(
    pool: asyncpg.Pool,
    store: ObjectStore,
    seeded: Seeded,
    *,
    tenant: str,
    signal: str,
    objects: int,
    records: int,
    created_at: datetime,
    service: str = "checkout",
) -> None:
    """``objects`` archived objects of ``records`` records, arrived at ``created_at``."""
    for _ in range(objects):
        req, ids = make_request(signal, records, service)
        raw = req.SerializeToString()
        body = gzip.compress(raw)
        batch_id = uuid.uuid4()
        key = object_key(PREFIX, signal, batch_id, created_at, Compression.GZIP, tenant)
        await store.put(key, body, "application/x-protobuf", "gzip")
        await pool.execute(
            "INSERT INTO export_batches (batch_id, signal, object_key, item_count, record_count,"
            " compressed_bytes, raw_bytes, min_time, max_time, service_names, created_at, tenant)"
            " VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $7, $8, $9, $10)",
            batch_id,
            signal,
            key,
            len(ids),
            len(body),
            len(raw),
            datetime.fromtimestamp(NS / 1e9, UTC),
            [service],
            created_at,
            tenant,
        )
        seeded.add(tenant, signal, ids)
        seeded.batches.append(batch_id)


def hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


_ID_COLUMN = {"otel_traces": "SpanId", "otel_logs": "SpanId"}
SIGNAL_OF = {"otel_traces": "traces", "otel_logs": "logs", "otel_metrics_gauge": "metrics"}


def read_file(where: Where, key: str) -> bytes:
    return (where / key).read_bytes() if isinstance(where, Path) else where(key)


def record_ids(body: bytes, table_name: str) -> list[str]:
    """The record ids in a Parquet file's rows, in order."""
    table = pq.read_table(pa.BufferReader(body))
    if table_name in _ID_COLUMN:
        return [str(v) for v in table.column(_ID_COLUMN[table_name]).to_pylist()]
    return [dict(a)["n"] for a in table.column("Attributes").to_pylist()]


async def recorded(pool: asyncpg.Pool, where: Where) -> dict[tuple[str, str], list[str]]:
    """The record ids in the recorded files, per (tenant, signal), read from the files."""
    out: dict[tuple[str, str], list[str]] = {}
    for row in await pool.fetch(
        "SELECT tenant, table_name, object_key, row_count FROM parquet_files"
    ):
        body = await asyncio.to_thread(read_file, where, row["object_key"])
        ids = record_ids(body, row["table_name"])
        assert len(ids) == row["row_count"], row["object_key"]
        out.setdefault((row["tenant"], SIGNAL_OF[row["table_name"]]), []).extend(ids)
    return out


async def assert_exactly_once(pool: asyncpg.Pool, where: Where, seeded: Seeded) -> None:
    """Every seeded record in exactly one recorded file; every source batch compacted and
    named by exactly one file per table; the rows of its files = its record counts."""
    found = await recorded(pool, where)
    for key, ids in seeded.ids.items():
        got = found.get(key, [])
        duplicated = [i for i, c in Counter(got).items() if c > 1]
        assert not duplicated, (key, duplicated[:5])
        assert sorted(got) == sorted(ids), (key, len(got), len(ids))
    assert set(found) <= set(seeded.ids)
    uncompacted = await pool.fetchval(
        "SELECT count(*) FROM export_batches WHERE compacted_at IS NULL"
    )
    assert uncompacted == 0
    named = await pool.fetch("SELECT table_name, unnest(source_batches) AS b FROM parquet_files")
    per = Counter((r["table_name"], r["b"]) for r in named)
    assert all(c == 1 for c in per.values()), [k for k, c in per.items() if c > 1][:5]
    assert {b for _, b in per} == set(seeded.batches)


@contextlib.asynccontextmanager
async def migrated_pool(database_url: str, max_size: int = 6) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's database, its schema migrated as the service does."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=max_size)
    try:
        yield p
    finally:
        await p.close()


def compact_env(database_url: str, root: Path, **settings: str) -> dict[str, str]:
    """The environment of a ``python -m otelworker compact``: no OTEL_ or S3_ setting of
    the caller's, this test's database and object directory, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "S3_"))}
    env.update(DATABASE_URL=database_url, LOCAL_OBJECT_DIR=str(root), S3_PREFIX=PREFIX)
    env.update(settings)
    return env


async def start_compact(env: dict[str, str], cwd: Path, *args: str) -> asyncio.subprocess.Process:
    """``python -m otelworker compact *args``, its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otelworker",
        "compact",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def compacted_count(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM export_batches WHERE compacted_at IS NOT NULL"
    )
    return count


async def until_all_compacted(pool: asyncpg.Pool, within_s: float) -> None:
    """Wait (at most ``within_s``) until no manifest row is left uncompacted."""
    async with asyncio.timeout(within_s):
        left = 1
        while left:
            await asyncio.sleep(0.1)
            left = await pool.fetchval(
                "SELECT count(*) FROM export_batches WHERE compacted_at IS NULL"
            )
