"""OTLP/gRPC against a real PostgreSQL: the SDK's gRPC exporters, status codes, RetryInfo.

The service runs in-process with ``GRPC_PORT=0`` (a free port); the SDK exporters are
synchronous, so they run in a thread beside the event loop that serves them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.metrics.export import MetricExportResult
from opentelemetry.sdk.trace.export import SpanExportResult

from otelworker import otlp
from tests.integration.test_ingress import _sdk_logs, _sdk_metrics, _sdk_spans
from tests.support import payloads
from tests.support.objects import Store, read_exported, until, wait_drained
from tests.support.payloads import unstage
from tests.support.server import RunningService, running_service

pytestmark = pytest.mark.integration


def target(svc: RunningService) -> str:
    assert svc.service.grpc is not None and svc.service.grpc.port
    return f"127.0.0.1:{svc.service.grpc.port}"


async def export_in_thread(exporter: Any, batch: Any) -> Any:
    try:
        return await asyncio.to_thread(exporter.export, batch)
    finally:
        await asyncio.to_thread(exporter.shutdown)


async def rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch(
                "SELECT signal, payload, record_count FROM ingestion_queue ORDER BY id"
            )
        )
    finally:
        await conn.close()


class RawClient:
    """A grpc.aio channel calling TraceService/Export with bytes, to see the raw answer."""

    def __init__(self, svc: RunningService) -> None:
        self.channel = grpc.aio.insecure_channel(target(svc))
        self.stub = trace_service_pb2_grpc.TraceServiceStub(self.channel)
        self.raw = self.channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        )

    async def export(self, body: bytes) -> tuple[grpc.StatusCode, Any, dict[str, Any]]:
        """(code, response or None, trailing metadata)."""
        try:
            response = await self.raw(body, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details(), dict(error.trailing_metadata() or ())
        return (
            grpc.StatusCode.OK,
            trace_service_pb2.ExportTraceServiceResponse.FromString(response),
            {},
        )

    async def close(self) -> None:
        await self.channel.close()


def retry_delay(trailers: dict[str, Any]) -> int | None:
    """The RetryInfo delay, checked to agree in both places it is sent."""
    if "grpc-status-details-bin" not in trailers:
        assert "google.rpc.retryinfo-bin" not in trailers
        return None
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    [detail] = status.details
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info)
    direct = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
    assert direct == info
    return int(info.retry_delay.seconds)


@pytest.fixture
async def svc(database_url: str) -> AsyncIterator[RunningService]:
    async with running_service(
        database_url=database_url, role="ingress", grpc_enabled=True, grpc_port=0
    ) as running:
        yield running


async def test_sdk_grpc_exporters_stage_spans_metrics_logs_exactly(
    svc: RunningService, database_url: str
) -> None:
    spans = _sdk_spans(4)
    metrics_data = _sdk_metrics()
    log_records, _ = _sdk_logs(5)
    endpoint = target(svc)

    result = await export_in_thread(OTLPSpanExporter(endpoint=endpoint, insecure=True), spans)
    assert result is SpanExportResult.SUCCESS
    gz = OTLPSpanExporter(endpoint=endpoint, insecure=True, compression=grpc.Compression.Gzip)
    assert await export_in_thread(gz, _sdk_spans(25)) is SpanExportResult.SUCCESS
    metrics_exporter = OTLPMetricExporter(endpoint=endpoint, insecure=True)
    assert await export_in_thread(metrics_exporter, metrics_data) is MetricExportResult.SUCCESS
    logs_exporter = OTLPLogExporter(endpoint=endpoint, insecure=True)
    assert await export_in_thread(logs_exporter, log_records) is LogRecordExportResult.SUCCESS

    staged = await rows(database_url)
    assert [r["signal"] for r in staged] == ["traces", "traces", "metrics", "logs"]
    assert [r["record_count"] for r in staged][:2] == [4, 25]
    for row in staged:
        message = otlp.decode(row["signal"], unstage(row["payload"]))
        assert otlp.count_records(row["signal"], message) == row["record_count"]
    logs = logs_service_pb2.ExportLogsServiceRequest.FromString(unstage(staged[3]["payload"]))
    bodies = [r.body.string_value for r in logs.resource_logs[0].scope_logs[0].log_records]
    assert bodies == [f"message {i}" for i in range(5)]
    metrics = svc.service.metrics
    assert metrics.records_accepted.labels("grpc", "traces")._value.get() == 29
    assert metrics.requests.labels("grpc", "logs", "OK")._value.get() == 1


async def test_grpc_records_reach_the_objects_exactly_once(
    database_url: str, tmp_path: Path
) -> None:
    objects = tmp_path / "objects"
    async with running_service(
        database_url=database_url,
        role="all",
        grpc_enabled=True,
        grpc_port=0,
        local_object_dir=str(objects),
        batch_flush_interval_ms=50,
    ) as svc:
        sent = []
        for n in range(6):
            spans = _sdk_spans(3 + n)
            sent += [format(s.get_span_context().span_id, "016x") for s in spans]
            exporter = OTLPSpanExporter(endpoint=target(svc), insecure=True)
            assert await export_in_thread(exporter, spans) is SpanExportResult.SUCCESS
        await wait_drained(database_url)
    exported = await read_exported(database_url, Store(local_dir=objects))
    # Every acknowledged span in the objects, once each.
    assert sorted(exported.ids("traces")) == sorted(sent)


async def test_malformed_message_is_invalid_argument(
    svc: RunningService, database_url: str
) -> None:
    client = RawClient(svc)
    try:
        code, details, trailers = await client.export(b"\x0a\xff\xff\xff\x0f\x01")
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "protobuf" in details
        assert retry_delay(trailers) is None
        ok, response, _ = await client.export(payloads.traces(2).SerializeToString())
        assert ok is grpc.StatusCode.OK and not response.HasField("partial_success")
    finally:
        await client.close()
    assert [r["record_count"] for r in await rows(database_url)] == [2]


async def test_too_large_is_resource_exhausted_without_retry_info(database_url: str) -> None:
    async with running_service(
        database_url=database_url,
        role="ingress",
        grpc_enabled=True,
        grpc_port=0,
        max_request_body_bytes=64 * 1024,
    ) as svc:
        client = RawClient(svc)
        try:
            code, _, trailers = await client.export(payloads.traces(2000).SerializeToString())
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay(trailers) is None  # not retryable
        finally:
            await client.close()
    assert await rows(database_url) == []


async def test_rate_limited_is_resource_exhausted_with_retry_info_and_the_sdk_retries(
    database_url: str,
) -> None:
    async with running_service(
        database_url=database_url,
        role="ingress",
        grpc_enabled=True,
        grpc_port=0,
        enable_rate_limiting=True,
        rate_limit_rps=1.0,
        rate_limit_burst=1,
    ) as svc:
        client = RawClient(svc)
        try:
            first, _, _ = await client.export(payloads.traces(1).SerializeToString())
            assert first is grpc.StatusCode.OK
            code, details, trailers = await client.export(payloads.traces(1).SerializeToString())
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit" in details
            delay = retry_delay(trailers)
            assert delay is not None and 1 <= delay <= 3
        finally:
            await client.close()
        # The SDK exporter reads RetryInfo, waits and tries again: its export succeeds.
        exporter = OTLPSpanExporter(endpoint=target(svc), insecure=True, timeout=20)
        assert await export_in_thread(exporter, _sdk_spans(2)) is SpanExportResult.SUCCESS
        refused = svc.service.metrics.requests_refused.labels("grpc", "traces", "rate_limited")
        assert refused._value.get() >= 2
    assert [r["record_count"] for r in await rows(database_url)] == [1, 2]


async def test_saturated_is_resource_exhausted_with_retry_info(database_url: str) -> None:
    async with running_service(
        database_url=database_url,
        role="ingress",
        grpc_enabled=True,
        grpc_port=0,
        staging_max_backlog=1,
        saturated_retry_after_s=2,
        backlog_refresh_interval_ms=60_000,
    ) as svc:
        client = RawClient(svc)
        try:
            assert (await client.export(payloads.traces(1).SerializeToString()))[0].name == "OK"
            code, details, trailers = await client.export(payloads.traces(1).SerializeToString())
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "saturated" in details
            assert retry_delay(trailers) == 2
        finally:
            await client.close()


async def test_shed_by_drop_policy_is_ok_with_partial_success(database_url: str) -> None:
    async with running_service(
        database_url=database_url,
        role="ingress",
        grpc_enabled=True,
        grpc_port=0,
        staging_max_backlog=1,
        overflow_policy="drop",
        backlog_refresh_interval_ms=60_000,
    ) as svc:
        client = RawClient(svc)
        try:
            assert (await client.export(payloads.traces(1).SerializeToString()))[0].name == "OK"
            code, response, _ = await client.export(payloads.traces(7).SerializeToString())
            assert code is grpc.StatusCode.OK
            assert response.partial_success.rejected_spans == 7
            assert "shed" in response.partial_success.error_message
        finally:
            await client.close()
    assert [r["record_count"] for r in await rows(database_url)] == [1]


async def test_database_down_is_unavailable_then_ok_without_restart(
    database_url: str, tcp_proxy: Any
) -> None:
    parts = urlsplit(database_url)
    proxy = tcp_proxy(parts.hostname, parts.port or 5432)
    async with running_service(
        database_url=proxy.url_for(database_url),
        role="ingress",
        grpc_enabled=True,
        grpc_port=0,
        db_connect_timeout_s=1,
        staging_commit_timeout_s=5,
        unavailable_retry_after_s=7,
    ) as svc:
        client = RawClient(svc)
        try:
            assert (await client.export(payloads.traces(1).SerializeToString()))[0].name == "OK"
            proxy.refuse()
            code, details, trailers = await client.export(payloads.traces(3).SerializeToString())
            assert code is grpc.StatusCode.UNAVAILABLE
            assert "not accepted" in details
            assert retry_delay(trailers) == 7
            proxy.pass_through()

            async def recovered() -> bool:
                answer = await client.export(payloads.traces(5).SerializeToString())
                assert answer[0] in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), answer
                return answer[0] is grpc.StatusCode.OK

            await until(recovered, within_s=30, what="gRPC export to recover")
        finally:
            await client.close()
    counts = [r["record_count"] for r in await rows(database_url)]
    assert counts[0] == 1 and 3 not in counts and counts[-1] == 5
