"""Who may send, and whose data it is: bearer tokens, tenants, per-tenant limits.

Against a real PostgreSQL (and moto's S3 for the end-to-end isolation test), with the
OpenTelemetry SDK's exporters and raw HTTP. Every token comes from
:func:`tests.support.secrets.new_token`, so the session checks that none of them reached a
log line (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.metrics.export import MetricExportResult
from opentelemetry.sdk.trace.export import SpanExportResult

from otelworker import otlp
from tests.integration.test_failures import FAST, s3_settings
from tests.support.objects import (
    KEY_LAYOUT,
    Store,
    Telemetry,
    migrate,
    read_exported,
    span_request,
    stage_rows,
    wait_drained,
)
from tests.support.payloads import traces
from tests.support.secrets import new_token
from tests.support.server import RunningService, running_service

pytestmark = pytest.mark.integration

PROTOBUF = {"Content-Type": "application/x-protobuf"}
DEADLINE_S = 120  # a deadline, not a wait


async def staged_by_tenant(dsn: str) -> dict[str | None, int]:
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch("SELECT tenant, count(*) AS n FROM ingestion_queue GROUP BY 1")
    finally:
        await conn.close()
    return {r["tenant"]: int(r["n"]) for r in found}


def tokens_file(path: Path, entries: list[tuple[str, str]]) -> Path:
    """Write the file anew and swap it in (as a Kubernetes Secret update does)."""
    tmp = path.with_suffix(".tmp")
    lines = ["# tenant token", *(f"{tenant} {token}" for tenant, token in entries)]
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def status_of(response: httpx.Response) -> status_pb2.Status:
    status = status_pb2.Status()
    status.ParseFromString(response.content)
    return status


async def post(
    client: httpx.AsyncClient,
    svc: RunningService,
    headers: dict[str, str],
    signal: str = "traces",
    spans: int = 1,
    content: bytes | None = None,
) -> httpx.Response:
    body = traces(spans).SerializeToString() if content is None else content
    return await client.post(
        svc.endpoint(signal), content=body, headers={**PROTOBUF, **headers}, timeout=30
    )


# --- bearer tokens ------------------------------------------------------------------------


async def test_sdk_exporters_with_a_bearer_token_succeed_on_both_transports(
    database_url: str, tmp_path: Path
) -> None:
    token = new_token()
    path = tokens_file(tmp_path / "tokens", [("team-a", token)])
    headers = {"Authorization": f"Bearer {token}"}
    async with running_service(
        database_url=database_url,
        role="ingress",
        auth_mode="bearer",
        auth_tokens_file=str(path),
        grpc_enabled=True,
        grpc_port=0,
    ) as svc:
        telemetry = Telemetry(svc.url, service_name="auth", tag="a")

        def export_all() -> list[bool]:
            spans = OTLPSpanExporter(
                endpoint=svc.endpoint("traces"), headers=headers, compression=Compression.Gzip
            )
            metrics = OTLPMetricExporter(endpoint=svc.endpoint("metrics"), headers=headers)
            logs = OTLPLogExporter(endpoint=svc.endpoint("logs"), headers=headers)
            assert svc.service.grpc is not None
            over_grpc = GrpcSpanExporter(
                endpoint=f"127.0.0.1:{svc.service.grpc.port}",
                insecure=True,
                headers=(("authorization", f"Bearer {token}"),),
            )
            try:
                return [
                    spans.export(telemetry.spans(3)) is SpanExportResult.SUCCESS,
                    metrics.export(telemetry._metrics_data(telemetry.metric_points(2)))
                    is MetricExportResult.SUCCESS,
                    logs.export(telemetry.log_records(4)) is LogRecordExportResult.SUCCESS,
                    over_grpc.export(telemetry.spans(2)) is SpanExportResult.SUCCESS,
                ]
            finally:
                for exporter in (spans, metrics, logs, over_grpc):
                    exporter.shutdown()

        assert await asyncio.to_thread(export_all) == [True] * 4
    # The token named the tenant of every row.
    assert await staged_by_tenant(database_url) == {"team-a": 4}


async def test_no_token_a_wrong_token_or_a_removed_one_is_401_and_nothing_staged(
    database_url: str, tmp_path: Path
) -> None:
    kept, removed, other = new_token(), new_token(), new_token()
    path = tokens_file(tmp_path / "tokens", [("team-a", kept), ("team-b", removed)])
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            auth_mode="bearer",
            auth_tokens_file=str(path),
            log_aggregation_window_s=0,
            grpc_enabled=True,
            grpc_port=0,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert (await post(client, svc, {"Authorization": f"Bearer {removed}"})).status_code == 200
        tokens_file(path, [("team-a", kept)])  # team-b's line removed, no restart
        refused = [
            await post(client, svc, {}),
            await post(client, svc, {"Authorization": f"Bearer {other}"}),
            await post(client, svc, {"Authorization": f"Bearer {removed}"}),
            await post(client, svc, {"Authorization": f"Basic {kept}"}),
            await post(client, svc, {"Authorization": "Bearer"}),
            # Even a request that is wrong in every other way: who sends is checked first.
            await client.get(svc.endpoint("traces"), headers={"Authorization": f"Bearer {other}"}),
        ]
        for answer in refused:
            assert answer.status_code == 401, answer
            assert answer.headers["www-authenticate"].startswith("Bearer")
            status = status_of(answer)
            assert status.code == otlp.CODE_UNAUTHENTICATED
            for token in (kept, removed, other):
                assert token not in status.message
                assert token not in answer.headers["www-authenticate"]
        assert 'error="invalid_token"' in refused[1].headers["www-authenticate"]
        assert (await post(client, svc, {"Authorization": f"Bearer {kept}"})).status_code == 200

        # gRPC: the authorization metadata, UNAUTHENTICATED without a good one.
        assert svc.service.grpc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.service.grpc.port}") as channel:
            export = channel.unary_unary(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await export(
                    traces(1).SerializeToString(),
                    metadata=(("authorization", f"Bearer {removed}"),),
                )
            assert failed.value.code() is grpc.StatusCode.UNAUTHENTICATED
            await export(
                traces(1).SerializeToString(), metadata=(("authorization", f"Bearer {kept}"),)
            )
        scrape = (await client.get(f"{svc.url}/metrics")).text
    assert await staged_by_tenant(database_url) == {"team-b": 1, "team-a": 2}
    assert 'reason="unauthenticated"' in scrape
    for token in (kept, removed, other):
        assert token not in scrape


async def test_a_tokens_file_that_stops_parsing_keeps_the_last_good_one(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = new_token()
    path = tokens_file(tmp_path / "tokens", [("team-a", token)])
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            auth_mode="bearer",
            auth_tokens_file=str(path),
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"team-a {token}\nthis line has three fields {token}\n")
        os.replace(tmp, path)
        assert (await post(client, svc, {"Authorization": f"Bearer {token}"})).status_code == 200
    failures = [
        r for r in caplog.records if getattr(r, "event", None) == "config_file_reload_failed"
    ]
    assert len(failures) == 1
    assert "line 2" in failures[0].error
    assert token not in failures[0].getMessage() and token not in str(failures[0].__dict__)


async def test_a_hashed_token_works_and_the_file_need_not_hold_the_secret(
    database_url: str, tmp_path: Path
) -> None:
    import hashlib

    token = new_token()
    digest = hashlib.sha256(token.encode()).hexdigest()
    path = tokens_file(tmp_path / "tokens", [("team-h", f"sha256:{digest}")])
    assert token not in path.read_text()
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            auth_mode="bearer",
            auth_tokens_file=str(path),
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert (await post(client, svc, {"Authorization": f"Bearer {token}"})).status_code == 200
        assert (await post(client, svc, {"Authorization": f"Bearer {digest}"})).status_code == 401
    assert await staged_by_tenant(database_url) == {"team-h": 1}


# --- tenant names ------------------------------------------------------------------------------

HOSTILE = ["../x", "a/b", "x" * 200, "", "tëam", "..", ".hidden", "a b", "-x", "a\\b"]


async def test_hostile_tenant_names_are_400_and_nothing_is_written(
    database_url: str, tmp_path: Path
) -> None:
    objects = tmp_path / "objects"
    async with (
        running_service(database_url=database_url, local_object_dir=str(objects), **FAST) as svc,
        httpx.AsyncClient() as client,
    ):
        for name in HOSTILE:
            raw = name.encode("utf-8")
            answer = await client.post(
                svc.endpoint("traces"),
                content=traces(2).SerializeToString(),
                headers=[(b"content-type", b"application/x-protobuf"), (b"x-scope-orgid", raw)],
                timeout=30,
            )
            assert answer.status_code == 400, (name, answer.status_code)
            assert status_of(answer).code == otlp.CODE_INVALID_ARGUMENT
        # gRPC metadata alike (values must be printable ASCII there).
        assert svc.service.grpc is None
    assert await staged_by_tenant(database_url) == {}
    assert not objects.exists() or not any(p.is_file() for p in objects.rglob("*"))


async def test_tenants_by_header_default_and_required(database_url: str) -> None:
    async with (
        running_service(
            database_url=database_url, role="ingress", default_tenant="fallback"
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert (await post(client, svc, {"X-Scope-OrgID": "team-a"})).status_code == 200
        assert (await post(client, svc, {})).status_code == 200
    assert await staged_by_tenant(database_url) == {"team-a": 1, "fallback": 1}

    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            require_tenant=True,
            tenant_header="X-Tenant",
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        missing = await post(client, svc, {"X-Scope-OrgID": "team-a"})  # not the header now
        assert missing.status_code == 401
        assert status_of(missing).code == otlp.CODE_UNAUTHENTICATED
        assert (await post(client, svc, {"X-Tenant": "team-c"})).status_code == 200
    assert await staged_by_tenant(database_url) == {"team-a": 1, "fallback": 1, "team-c": 1}


# --- isolation and per-tenant limits, end to end -------------------------------------------------


async def test_two_tenants_each_in_its_own_prefix_and_one_over_its_bytes_limit(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """team-a is limited to a few KB/s and gets 429s; team-b's requests all get 200 and
    its records all land, each tenant's only under its own prefix and manifest rows."""
    limits = tmp_path / "limits.json"
    limits.write_text('{"team-a": {"ingest_bytes_per_s": 2000, "ingest_burst_bytes": 6000}}')
    async with (
        running_service(
            database_url=database_url,
            enable_rate_limiting=True,
            rate_limit_rps=10_000,
            rate_limit_burst=10_000,
            tenant_limits_file=str(limits),
            **s3_settings(s3_server, s3_bucket),
            **FAST,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        sent: dict[str, list[bytes]] = {"team-a": [], "team-b": []}
        answers: dict[str, Counter[int]] = {"team-a": Counter(), "team-b": Counter()}
        retry_after: list[str] = []

        async def send(tenant: str, n: int) -> None:
            for i in range(n):
                request = traces(20, service=tenant)
                body = request.SerializeToString()  # ~1.6 KB decompressed, gzip on the wire
                answer = await client.post(
                    svc.endpoint("traces"),
                    content=gzip.compress(body),
                    headers={
                        **PROTOBUF,
                        "Content-Encoding": "gzip",
                        "X-Scope-OrgID": tenant,
                        "X-Request-Id": f"{tenant}-{i}",
                    },
                    timeout=30,
                )
                answers[tenant][answer.status_code] += 1
                if answer.status_code == 200:
                    sent[tenant].extend(
                        s.span_id
                        for rs in request.resource_spans
                        for ss in rs.scope_spans
                        for s in ss.spans
                    )
                elif answer.status_code == 429:
                    retry_after.append(answer.headers["retry-after"])

        await asyncio.gather(send("team-a", 30), send("team-b", 30))
        assert answers["team-b"] == Counter({200: 30})
        assert answers["team-a"][429] > 0 and answers["team-a"][200] > 0
        assert set(answers["team-a"]) == {200, 429}
        assert all(int(v) >= 1 for v in retry_after)
        await wait_drained(database_url, within_s=DEADLINE_S)
        scrape = (await client.get(f"{svc.url}/metrics")).text

    exported = await read_exported(database_url, Store(s3=_s3(s3_server, s3_bucket)))
    by_tenant: dict[str, list[bytes]] = {"team-a": [], "team-b": []}
    for row, obj in zip(exported.manifest, exported.objects, strict=True):
        match = KEY_LAYOUT.match(row["object_key"])
        assert match is not None, row["object_key"]
        assert match["prefix"] == f"otel/{row['tenant']}", row
        assert row["service_names"] == [row["tenant"]]  # never a mixed batch
        by_tenant[row["tenant"]].extend(
            s.span_id
            for rs in obj.request.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        )
    for tenant in ("team-a", "team-b"):
        assert Counter(by_tenant[tenant]) == Counter(sent[tenant]), tenant
    assert 'otelworker_tenant_requests_refused_total{reason="ingest_rate_limited",' in scrape
    assert 'tenant="team-a"' in scrape and 'tenant="team-b"' in scrape


def _s3(s3_server: Any, bucket: str) -> Any:
    from tests.support.objects import S3Access

    return S3Access.of(s3_server, bucket)


async def test_a_tenant_over_its_backlog_share_is_refused_while_others_go_on(
    database_url: str,
) -> None:
    async with (
        running_service(
            database_url=database_url,
            role="ingress",  # nothing drains: the backlog only grows
            staging_max_backlog=100,
            tenant_max_backlog=3,
            backlog_refresh_interval_ms=20,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        first = [await post(client, svc, {"X-Scope-OrgID": "noisy"}) for _ in range(5)]
        assert [a.status_code for a in first] == [200, 200, 200, 429, 429]
        assert first[-1].headers["retry-after"]
        assert "TENANT_MAX_BACKLOG" in status_of(first[-1]).message
        quiet = [await post(client, svc, {"X-Scope-OrgID": "quiet"}) for _ in range(3)]
        assert [a.status_code for a in quiet] == [200, 200, 200]
        # The recount (not only this process's own adds) knows the shares too.
        deadline = time.monotonic() + 10
        while svc.service.backlog is not None and svc.service.backlog.of("noisy") != 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    assert await staged_by_tenant(database_url) == {"noisy": 3, "quiet": 3}


async def test_tenant_labels_are_capped(database_url: str) -> None:
    async with (
        running_service(database_url=database_url, role="ingress", metrics_max_tenants=2) as svc,
        httpx.AsyncClient() as client,
    ):
        for tenant in ("t1", "t2", "t3", "t4"):
            assert (await post(client, svc, {"X-Scope-OrgID": tenant})).status_code == 200
        scrape = (await client.get(f"{svc.url}/metrics")).text
    accepted = [
        line
        for line in scrape.splitlines()
        if line.startswith("otelworker_tenant_records_accepted_total{")
    ]
    assert any('tenant="t1"' in line for line in accepted)
    assert any('tenant="t2"' in line for line in accepted)
    assert any('tenant="other"' in line and line.endswith(" 2.0") for line in accepted)
    assert not any('tenant="t3"' in line or 'tenant="t4"' in line for line in accepted)
    # The rows keep the real names.
    assert await staged_by_tenant(database_url) == {"t1": 1, "t2": 1, "t3": 1, "t4": 1}


async def test_rows_staged_before_tenants_belong_to_the_default_tenant(
    database_url: str, tmp_path: Path
) -> None:
    """A row with no tenant (as migration 0004 leaves older rows) is DEFAULT_TENANT's: its
    object goes under that tenant's prefix and its manifest row names it."""
    await migrate(database_url)
    await stage_rows(database_url, [("traces", span_request([b"\x01" * 8, b"\x02" * 8]), 2)])
    objects = tmp_path / "objects"
    async with running_service(
        database_url=database_url,
        default_tenant="legacy",
        local_object_dir=str(objects),
        **FAST,
    ):
        await wait_drained(database_url, within_s=DEADLINE_S)
    exported = await read_exported(database_url, Store(local_dir=objects))
    assert [row["tenant"] for row in exported.manifest] == ["legacy"]
    assert exported.manifest[0]["object_key"].startswith("otel/legacy/year=")
    assert sorted(exported.ids("traces")) == sorted([(b"\x01" * 8).hex(), (b"\x02" * 8).hex()])
