"""OTLP/gRPC beside the Export RPCs: the ``grpc.health.v1.Health`` service, and messages
over MAX_REQUEST_BODY_BYTES refused by the handler, so that they are counted and logged as
HTTP's 413s are (grpc refuses a message over its own limit before any handler sees it)."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from otelworker.ingress.grpc_server import SERVICES, grpc_receive_limit
from tests.integration.test_grpc import RawClient, retry_delay, rows, target
from tests.support import payloads
from tests.support.server import RunningService, running_service

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def svc(database_url: str) -> AsyncIterator[RunningService]:
    async with running_service(
        database_url=database_url,
        role="ingress",
        grpc_enabled=True,
        grpc_port=0,
        max_request_body_bytes=LIMIT,
    ) as running:
        yield running


async def refused_too_large(svc: RunningService) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{svc.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "otelworker_requests_refused_total" and sample.labels == {
                "transport": "grpc",
                "signal": "traces",
                "reason": "too_large",
            }:
                return float(sample.value)
    return 0.0


def trace_message(size_at_least: int) -> bytes:
    spans = 10
    while len(body := payloads.traces(spans).SerializeToString()) < size_at_least:
        spans *= 2
    return body


async def test_oversized_message_is_refused_and_counted(
    svc: RunningService, database_url: str
) -> None:
    body = trace_message(LIMIT + 1)
    assert LIMIT < len(body) <= grpc_receive_limit(LIMIT)
    client = RawClient(svc)
    try:
        code, details, trailers = await client.export(body)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED  # what grpc itself would answer
        assert "exceeds the limit" in details
        assert retry_delay(trailers) is None  # permanent: no RetryInfo
        assert await refused_too_large(svc) == 1
        # Compressed small, over the limit once grpc has decompressed it: the same.
        assert len(gzip.compress(body)) < LIMIT
        with pytest.raises(grpc.aio.AioRpcError) as gzipped:
            await client.raw(body, timeout=10, compression=grpc.Compression.Gzip)
        assert gzipped.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await refused_too_large(svc) == 2
        # Within the limit: staged as ever.
        code, _, _ = await client.export(payloads.traces(3).SerializeToString())
        assert code is grpc.StatusCode.OK
    finally:
        await client.close()
    assert [r["record_count"] for r in await rows(database_url)] == [3]


async def test_health_is_serving_for_the_server_and_each_otlp_service(
    svc: RunningService,
) -> None:
    async with grpc.aio.insecure_channel(target(svc)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICES.values()):
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


async def test_health_follows_readiness(svc: RunningService) -> None:
    async with grpc.aio.insecure_channel(target(svc)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert (await watch.read()).status == SERVING
        svc.service.accepting = False  # what readiness reports as "starting"
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            svc.service.accepting = True
        assert (await watch.read()).status == SERVING  # refreshed while a Watch is open
        watch.cancel()


async def test_an_oversized_message_is_permanent_even_when_rate_limited(database_url: str) -> None:
    """As HTTP's 413 precedes its 429: a message that can never be accepted is refused
    RESOURCE_EXHAUSTED without RetryInfo (counted too_large) while the tenant is rate
    limited, and only what could succeed later carries RetryInfo."""
    async with running_service(
        database_url=database_url,
        role="ingress",
        grpc_enabled=True,
        grpc_port=0,
        max_request_body_bytes=LIMIT,
        enable_rate_limiting=True,
        rate_limit_rps=0.01,
        rate_limit_burst=1,
    ) as svc:
        client = RawClient(svc)
        try:
            first, _, _ = await client.export(payloads.traces(1).SerializeToString())
            assert first is grpc.StatusCode.OK  # the bucket is empty from here on
            code, details, trailers = await client.export(trace_message(LIMIT + 1))
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds the limit" in details
            assert retry_delay(trailers) is None  # permanent: a retry would never succeed
            assert await refused_too_large(svc) == 1
            code, _, trailers = await client.export(payloads.traces(1).SerializeToString())
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay(trailers) is not None  # rate limited: retry later
        finally:
            await client.close()
    assert [r["record_count"] for r in await rows(database_url)] == [1]
