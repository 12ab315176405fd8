"""Overload protection and honest answers, against a real PostgreSQL.

One test (or more) per row of the seed's observability table: the status code, the
headers, the body and the log ``event``/``reason`` appear under the row's condition and
not otherwise. The service runs in-process (``running_service``), mostly with
``role="ingress"`` so that nothing drains the staging queue and the backlog is exactly
what the test staged; ``role="all"`` where the worker is part of the condition.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otelworker.exceptions import ConfigError
from otelworker.logs import JSONFormatter
from otelworker.settings import load_settings
from tests.support.objects import until
from tests.support.payloads import logs, metrics, traces
from tests.support.server import RunningService, running_service

pytestmark = pytest.mark.integration

PROTOBUF = {"content-type": "application/x-protobuf"}
JSON = {"content-type": "application/json"}
RESOURCE_EXHAUSTED = 8
UNAVAILABLE = 14
REPO = Path(__file__).resolve().parents[2]


# --- payloads -------------------------------------------------------------------------


BUILDERS: dict[str, Callable[[int], Any]] = {"traces": traces, "metrics": metrics, "logs": logs}
RESPONSES: dict[str, Any] = {
    "traces": (trace_service_pb2.ExportTraceServiceResponse, "rejected_spans"),
    "metrics": (metrics_service_pb2.ExportMetricsServiceResponse, "rejected_data_points"),
    "logs": (logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records"),
}


def body(signal: str = "traces", records: int = 1) -> bytes:
    return BUILDERS[signal](records).SerializeToString()


def otlp_json(message: Any) -> bytes:
    """OTLP/JSON: the protobuf JSON mapping, but trace and span ids in hex."""

    def hexify(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: base64.b64decode(v).hex() if k in ("traceId", "spanId") else hexify(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [hexify(v) for v in node]
        return node

    return json.dumps(hexify(json_format.MessageToDict(message))).encode()


# --- helpers --------------------------------------------------------------------------


async def post(
    client: httpx.AsyncClient,
    svc: RunningService,
    signal: str = "traces",
    records: int = 1,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await client.post(
        svc.endpoint(signal),
        content=body(signal, records) if content is None else content,
        headers=headers or PROTOBUF,
        timeout=30,
    )


async def rows(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        found = await conn.fetch(
            "SELECT status, count(*) AS n FROM ingestion_queue GROUP BY status"
        )
    finally:
        await conn.close()
    return {r["status"]: int(r["n"]) for r in found}


def staged(counts: dict[str, int]) -> int:
    return sum(n for status, n in counts.items() if status != "dead")


def events(caplog: pytest.LogCaptureFixture, event: str, reason: str | None = None) -> list:
    return [
        r
        for r in caplog.records
        if getattr(r, "event", None) == event
        and (reason is None or getattr(r, "reason", None) == reason)
    ]


def counted(caplog: pytest.LogCaptureFixture, event: str, reason: str | None = None) -> int:
    """Occurrences of an aggregated event: the sum of its lines' ``count``."""
    return sum(getattr(r, "count", 1) for r in events(caplog, event, reason))


def status_of(response: httpx.Response) -> status_pb2.Status:
    status = status_pb2.Status()
    if response.headers["content-type"].startswith("application/json"):
        json_format.Parse(response.content, status)
    else:
        status.ParseFromString(response.content)
    return status


def retry_after(response: httpx.Response) -> int:
    value = response.headers["retry-after"]
    assert value.isdigit(), f"Retry-After must be whole seconds, got {value!r}"
    seconds = int(value)
    assert seconds >= 1
    return seconds


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    return caplog


# --- rate_limited / limit_exceeded ----------------------------------------------------


async def test_rate_limit_lets_the_burst_through_then_429_with_retry_after(
    database_url: str, log: pytest.LogCaptureFixture
) -> None:
    burst, rps = 5, 0.2  # one token every 5 s: a quick burst sees at most one refill
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            enable_rate_limiting=True,
            rate_limit_rps=rps,
            rate_limit_burst=burst,
            max_request_body_bytes=4096,  # small, so the oversized body fits the socket buffers
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        started = time.monotonic()
        answers = [await post(client, svc, records=2) for _ in range(12)]
        # Refusals happen before the body is read or decoded: garbage is refused by the
        # limiter, not answered 400. A declared length past the limit can never be
        # accepted: 413 from its head, before the limiter (a 429 would be retried forever).
        garbage = await post(client, svc, content=b"\x00not protobuf\xff")
        oversized = await post(client, svc, content=b"x" * 10_000)
        as_json = await post(client, svc, content=b"{}", headers=JSON)
        elapsed = time.monotonic() - started
        codes = [a.status_code for a in answers]
        passed = codes.count(200)
        # A quick burst sees at most one refill (+1); a very slow machine a few more.
        assert burst <= passed <= burst + max(1, math.ceil(elapsed * rps)), (codes, elapsed)
        assert set(codes) == {200, 429}
        assert codes[:burst] == [200] * burst
        assert oversized.status_code == 413
        assert "retry-after" not in oversized.headers
        refused = [a for a in answers if a.status_code == 429] + [garbage, as_json]
        for answer in refused:
            assert answer.status_code == 429
            # Rounded-up time to the next token (at most 1/rps) plus at most 1 s of jitter.
            assert max(1, math.ceil(1 / rps - elapsed)) <= retry_after(answer) <= 1 / rps + 1
            status = status_of(answer)
            assert status.code == RESOURCE_EXHAUSTED
            assert "rate limit" in status.message
        assert as_json.headers["content-type"].startswith("application/json")
        assert answers[0].content == b""  # the protobuf success: an empty response
        assert staged(await rows(database_url)) == passed  # nothing staged for a 429
        first = events(log, "rate_limited", "limit_exceeded")
        assert first, "the first refusal is logged at once"
        assert first[0].status == 429
        assert not events(log, "queue_saturated")
    # After shutdown every aggregated count has been written: nothing uncounted.
    assert counted(log, "rate_limited", "limit_exceeded") == len(refused)


async def test_no_rate_limiting_when_disabled(
    database_url: str, log: pytest.LogCaptureFixture
) -> None:
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            enable_rate_limiting=False,
            rate_limit_rps=0.01,
            rate_limit_burst=1,  # would refuse the second request if it were on
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert not svc.service.settings.enable_rate_limiting
        answers = await asyncio.gather(*(post(client, svc) for _ in range(25)))
        assert [a.status_code for a in answers] == [200] * 25
        assert all("retry-after" not in a.headers for a in answers)
        assert staged(await rows(database_url)) == 25
    assert not events(log, "rate_limited")


# --- queue_saturated / queue_full_reject ----------------------------------------------


async def test_reject_policy_answers_429_at_the_cap_and_stages_nothing_more(
    database_url: str, log: pytest.LogCaptureFixture
) -> None:
    cap = 5
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            staging_max_backlog=cap,
            overflow_policy="reject",
            saturated_retry_after_s=3,
            # No periodic recount during the test: a recount that runs while a commit lands
            # may count that item twice until the next recount (an early refusal, by design),
            # which would make the exact figures below racy.
            backlog_refresh_interval_ms=60_000,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        below = [await post(client, svc, records=3) for _ in range(cap)]
        assert [a.status_code for a in below] == [200] * cap
        assert not events(log, "queue_saturated")  # not below the cap
        assert svc.service.gate.saturated  # reached: the next one is refused
        above = [await post(client, svc, records=3) for _ in range(6)]
        # Saturation is checked before decoding: garbage is refused the same way.
        above.append(await post(client, svc, content=b"\xff\xfegarbage"))
        above.append(await post(client, svc, "logs", content=b"{}", headers=JSON))
        for answer in above:
            assert answer.status_code == 429
            assert retry_after(answer) == 3  # SATURATED_RETRY_AFTER_S
            status = status_of(answer)
            assert status.code == RESOURCE_EXHAUSTED
            assert "saturated" in status.message
        # The periodic recount agrees with the local figure: still saturated.
        await svc.service.backlog.refresh()
        assert svc.service.backlog.value == cap
        assert (await post(client, svc)).status_code == 429
        # Sequential requests on one replica: the cap holds exactly.
        assert await rows(database_url) == {"pending": cap}
        first = events(log, "queue_saturated", "queue_full_reject")
        assert first and first[0].status == 429 and first[0].backlog >= cap
        assert not events(log, "load_shedding")
        assert not events(log, "rate_limited")
    assert counted(log, "queue_saturated", "queue_full_reject") == len(above) + 1


async def test_reject_overshoot_is_bounded_by_concurrent_requests(database_url: str) -> None:
    """The documented bound: one replica overshoots by at most concurrency - 1 items.

    Requests check the cap before their commit and count after it; all N concurrent
    requests can pass the check at a backlog of cap - 1. Once the commits have landed
    the cap holds: no later request is staged.
    """
    cap, concurrency = 5, 12
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            staging_max_backlog=cap,
            overflow_policy="reject",
            backlog_refresh_interval_ms=60_000,
        ) as svc,
        httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client,
    ):
        first_wave = await asyncio.gather(*(post(client, svc) for _ in range(concurrency)))
        accepted = sum(a.status_code == 200 for a in first_wave)
        assert {a.status_code for a in first_wave} <= {200, 429}
        after_first = staged(await rows(database_url))
        assert after_first == accepted
        assert cap <= after_first <= cap + concurrency - 1
        for _ in range(3):
            wave = await asyncio.gather(*(post(client, svc) for _ in range(concurrency)))
            assert [a.status_code for a in wave] == [429] * concurrency
        assert staged(await rows(database_url)) == after_first  # the count stopped


async def test_backlog_counts_failed_and_processing_rows_but_not_dead(
    database_url: str, log: pytest.LogCaptureFixture
) -> None:
    cap = 5
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            staging_max_backlog=cap,
            backlog_refresh_interval_ms=50,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        conn = await asyncpg.connect(database_url)
        try:
            insert = (
                "INSERT INTO ingestion_queue (signal, payload, record_count, status, attempts,"
                " available_at) VALUES ('traces', $1, 1, $2, 1, now() + interval '1 hour')"
            )
            payload = body()
            for status, n in (("failed", 3), ("processing", 1), ("dead", 20)):
                for _ in range(n):
                    await conn.execute(insert, payload, status)
        finally:
            await conn.close()
        # The periodic refresh picks the rows up; the 20 dead ones are not in the figure.
        await until(lambda: svc.service.backlog.value == 4, what="backlog refresh to 4")
        assert (await post(client, svc)).status_code == 200  # 4 < 5
        refused = await post(client, svc)
        assert refused.status_code == 429
        assert events(log, "queue_saturated", "queue_full_reject")
        counts = await rows(database_url)
        assert counts == {"failed": 3, "processing": 1, "dead": 20, "pending": 1}


async def test_object_store_outage_turns_rows_failed_and_still_engages_the_cap(
    database_url: str, log: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """batch_persist_failed (with the error class as reason) and the cap, end to end."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("the local object store cannot create directories under a file\n")
    cap = 3
    async with (
        running_service(
            database_url=database_url,
            role="all",
            local_object_dir=str(blocked),
            staging_max_backlog=cap,
            backlog_refresh_interval_ms=60_000,  # exact figures: recounts done by hand
            batch_max_size=1,
            batch_flush_interval_ms=20,
            poll_interval_ms=50,
            retry_backoff_initial_ms=600_000,
            retry_backoff_max_ms=600_000,
            max_attempts=100,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert not events(log, "batch_persist_failed")  # not before anything failed
        for _ in range(cap):
            assert (await post(client, svc)).status_code == 200

        async def all_failed() -> bool:
            return (await rows(database_url)).get("failed", 0) == cap

        await until(all_failed, what="the worker to mark every row failed")
        failures = events(log, "batch_persist_failed")
        assert failures
        reason = failures[0].reason
        assert reason and reason[0].isupper(), f"an error class name, got {reason!r}"
        assert failures[0].levelno == logging.WARNING
        rendered = JSONFormatter().format(failures[0])
        assert '"event":"batch_persist_failed"' in rendered
        assert f'"reason":"{reason}"' in rendered
        # The recount sees the failed rows: the cap is engaged by an outage too.
        await svc.service.backlog.refresh()
        assert svc.service.backlog.value == cap
        refused = await post(client, svc)
        assert refused.status_code == 429
        assert events(log, "queue_saturated", "queue_full_reject")
        assert (await rows(database_url)) == {"failed": cap}


# --- load_shedding / queue_full_drop_or_sample ----------------------------------------


async def test_drop_policy_answers_202_with_partial_success_and_stages_nothing(
    database_url: str, log: pytest.LogCaptureFixture
) -> None:
    cap = 2
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            staging_max_backlog=cap,
            overflow_policy="drop",
            backlog_refresh_interval_ms=60_000,  # no recount racing the exact fill
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        for _ in range(cap):
            ok = await post(client, svc)
            assert ok.status_code == 200
        assert not events(log, "load_shedding")  # not below the cap
        sent = {"traces": 7, "metrics": 4, "logs": 9}
        for signal, records in sent.items():
            shed = await post(client, svc, signal, records)
            assert shed.status_code == 202
            assert "retry-after" not in shed.headers
            response_type, field = RESPONSES[signal]
            response = response_type()
            response.ParseFromString(shed.content)
            assert getattr(response.partial_success, field) == records
            assert "shed" in response.partial_success.error_message
            assert "drop" in response.partial_success.error_message
        # OTLP/JSON asks get a JSON partial_success.
        as_json = await post(
            client,
            svc,
            content=otlp_json(traces(3)),
            headers=JSON,
        )
        assert as_json.status_code == 202
        assert as_json.headers["content-type"].startswith("application/json")
        response = json_format.Parse(
            as_json.content, trace_service_pb2.ExportTraceServiceResponse()
        )
        assert response.partial_success.rejected_spans == 3
        assert response.partial_success.error_message
        assert await rows(database_url) == {"pending": cap}  # nothing staged for them
        shed_lines = events(log, "load_shedding", "queue_full_drop_or_sample")
        assert shed_lines and shed_lines[0].status == 202 and shed_lines[0].policy == "drop"
        assert shed_lines[0].records == 7
        assert not events(log, "queue_saturated")
    assert counted(log, "load_shedding", "queue_full_drop_or_sample") == len(sent) + 1


async def test_sample_policy_accepts_about_the_sample_rate(
    database_url: str, log: pytest.LogCaptureFixture
) -> None:
    n, rate = 200, 0.5
    async with (
        running_service(
            database_url=database_url,
            role="ingress",
            staging_max_backlog=1,
            overflow_policy="sample",
            overflow_sample_rate=rate,
            overflow_sample_seed=20240607,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        assert (await post(client, svc)).status_code == 200  # reaches the cap
        answers = [await post(client, svc, records=2) for _ in range(n)]
        codes = [a.status_code for a in answers]
        assert set(codes) == {200, 202}
        accepted = codes.count(200)
        # Binomial(200, 0.5): sd ~ 7.1; 4 sd either side.
        sd = math.sqrt(n * rate * (1 - rate))
        assert abs(accepted - n * rate) <= 4 * sd, accepted
        for answer in answers:
            if answer.status_code == 202:
                response = trace_service_pb2.ExportTraceServiceResponse()
                response.ParseFromString(answer.content)
                assert response.partial_success.rejected_spans == 2
                assert "sample" in response.partial_success.error_message
            else:
                assert answer.content == b""
        assert await rows(database_url) == {"pending": 1 + accepted}  # accepted ones staged
        shed_lines = events(log, "load_shedding", "queue_full_drop_or_sample")
        assert shed_lines and shed_lines[0].policy == "sample"
        assert not events(log, "queue_saturated")
    assert counted(log, "load_shedding", "queue_full_drop_or_sample") == n - accepted


# --- processing_paused / buffer_full (the pipeline's; here: the same logging path) ---------


async def test_processing_paused_is_logged_when_the_buffer_is_full_and_not_otherwise(
    database_url: str, log: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    async with (
        running_service(
            database_url=database_url,
            role="all",
            local_object_dir=str(tmp_path / "objects"),
            processing_queue_max_depth=100,
            batch_flush_interval_ms=20,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        for _ in range(3):
            assert (await post(client, svc)).status_code == 200

        async def drained() -> bool:
            return await rows(database_url) == {}

        await until(drained, what="the worker to export everything")
        assert not events(log, "processing_paused")  # room to spare: no pause

    log.clear()
    async with (
        running_service(
            database_url=database_url,
            role="all",
            local_object_dir=str(tmp_path / "objects"),
            processing_queue_max_depth=1,  # one item in memory fills it
            batch_max_size=10,
            batch_flush_interval_ms=300,
        ) as svc,
        httpx.AsyncClient() as client,
    ):
        for _ in range(3):
            assert (await post(client, svc)).status_code == 200
        await until(lambda: events(log, "processing_paused", "buffer_full"), what="a pause")
        await until(drained, what="the worker to export everything")
        paused = events(log, "processing_paused", "buffer_full")[0]
        assert paused.name == "otelworker"
        assert paused.buffer_capacity == 1
        rendered = JSONFormatter().format(paused)
        assert '"event":"processing_paused"' in rendered and '"reason":"buffer_full"' in rendered
        assert events(log, "processing_resumed", "buffer_room")


# --- invalid settings stop start-up ---------------------------------------------------

INVALID = [
    ("OVERFLOW_SAMPLE_RATE", "1.5"),
    ("OVERFLOW_POLICY", "foo"),
    ("RATE_LIMIT_RPS", "-1"),
    ("RATE_LIMIT_BURST", "0"),
]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("OTEL_")
        and k.upper().removeprefix("OTEL_") not in {key for key, _ in INVALID}
    }
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.parametrize(("key", "value"), INVALID)
def test_invalid_setting_is_refused_by_load_settings(
    key: str, value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    with pytest.raises(ConfigError, match=key):
        load_settings(**{key.lower(): value})
    for env_key in (key, f"OTEL_{key}"):
        with monkeypatch.context() as m:
            m.setenv(env_key, value)
            with pytest.raises(ConfigError, match=key) as info:
                load_settings()
            assert value in str(info.value)


def test_boundary_values_are_accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for rate in (0.0, 1.0):
        assert load_settings(overflow_sample_rate=rate).overflow_sample_rate == rate
    s = load_settings(rate_limit_rps=0.001, rate_limit_burst=1, overflow_policy="sample")
    assert (s.rate_limit_rps, s.rate_limit_burst, s.overflow_policy.value) == (0.001, 1, "sample")
    with pytest.raises(ConfigError, match="RATE_LIMIT_RPS"):
        load_settings(rate_limit_rps=0)


@pytest.mark.parametrize(("key", "value"), INVALID)
@pytest.mark.parametrize("prefix", ["", "OTEL_"])
def test_invalid_setting_stops_serve(key: str, value: str, prefix: str, tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env[f"{prefix}{key}"] = value
    # Never reached (the settings fail first); if they did not, start-up fails fast anyway.
    env["DATABASE_URL"] = "postgresql://otelworker@127.0.0.1:9/none"
    env["DB_STARTUP_TIMEOUT_S"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "otelworker", "serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert key in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_every_setting_is_documented_with_its_default() -> None:
    """docs/configuration.md has a row per setting: the key, its OTEL_ form, its default."""
    from otelworker.settings import Settings, env_key

    doc = (REPO / "docs" / "configuration.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in doc.splitlines()
        if line.startswith("| `")
    }
    for name, field in Settings.model_fields.items():
        key = env_key(name)
        assert key in rows, f"{key} is not documented in docs/configuration.md"
        row = rows[key]
        assert f"`OTEL_{key}`" in row, key
        default = field.default
        shown = "unset" if default is None else str(getattr(default, "value", default))
        if isinstance(default, bool):
            shown = str(default).lower()
        assert f"`{shown}`" in row or shown in row.split("|")[3], (key, shown, row)
    assert set(rows) == {env_key(n) for n in Settings.model_fields}, "undocumented or stale keys"
