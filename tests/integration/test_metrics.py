"""GET /metrics: Prometheus text whose counters move by exactly what the requests did."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.support import payloads
from tests.support.objects import until
from tests.support.refusing_s3 import refusing_s3
from tests.support.server import RunningService, running_service

pytestmark = pytest.mark.integration

PROTOBUF = {"content-type": "application/x-protobuf"}
JSON = {"content-type": "application/json"}
# "tenant" is bounded too: at most METRICS_MAX_TENANTS values, then "other"; "scope" has
# three (otelworker_durability_scope).
LOW_CARDINALITY_LABELS = {"transport", "signal", "code", "reason", "le", "tenant", "scope"}


# --- payloads -------------------------------------------------------------------------


def traces(spans: int) -> bytes:
    return payloads.traces(spans, "metrics-test").SerializeToString()


def metric_points(points: int) -> bytes:
    return payloads.metrics(points, "metrics-test").SerializeToString()


def log_records_json(records: int) -> bytes:
    return json_format.MessageToJson(payloads.logs(records, "metrics-test")).encode()


# --- scraping -------------------------------------------------------------------------


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        return sum(
            s.value
            for f in self.families.values()
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        return {
            s.labels[label]
            for f in self.families.values()
            for s in f.samples
            if s.name == name and label in s.labels
        }


async def scrape(client: httpx.AsyncClient, svc: RunningService) -> Scrape:
    response = await client.get(f"{svc.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "version=" in response.headers["content-type"]  # the exposition format version
    return Scrape(response.text)


async def post(
    client: httpx.AsyncClient,
    svc: RunningService,
    signal: str,
    content: bytes,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await client.post(
        svc.endpoint(signal), content=content, headers=headers or PROTOBUF, timeout=30
    )


async def queue_rows(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        found = await conn.fetch("SELECT status, count(*) FROM ingestion_queue GROUP BY status")
    finally:
        await conn.close()
    return {r[0]: int(r[1]) for r in found}


# --- the exposition ----------------------------------------------------------------------

EXPECTED_FAMILIES = {
    "otelworker_requests": "counter",
    "otelworker_records_accepted": "counter",
    "otelworker_requests_refused": "counter",
    "otelworker_records_refused": "counter",
    "otelworker_staging_backlog_items": "gauge",
    "otelworker_staging_backlog_limit_items": "gauge",
    "otelworker_buffer_items": "gauge",
    "otelworker_buffer_capacity_items": "gauge",
    "otelworker_polling_paused_seconds": "counter",
    "otelworker_polling_pauses": "counter",
    "otelworker_batches_flushed": "counter",
    "otelworker_batch_items": "histogram",
    "otelworker_records_exported": "counter",
    "otelworker_upload_duration_seconds": "histogram",
    "otelworker_batch_failures": "counter",
    "otelworker_items_dead": "counter",
}


async def test_metrics_is_prometheus_text_with_conventional_names(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        running_service(
            database_url=database_url,
            role="all",
            local_object_dir=str(tmp_path / "objects"),
            staging_max_backlog=321,
            processing_queue_max_depth=17,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert (await post(client, svc, "traces", traces(2))).status_code == 200
        got = await scrape(client, svc)
        for name, kind in EXPECTED_FAMILIES.items():
            assert name in got.families, f"missing metric family {name}"
            assert got.families[name].type == kind, name
            assert got.families[name].documentation, f"{name} has no HELP"
        # The process collector's standard families (RSS, CPU, fds) beside our own.
        assert got.value("process_resident_memory_bytes") > 0
        for family in got.families.values():
            assert family.name.startswith(("otelworker_", "process_")), family.name
            for sample in family.samples:
                assert set(sample.labels) <= LOW_CARDINALITY_LABELS, sample
                if family.type == "counter":
                    assert sample.name.endswith(("_total", "_created")), sample.name
        assert got.value("otelworker_staging_backlog_limit_items") == 321
        assert got.value("otelworker_buffer_capacity_items") == 17
        assert got.value("otelworker_requests_total", signal="traces", code="200") == 1
        # Only the OTLP endpoints are counted: scraping does not count itself.
        again = await scrape(client, svc)
        assert again.value("otelworker_requests_total") == 1


# --- ingress counters ------------------------------------------------------------------


async def test_accepted_and_refused_requests_move_their_counters(database_url: str) -> None:
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            max_request_body_bytes=4096,
            backlog_refresh_interval_ms=60_000,  # the gauge is then exactly the local count
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        before = await scrape(client, svc)
        assert before.value("otelworker_requests_total") == 0
        for _ in range(3):
            assert (await post(client, svc, "traces", traces(4))).status_code == 200
        assert (await post(client, svc, "metrics", metric_points(5))).status_code == 200
        answer = await post(client, svc, "logs", log_records_json(2), JSON)
        assert answer.status_code == 200
        # An empty request is answered 200 and neither staged nor counted as records.
        empty = await post(client, svc, "traces", b"")
        assert empty.status_code == 200
        # Refusals after the body is looked at.
        assert (await post(client, svc, "traces", b"\x0a\xff\xff")).status_code == 400
        assert (await post(client, svc, "traces", b"x" * 5000)).status_code == 413
        bomb = gzip.compress(b"\x00" * 100_000)  # small on the wire, too large inflated
        bombed = await post(client, svc, "logs", bomb, {**PROTOBUF, "content-encoding": "gzip"})
        assert bombed.status_code == 413
        assert (
            await post(client, svc, "traces", traces(1), {"content-type": "text/plain"})
        ).status_code == 415

        got = await scrape(client, svc)
        v = got.value
        assert v("otelworker_requests_total", signal="traces", code="200") == 4
        assert v("otelworker_requests_total", signal="metrics", code="200") == 1
        assert v("otelworker_requests_total", signal="logs", code="200") == 1
        assert v("otelworker_requests_total", signal="traces", code="400") == 1
        assert v("otelworker_requests_total", signal="traces", code="413") == 1
        assert v("otelworker_requests_total", signal="logs", code="413") == 1
        assert v("otelworker_requests_total", signal="traces", code="415") == 1
        assert v("otelworker_requests_total") == 10
        assert v("otelworker_records_accepted_total", signal="traces") == 12
        assert v("otelworker_records_accepted_total", signal="metrics") == 5
        assert v("otelworker_records_accepted_total", signal="logs") == 2
        assert v("otelworker_requests_refused_total", reason="bad_request") == 1
        assert v("otelworker_requests_refused_total", reason="too_large") == 2
        assert v("otelworker_requests_refused_total", signal="logs", reason="too_large") == 1
        assert v("otelworker_requests_refused_total", reason="unsupported_media_type") == 1
        for reason in ("rate_limited", "queue_full_reject", "queue_full_drop", "unavailable"):
            assert v("otelworker_requests_refused_total", reason=reason) == 0
        # Refused before decoding: no record count is known, none is invented.
        assert v("otelworker_records_refused_total") == 0
        assert v("otelworker_staging_backlog_items") == 5  # 3 + 1 + 1 staged rows
        assert sum((await queue_rows(database_url)).values()) == 5


async def test_rate_limited_counters(database_url: str) -> None:
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            enable_rate_limiting=True,
            rate_limit_rps=0.01,
            rate_limit_burst=2,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        codes = [(await post(client, svc, "traces", traces(3))).status_code for _ in range(5)]
        assert codes == [200, 200, 429, 429, 429]
        got = await scrape(client, svc)
        assert got.value("otelworker_requests_total", signal="traces", code="429") == 3
        assert got.value("otelworker_requests_refused_total", reason="rate_limited") == 3
        assert got.value("otelworker_records_refused_total", reason="rate_limited") == 0
        assert got.value("otelworker_records_accepted_total", signal="traces") == 6


@pytest.mark.parametrize(
    ("policy", "rate", "reason"),
    [
        ("reject", 0.1, "queue_full_reject"),
        ("drop", 0.1, "queue_full_drop"),
        ("sample", 0.5, "queue_full_sample"),
    ],
)
async def test_saturation_counters_by_policy(
    database_url: str, policy: str, rate: float, reason: str
) -> None:
    n, spans = 20, 3
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            staging_max_backlog=1,
            overflow_policy=policy,
            overflow_sample_rate=rate,
            overflow_sample_seed=99,
            # No recount racing the commits: the backlog gauge is exactly the local count.
            backlog_refresh_interval_ms=60_000,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert (await post(client, svc, "traces", traces(spans))).status_code == 200
        codes = [(await post(client, svc, "traces", traces(spans))).status_code for _ in range(n)]
        refused = codes.count(429) + codes.count(202)
        accepted = codes.count(200)
        assert refused + accepted == n
        if policy == "reject":
            assert codes == [429] * n
        elif policy == "drop":
            assert codes == [202] * n
        else:
            assert 0 < accepted < n  # 20 draws at 0.5 with seed 99
        got = await scrape(client, svc)
        code = "429" if policy == "reject" else "202"
        assert got.value("otelworker_requests_total", code=code) == refused
        assert (
            got.value("otelworker_requests_refused_total", signal="traces", reason=reason)
            == refused
        )
        # The shedding policies decode the body to report the records in partial_success.
        expected_records = 0 if policy == "reject" else refused * spans
        assert got.value("otelworker_records_refused_total", reason=reason) == expected_records
        other = {"queue_full_reject", "queue_full_drop", "queue_full_sample"} - {reason}
        for r in other:
            assert got.value("otelworker_requests_refused_total", reason=r) == 0
        assert got.value("otelworker_records_accepted_total") == (1 + accepted) * spans
        assert got.value("otelworker_staging_backlog_items") == 1 + accepted
        assert got.value("otelworker_staging_backlog_limit_items") == 1


async def test_unavailable_counters(database_url: str, tcp_proxy: Any) -> None:
    dsn = urlsplit(database_url)
    proxy = tcp_proxy(dsn.hostname, dsn.port or 5432)
    async with (
        running_service(
            database_url=proxy.url_for(database_url),
            role="ingress",
            db_connect_timeout_s=1,
            staging_commit_timeout_s=3,
            unavailable_retry_after_s=7,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert (await post(client, svc, "traces", traces(2))).status_code == 200
        proxy.refuse()
        down = await post(client, svc, "traces", traces(4))
        assert down.status_code == 503
        assert down.headers["retry-after"] == "7"
        status = status_pb2.Status()
        status.ParseFromString(down.content)
        assert status.code == 14  # UNAVAILABLE
        got = await scrape(client, svc)
        assert got.value("otelworker_requests_total", code="503") == 1
        assert got.value("otelworker_requests_refused_total", reason="unavailable") == 1
        # The body had been decoded: its records are counted as refused, not accepted.
        assert got.value("otelworker_records_refused_total", reason="unavailable") == 4
        assert got.value("otelworker_records_accepted_total") == 2
        proxy.pass_through()

        async def recovered() -> bool:
            return (await post(client, svc, "traces", traces(1))).status_code == 200

        await until(recovered, what="staging to work again through the proxy")
        # Not accepting (shutting down): refused before the body is read.
        svc.service.accepting = False
        closed = await post(client, svc, "logs", b"whatever")
        assert closed.status_code == 503
        assert closed.headers["retry-after"] == "7"
        svc.service.accepting = True
        got = await scrape(client, svc)
        assert (
            got.value("otelworker_requests_refused_total", signal="logs", reason="unavailable") == 1
        )
        assert got.value("otelworker_records_refused_total", signal="logs") == 0


# --- worker metrics ----------------------------------------------------------------------


async def test_worker_metrics_after_a_drain(database_url: str, tmp_path: Path) -> None:
    requests, spans = 10, 3
    async with (
        running_service(
            database_url=database_url,
            role="all",
            local_object_dir=str(tmp_path / "objects"),
            processing_queue_max_depth=50,
            batch_max_size=4,
            batch_flush_interval_ms=50,
            backlog_refresh_interval_ms=50,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        for _ in range(requests):
            assert (await post(client, svc, "traces", traces(spans))).status_code == 200

        async def drained() -> Scrape | None:
            got = await scrape(client, svc)
            exported = got.value("otelworker_records_exported_total", signal="traces")
            done = (
                exported == requests * spans
                and got.value("otelworker_buffer_items") == 0
                and got.value("otelworker_staging_backlog_items") == 0
            )
            return got if done else None

        got = await until(drained, what="everything exported and the gauges back to 0")
        batches = got.value("otelworker_batches_flushed_total", signal="traces")
        assert batches >= math_ceil(requests / 4)
        assert got.value("otelworker_batch_items_count", signal="traces") == batches
        assert got.value("otelworker_batch_items_sum", signal="traces") == requests
        assert got.value("otelworker_upload_duration_seconds_count") == batches
        assert got.value("otelworker_items_claimed_total", signal="traces") == requests
        assert got.value("otelworker_object_bytes_total", signal="traces") > 0
        assert got.value("otelworker_buffer_capacity_items") == 50
        assert got.value("otelworker_batch_failures_total") == 0
        assert got.value("otelworker_items_dead_total") == 0
        conn = await asyncpg.connect(database_url)
        try:
            manifest = await conn.fetchval("SELECT count(*) FROM export_batches")
        finally:
            await conn.close()
        assert manifest == batches


def math_ceil(x: float) -> int:
    return -int(-x // 1)


async def test_pause_metrics_when_the_buffer_fills(database_url: str, tmp_path: Path) -> None:
    async with (
        running_service(
            database_url=database_url,
            role="all",
            local_object_dir=str(tmp_path / "objects"),
            processing_queue_max_depth=1,
            batch_max_size=10,
            batch_flush_interval_ms=200,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        for _ in range(3):
            assert (await post(client, svc, "traces", traces(1))).status_code == 200

        async def drained() -> Scrape | None:
            got = await scrape(client, svc)
            return got if got.value("otelworker_records_exported_total") == 3 else None

        await until(drained, what="the export of 3 items through a buffer of 1")

        async def resumed() -> Scrape | None:
            got = await scrape(client, svc)
            return got if got.value("otelworker_polling_paused_seconds_total") > 0 else None

        got = await until(resumed, what="a finished pause to be accounted")
        assert got.value("otelworker_polling_pauses_total") >= 1
        assert got.value("otelworker_buffer_capacity_items") == 1


async def test_failure_and_dead_metrics(database_url: str, tmp_path: Path) -> None:
    # The store refuses every object as invalid: a failure of the batch itself, which
    # counts toward its rows' attempts (an outage would not).
    async with (
        refusing_s3() as endpoint,
        running_service(
            database_url=database_url,
            role="all",
            s3_endpoint_url=endpoint,
            s3_bucket="refusing",
            s3_access_key_id="test",
            s3_secret_access_key="test",
            s3_force_path_style=True,
            batch_max_size=1,
            batch_flush_interval_ms=20,
            max_attempts=1,  # the first failure makes an item dead
            staging_max_backlog=3,
            backlog_refresh_interval_ms=60_000,  # recounted by hand below
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        for _ in range(3):
            assert (await post(client, svc, "traces", traces(2))).status_code == 200

        async def all_dead() -> Scrape | None:
            got = await scrape(client, svc)
            dead = got.value("otelworker_items_dead_total", signal="traces", reason="max_attempts")
            return got if dead == 3 else None

        got = await until(all_dead, what="three dead items")
        reasons = got.label_values("otelworker_batch_failures_total", "reason")
        assert len(reasons) == 1 and next(iter(reasons))[0].isupper(), reasons
        assert got.value("otelworker_batch_failures_total", signal="traces") == 3
        assert got.value("otelworker_batches_flushed_total") == 0
        assert await queue_rows(database_url) == {"dead": 3}
        # Dead rows leave the backlog: once recounted, the cap no longer holds requests back.
        await svc.service.backlog.refresh()
        assert svc.service.backlog.value == 0
        got = await scrape(client, svc)
        assert got.value("otelworker_staging_backlog_items") == 0
        assert (await post(client, svc, "traces", traces(1))).status_code == 200
