"""Worker processes as an operator runs them: several on one database, killed, stopped.

Each service here is a real ``hypercorn otelworker.app:app`` process (tests/support/procs.py)
on a real PostgreSQL and a real S3 protocol server; a TCP proxy in front of S3 makes
uploads slow so that batches are in flight when a process dies or stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Hashable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.objects import (
    S3Access,
    Store,
    Telemetry,
    migrate,
    queue_rows,
    read_exported,
    span_request,
    stage_rows,
    wait_drained,
    wait_for,
)
from tests.support.procs import run_service

pytestmark = pytest.mark.acceptance

READY_S = 180  # deadlines, not waits: generous for a loaded CI machine
DEADLINE_S = 120


def service_env(
    database_url: str, s3_server: Any, bucket: str, endpoint: str | None = None, **extra: Any
) -> dict[str, str]:
    env = {
        "DATABASE_URL": database_url,
        "S3_ENDPOINT_URL": endpoint or s3_server.endpoint_url,
        "S3_BUCKET": bucket,
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "S3_REGION": getattr(s3_server, "region", None) or "us-east-1",
        "S3_FORCE_PATH_STYLE": "true",
        "S3_CREATE_BUCKET": "true",
        "POLL_INTERVAL_MS": "50",
        "BATCH_FLUSH_INTERVAL_MS": "50",
        "BATCH_MAX_SIZE": "10",
        "LOG_AGGREGATION_WINDOW_S": "0",
        "SHUTDOWN_GRACE_S": "5",
        "DB_POOL_MIN_SIZE": "1",
        "DB_POOL_MAX_SIZE": "5",
    }
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


@contextlib.contextmanager
def services() -> Iterator[list[Any]]:
    """Processes started in the block are killed at its end, whatever happened."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for proc in started:
            with contextlib.suppress(Exception):
                proc.kill()


def start(started: list[Any], env: dict[str, str]) -> Any:
    proc = run_service(env)
    started.append(proc)
    return proc


def proxied_s3(tcp_proxy: Any, s3_server: Any) -> tuple[Any, str]:
    parts = urlsplit(s3_server.endpoint_url)
    proxy = tcp_proxy(parts.hostname, parts.port)
    return proxy, proxy.url_for(s3_server.endpoint_url)


def staged_spans(first: int, count: int) -> tuple[list[tuple[str, bytes, int]], list[str]]:
    """``count`` rows of two spans each, span ids numbered from ``first``."""
    rows, ids = [], []
    for n in range(first, first + 2 * count, 2):
        pair = [n.to_bytes(8, "big"), (n + 1).to_bytes(8, "big")]
        rows.append(("traces", span_request(pair, service_name="prefill"), 2))
        ids += [p.hex() for p in pair]
    return rows, ids


def assert_exactly_once(acked: dict[str, list[Hashable]], exported: Any) -> None:
    for signal, ids in acked.items():
        got = exported.counts(signal)
        want = Counter(ids)
        missing = want - got
        twice = {k: v for k, v in got.items() if v > 1}
        assert not missing, f"{signal}: {sum(missing.values())} acknowledged records missing"
        assert not twice, f"{signal}: {len(twice)} records in more than one manifest object"
        assert set(got) == set(want), f"{signal}: records exported that were never sent"
    keys = [r["object_key"] for r in exported.manifest]
    batches = [r["batch_id"] for r in exported.manifest]
    assert len(set(keys)) == len(keys), "an object is in the manifest twice"
    assert len(set(batches)) == len(batches)


async def batches_flushed(url: str) -> float:
    """The process's otelworker_batches_flushed_total, all signals, from its /metrics."""
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{url}/metrics")
    response.raise_for_status()
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "otelworker_batches_flushed_total":
                total += sample.value
    return total


async def processing_rows(dsn: str) -> list[dict[str, Any]]:
    return [r for r in await queue_rows(dsn) if r["status"] == "processing"]


# --- several workers on one database --------------------------------------------------------


async def test_two_workers_and_an_ingress_share_one_database_without_duplicates(
    database_url: str, s3_server: Any, s3_bucket: str, tcp_proxy: Any
) -> None:
    await migrate(database_url)
    rows, prefilled = staged_spans(1, 300)
    await stage_rows(database_url, rows)
    # Uploads a little slow, so that one worker cannot drain the backlog alone.
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    proxy.delay(0.02)
    worker = service_env(
        database_url,
        s3_server,
        s3_bucket,
        endpoint,
        role="worker",
        processing_queue_max_depth=10,
        batch_max_size=5,
        worker_concurrency=2,
    )
    with services() as started:
        w1 = start(started, worker)
        w2 = start(started, worker)
        ingress = start(started, service_env(database_url, s3_server, s3_bucket, role="ingress"))
        for proc in (w1, w2, ingress):
            await asyncio.to_thread(proc.wait_ready, READY_S)

        telemetry = Telemetry(ingress.url, service_name="via-ingress")
        sent = await asyncio.to_thread(telemetry.send_all, 60, 40, 40)
        assert sum(len(v) for v in sent.refused.values()) == 0

        status = await wait_drained(database_url, within_s=DEADLINE_S)
        assert status == {}, status
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))
        flushed = [await batches_flushed(w.url) for w in (w1, w2)]
        ingress_flushed = await batches_flushed(ingress.url)

    acked = {
        "traces": [*prefilled, *sent.acked["traces"]],
        "metrics": sent.acked["metrics"],
        "logs": sent.acked["logs"],
    }
    assert_exactly_once(acked, exported)
    assert sum(r["item_count"] for r in exported.manifest) == 300 + sent.requests
    assert all(r["item_count"] <= 5 for r in exported.manifest)
    # Both workers took part; the ingress-only process exported nothing.
    assert all(n > 0 for n in flushed), flushed
    assert sum(flushed) == len(exported.manifest)
    assert ingress_flushed == 0


# --- SIGKILL mid-batch: the lease brings the rows back ------------------------------------


async def test_sigkill_mid_batch_loses_no_acknowledged_record(
    database_url: str, s3_server: Any, s3_bucket: str, tcp_proxy: Any
) -> None:
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    lease_s = 3
    env = service_env(
        database_url,
        s3_server,
        s3_bucket,
        endpoint,
        lease_timeout_s=lease_s,
        batch_max_size=5,
        processing_queue_max_depth=20,
    )
    with services() as started:
        first = start(started, env)
        await asyncio.to_thread(first.wait_ready, READY_S)
        proxy.delay(2.0)  # uploads hang in flight
        telemetry = Telemetry(first.url, service_name="killed")
        sent = await asyncio.to_thread(telemetry.send_all, 60, 30, 30)
        assert sum(len(v) for v in sent.refused.values()) == 0
        held = await wait_for(
            lambda: processing_rows(database_url),
            lambda rows: len(rows) > 0,
            within_s=DEADLINE_S,
            what="claims in flight",
        )
        first.kill()
        # The dead process's claims stay until their lease expires.
        orphaned = await processing_rows(database_url)
        assert orphaned, "no claim was in flight when the process died"
        assert len({r["lease_token"] for r in [*held, *orphaned]}) == 1  # one process's

        proxy.pass_through()
        second = start(
            started,
            service_env(database_url, s3_server, s3_bucket, lease_timeout_s=lease_s),
        )
        await asyncio.to_thread(second.wait_ready, READY_S)
        status = await wait_drained(database_url, within_s=DEADLINE_S)
        assert status == {}, status
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))

    assert_exactly_once(sent.acked, exported)
    assert sum(r["item_count"] for r in exported.manifest) == sent.requests


# --- SIGTERM with buffered items: flushed or released, never left claimed ------------------


async def test_sigterm_releases_unflushed_claims(
    database_url: str, s3_server: Any, s3_bucket: str, tcp_proxy: Any
) -> None:
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    env = service_env(
        database_url,
        s3_server,
        s3_bucket,
        endpoint,
        lease_timeout_s=300,  # a claim left behind would block its rows for five minutes
        shutdown_grace_s=1,
        batch_max_size=5,
        processing_queue_max_depth=20,
        s3_timeout_s=60,
    )
    with services() as started:
        proc = start(started, env)
        await asyncio.to_thread(proc.wait_ready, READY_S)
        proxy.delay(5.0)  # no upload finishes within the shutdown grace
        telemetry = Telemetry(proc.url, service_name="stopped")
        sent = await asyncio.to_thread(telemetry.send_all, 40, 20, 20)
        assert sum(len(v) for v in sent.refused.values()) == 0
        await wait_for(
            lambda: processing_rows(database_url),
            lambda rows: len(rows) >= 5,
            within_s=DEADLINE_S,
            what="buffered claims",
        )
        await asyncio.to_thread(proc.terminate, 60)

        rows = await queue_rows(database_url)
        released = proc.events("claims_released")
        manifest_items = sum(
            r["item_count"]
            for r in (
                await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))
            ).manifest
        )
        # Nothing is left claimed by the stopped process: each row was flushed (gone from the
        # queue, in the manifest) or released (pending, no lease).
        assert [r for r in rows if r["status"] == "processing"] == []
        assert all(r["lease_token"] is None and r["lease_expires_at"] is None for r in rows)
        assert {r["status"] for r in rows} <= {"pending"}
        assert len(rows) + manifest_items == sent.requests
        assert released, "claims_released not logged"
        assert sum(r.get("items", 0) for r in released) == len(rows)

        # The released rows are claimable at once: a new worker drains them.
        proxy.pass_through()
        second = start(
            started, service_env(database_url, s3_server, s3_bucket, lease_timeout_s=300)
        )
        await asyncio.to_thread(second.wait_ready, READY_S)
        status = await wait_drained(database_url, within_s=DEADLINE_S)
        assert status == {}, status
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))

    assert_exactly_once(sent.acked, exported)
