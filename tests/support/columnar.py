"""A small archive with its Parquet copy, for the query and verify tests.

Hand-built requests of all three signals (several resources and scopes, attributes,
events, links, gauge, sum and histogram points) for two tenants go through a real
service into a local object directory; the Parquet copy is then made the way the
compactor makes it: each (tenant, table)'s rows converted with ``to_tables`` from the
OTLP objects, written with ``write_parquet`` under the Hive layout and recorded in
``parquet_files``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.support.objects import wait_drained
from tests.support.server import running_service

ROOT = Path(__file__).resolve().parents[2]
HOUR_NS = 3600 * 10**9
BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
FAST = {
    "poll_interval_ms": 50,
    "batch_flush_interval_ms": 50,
    "batch_max_size": 10,
    "lease_timeout_s": 10,
    "shutdown_grace_s": 5,
    "log_aggregation_window_s": 0,
}


def _attr(attrs: Any, key: str, value: Any) -> None:
    a = attrs.add()
    a.key = key
    if isinstance(value, bool):
        a.value.bool_value = value
    elif isinstance(value, int):
        a.value.int_value = value
    elif isinstance(value, float):
        a.value.double_value = value
    else:
        a.value.string_value = value


@dataclass
class Sent:
    """What one tenant sent, as plain rows for answers computed in Python."""

    spans: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    gauge: list[dict[str, Any]] = field(default_factory=list)
    histogram: list[dict[str, Any]] = field(default_factory=list)
    requests: dict[str, list[bytes]] = field(
        default_factory=lambda: {"traces": [], "logs": [], "metrics": []}
    )


def make_requests(tenant: str, seed: int) -> Sent:
    sent = Sent()
    for r in range(2):  # requests per signal
        traces = trace_service_pb2.ExportTraceServiceRequest()
        logs = logs_service_pb2.ExportLogsServiceRequest()
        metrics = metrics_service_pb2.ExportMetricsServiceRequest()
        for s, service in enumerate(("checkout", "cart")):
            rs = traces.resource_spans.add()
            _attr(rs.resource.attributes, "service.name", service)
            _attr(rs.resource.attributes, "host.cpus", 4 + s)
            scope = rs.scope_spans.add()
            scope.scope.name = "tests.columnar"
            scope.scope.version = "1.0"
            rl = logs.resource_logs.add()
            _attr(rl.resource.attributes, "service.name", service)
            log_scope = rl.scope_logs.add()
            rm = metrics.resource_metrics.add()
            _attr(rm.resource.attributes, "service.name", service)
            ms = rm.scope_metrics.add()
            gauge = ms.metrics.add()
            gauge.name = "queue.depth"
            hist = ms.metrics.add()
            hist.name = "http.server.duration"
            for i in range(5):
                n = seed * 1000 + r * 100 + s * 10 + i
                t = BASE_NS + (r * 5 + i) * 60 * 10**9  # within the first hour
                span = scope.spans.add()
                span.trace_id = n.to_bytes(16, "big")
                span.span_id = (n + 1).to_bytes(8, "big")
                span.name = f"GET /item/{i % 3}"
                span.kind = 2
                span.start_time_unix_nano = t
                span.end_time_unix_nano = t + (i + 1) * 1_000_000 + n
                span.status.code = 2 if i == 4 else 1
                _attr(span.attributes, "http.status_code", 500 if i == 4 else 200)
                _attr(span.attributes, "ratio", 0.5)
                _attr(span.attributes, "cached", i % 2 == 0)
                event = span.events.add()
                event.name = "exception" if i == 4 else "log"
                event.time_unix_nano = t + 10
                link = span.links.add()
                link.trace_id = (n + 7).to_bytes(16, "big")
                link.span_id = (n + 8).to_bytes(8, "big")
                sent.spans.append(
                    {
                        "service": service,
                        "trace_id": span.trace_id.hex(),
                        "duration": span.end_time_unix_nano - t,
                        "error": i == 4,
                        "t": t,
                    }
                )
                log = log_scope.log_records.add()
                log.time_unix_nano = t + 5
                log.severity_number = 17 if i == 4 else 9
                log.severity_text = "ERROR" if i == 4 else "INFO"
                log.body.string_value = f"{tenant} {service} log {n}"
                log.trace_id = span.trace_id
                log.span_id = span.span_id
                sent.logs.append(
                    {
                        "service": service,
                        "trace_id": span.trace_id.hex(),
                        "body": f"{tenant} {service} log {n}",
                    }
                )
                point = gauge.gauge.data_points.add()
                point.time_unix_nano = t
                point.as_double = float(n)
                sent.gauge.append({"service": service, "value": float(n)})
                hp = hist.histogram.data_points.add()
                hp.time_unix_nano = t
                hp.count = 10
                hp.sum = 10.0 * n
                hp.explicit_bounds.extend([1.0, 10.0, 100.0])
                hp.bucket_counts.extend([1, 2, 3, 4])
                sent.histogram.append({"service": service, "count": 10})
        sent.requests["traces"].append(traces.SerializeToString())
        sent.requests["logs"].append(logs.SerializeToString())
        sent.requests["metrics"].append(metrics.SerializeToString())
    return sent


async def send(url: str, tenant: str, sent: Sent) -> None:
    async with httpx.AsyncClient() as client:
        for signal, bodies in sent.requests.items():
            for body in bodies:
                response = await client.post(
                    f"{url}/v1/{signal}",
                    content=body,
                    headers={"Content-Type": "application/x-protobuf", "X-Scope-OrgID": tenant},
                )
                assert response.status_code == 200, response.text


async def compact_by_hand(database_url: str, objects: Path, prefix: str = "otel") -> list[str]:
    """The Parquet copy of every manifest row: one file per (tenant, table)."""
    import pyarrow as pa

    from otelworker.archive.reader import decode
    from otelworker.columnar.convert import time_range, to_tables, write_parquet
    from otelworker.columnar.schema import SCHEMA_VERSION, TIME_COLUMN, parquet_key

    conn = await asyncpg.connect(database_url)
    keys: list[str] = []
    try:
        rows = await conn.fetch(
            "SELECT batch_id, signal, object_key, tenant, service_names, created_at"
            " FROM export_batches ORDER BY created_at"
        )
        groups: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            groups.setdefault((row["tenant"] or "default", row["signal"]), []).append(row)
        for (tenant, signal), members in groups.items():
            parts: dict[str, list[Any]] = {}
            for row in members:
                body = (objects / row["object_key"]).read_bytes()
                request = decode(signal, row["object_key"], body)
                for table, data in to_tables(signal, request, tenant).items():
                    parts.setdefault(table, []).append(data)
            for table, tables in parts.items():
                data = pa.concat_tables(tables)
                if data.num_rows == 0:
                    continue
                file_id = uuid.uuid4()
                start = min(r["created_at"] for r in members)
                key = parquet_key(
                    prefix,
                    tenant,
                    table,
                    start.astimezone(UTC).strftime("%Y-%m-%dT%H"),
                    str(file_id),
                )
                path = objects / key
                path.parent.mkdir(parents=True, exist_ok=True)
                batches = [r["batch_id"] for r in members]
                write_parquet(
                    data, table_name=table, tenant=tenant, source_batches=batches, sink=str(path)
                )
                low, high = time_range(data, TIME_COLUMN[table])
                services = sorted(set(data.column("ServiceName").to_pylist()))
                await conn.execute(
                    "INSERT INTO parquet_files (file_id, tenant, table_name, object_key, row_count,"
                    " compressed_bytes, min_time, max_time, service_names, source_batches,"
                    " window_start, window_end, schema_version)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                    file_id,
                    tenant,
                    table,
                    key,
                    data.num_rows,
                    path.stat().st_size,
                    datetime.fromtimestamp(low / 1e9, UTC) if low is not None else None,
                    datetime.fromtimestamp(high / 1e9, UTC) if high is not None else None,
                    services,
                    batches,
                    start,
                    max(r["created_at"] for r in members),
                    SCHEMA_VERSION,
                )
                keys.append(key)
        await conn.execute("UPDATE export_batches SET compacted_at = now()")
    finally:
        await conn.close()
    return keys


@dataclass
class Copy:
    database_url: str
    objects: Path
    sent: dict[str, Sent]
    keys: list[str]

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("OTEL_", "S3_", "DATABASE_URL", "LOCAL_OBJECT_DIR", "QUERY_", "AUTH_")
            )
            and k != "OTELWORKER_TOKEN"
        }
        env.update(
            DATABASE_URL=self.database_url,
            LOCAL_OBJECT_DIR=str(self.objects),
            QUERY_CACHE_DIR=str(self.objects.parent / "cache"),
            LOG_LEVEL="INFO",
            **extra,
        )
        return env


async def make_copy(database_url: str, tmp_path: Path) -> Copy:
    objects = tmp_path / "objects"
    sent = {"a": make_requests("a", 1), "b": make_requests("b", 2)}
    async with running_service(
        database_url=database_url, local_object_dir=str(objects), **FAST
    ) as svc:
        for tenant, what in sent.items():
            await send(svc.url, tenant, what)
        await wait_drained(database_url, within_s=60)
    keys = await compact_by_hand(database_url, objects)
    return Copy(database_url, objects, sent, keys)


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


async def cli(env: dict[str, str], *args: str) -> Run:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "otelworker", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)
