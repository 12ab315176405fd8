"""A small archive with its Parquet copy, for the query and verify tests.

Hand-built requests of all three signals (several resources and scopes, attributes,
events, links, gauge, sum and histogram points) for two tenants go through a real
service into a local object directory; the compactor itself then makes the Parquet copy
(``python -m otelworker compact --once``, COMPACT_GRACE_S=0).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
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
    copy = Copy(database_url, objects, sent, [])
    run = await cli(copy.env(COMPACT_GRACE_S="0"), "compact", "--once")
    assert run.code == 0, (run.out, run.err)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT object_key FROM parquet_files ORDER BY object_key")
    finally:
        await conn.close()
    copy.keys = [r["object_key"] for r in rows]
    return copy


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
