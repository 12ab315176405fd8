"""Failures: S3 down and back, a slow object store, poison payloads, dead rows, orphans."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sys
import uuid
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from otelworker import otlp
from otelworker.archive.manifest import ArchiveIndex
from otelworker.archive.prune import ORPHAN_MIN_AGE, gc_orphans
from otelworker.settings import load_settings
from otelworker.sinks.factory import open_store
from tests.support.objects import (
    KEY_LAYOUT,
    S3Access,
    Store,
    Telemetry,
    migrate,
    queue_rows,
    queue_status,
    read_exported,
    record_ids,
    span_request,
    stage_rows,
    until,
    wait_drained,
    wait_for,
)
from tests.support.payloads import unstage
from tests.support.refusing_s3 import refusing_s3
from tests.support.server import running_service

pytestmark = pytest.mark.integration

FAST = {
    "poll_interval_ms": 50,
    "batch_flush_interval_ms": 50,
    "batch_max_size": 10,
    "lease_timeout_s": 10,
    "shutdown_grace_s": 5,
    "log_aggregation_window_s": 0,
    "s3_timeout_s": 5,
}
DEADLINE_S = 120  # a deadline, not a wait: generous for a loaded CI machine
CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def s3_settings(s3_server: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_bucket": bucket,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
        "s3_region": getattr(s3_server, "region", None) or "us-east-1",
        "s3_force_path_style": True,
        "s3_create_bucket": True,
        **extra,
    }


def proxied_s3(tcp_proxy: Any, s3_server: Any) -> tuple[Any, str]:
    """A proxy in front of the S3 server and the endpoint URL through it."""
    parts = urlsplit(s3_server.endpoint_url)
    proxy = tcp_proxy(parts.hostname, parts.port)
    return proxy, proxy.url_for(s3_server.endpoint_url)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def cli_env(
    database_url: str, s3_server: Any | None = None, bucket: str | None = None
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "S3_", "DATABASE_URL", "LOCAL_OBJECT_DIR"))
    }
    env["DATABASE_URL"] = database_url
    if s3_server is not None and bucket is not None:
        env.update(
            S3_ENDPOINT_URL=s3_server.endpoint_url,
            S3_BUCKET=bucket,
            S3_ACCESS_KEY_ID=s3_server.access_key_id,
            S3_SECRET_ACCESS_KEY=s3_server.secret_access_key,
            S3_REGION=getattr(s3_server, "region", None) or "us-east-1",
            S3_FORCE_PATH_STYLE="true",
        )
    return env


async def gc_orphans_hours_later(database_url: str, s3_server: Any, bucket: str) -> int:
    """gc-orphans as a run two hours from now would see the bucket: the objects planted by
    a test are as young as gc-orphans' least age (an hour) lets through no run, and S3
    objects cannot be backdated."""
    settings = load_settings(database_url=database_url, **s3_settings(s3_server, bucket))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    store = await open_store(settings)
    try:
        return await gc_orphans(
            store,
            ArchiveIndex(pool),
            prefix=settings.s3_prefix,
            older_than=ORPHAN_MIN_AGE,
            now=datetime.now(UTC) + timedelta(hours=2),
        )
    finally:
        await store.close()
        await pool.close()


async def cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run ``python -m otelworker ARGS`` without blocking the loop (the service runs in it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otelworker",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    assert proc.returncode == 0, (args, proc.returncode, out.decode(), err.decode())
    return out.decode()


# --- S3 down, then back ------------------------------------------------------------------


async def test_s3_outage_fails_rows_with_backoff_then_everything_drains(
    database_url: str,
    s3_server: Any,
    s3_bucket: str,
    tcp_proxy: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    backoff_max_ms = 500
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket, s3_endpoint_url=endpoint),
        **FAST,
        retry_backoff_initial_ms=50,
        retry_backoff_max_ms=backoff_max_ms,
        max_attempts=1000,
    ) as svc:
        proxy.refuse()
        telemetry = Telemetry(svc.url, service_name="outage")
        sent = await asyncio.to_thread(telemetry.send_all, 30, 20, 20)
        # The ingress does not depend on S3: every request is acknowledged.
        assert sum(len(v) for v in sent.refused.values()) == 0

        def failing_with_backoff(rows: list[dict[str, Any]]) -> bool:
            return (
                len(rows) == sent.requests
                and all(r["last_error"] for r in rows)
                # retried again and again
                and len(events(caplog, "batch_persist_failed")) >= 3 * len(rows)
                and any(r["status"] == "failed" and r["available_at"] > r["db_now"] for r in rows)
            )

        rows = await wait_for(
            lambda: queue_rows(database_url),
            failing_with_backoff,
            within_s=DEADLINE_S,
            what="rows to fail with backoff",
        )
        failed = [r for r in rows if r["status"] == "failed"]
        assert failed
        assert {r["status"] for r in rows} <= {"failed", "processing", "pending"}
        reasons = {r.reason for r in events(caplog, "batch_persist_failed")}
        assert reasons, "batch_persist_failed not logged"
        assert all(CLASS_NAME.match(reason) for reason in reasons), reasons
        for row in failed:
            assert row["attempts"] == 0  # an outage is not the rows' failure: none counted
            assert row["lease_token"] is None and row["lease_expires_at"] is None
            assert row["last_error"], row
            # last_error names the error class that was logged as the reason.
            assert row["last_error"].split(":")[0] in reasons, (row["last_error"], reasons)
            # Full jitter under the cap: never further out than RETRY_BACKOFF_MAX_MS.
            wait_s = (row["available_at"] - row["db_now"]).total_seconds()
            assert wait_s <= backoff_max_ms / 1000 + 0.05, wait_s
        logged = events(caplog, "batch_persist_failed")[0]
        assert logged.levelno == logging.WARNING
        assert logged.signal in ("traces", "metrics", "logs")
        assert uuid.UUID(logged.batch_id) and logged.items >= 1 and logged.records >= 1

        proxy.pass_through()
        status = await wait_drained(database_url, within_s=DEADLINE_S)
        assert status == {}, status
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))

    for signal in ("traces", "metrics", "logs"):
        assert Counter(exported.ids(signal)) == Counter(sent.acked[signal]), signal
    assert sum(r["item_count"] for r in exported.manifest) == sent.requests
    assert await queue_rows(database_url) == []


# --- a slow object store: the buffer fills, polling pauses and resumes ---------------------


async def test_slow_s3_pauses_polling_and_buffer_stays_within_capacity(
    database_url: str,
    s3_server: Any,
    s3_bucket: str,
    tcp_proxy: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    capacity = 4
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket, s3_endpoint_url=endpoint),
        **{
            **FAST,
            "processing_queue_max_depth": capacity,
            "batch_max_size": 2,
            "batch_flush_interval_ms": 20,
            "worker_concurrency": 1,
            "s3_timeout_s": 30,
        },
    ) as svc:
        pipeline = svc.service.pipeline
        assert pipeline is not None
        registry = svc.service.metrics.registry
        depths: list[int] = []
        gauge: list[float] = []

        async def sample() -> None:
            while True:
                depths.append(pipeline.buffer.depth)
                gauge.append(registry.get_sample_value("otelworker_buffer_items") or 0.0)
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        try:
            proxy.delay(0.2)
            telemetry = Telemetry(svc.url, service_name="slow")
            records = telemetry.log_records(24)
            await asyncio.to_thread(telemetry.send_logs, records, sizes=(1,))
            assert len(telemetry.sent.acked["logs"]) == 24

            await wait_for(
                lambda: events(caplog, "processing_paused"),
                lambda found: len(found) >= 1,
                within_s=DEADLINE_S,
                what="processing_paused",
            )
            await wait_for(
                lambda: [
                    r for r in events(caplog, "processing_resumed") if r.reason == "buffer_room"
                ],
                lambda found: len(found) >= 1,
                within_s=DEADLINE_S,
                what="processing_resumed",
            )
            proxy.pass_through()
            await wait_drained(database_url, within_s=DEADLINE_S)
        finally:
            sampler.cancel()
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))
        pauses = registry.get_sample_value("otelworker_polling_pauses_total")

    assert depths and max(depths) <= capacity, max(depths)
    assert max(depths) == capacity  # it did fill up
    assert max(gauge) <= capacity
    paused = events(caplog, "processing_paused")
    resumed = [r for r in events(caplog, "processing_resumed") if r.reason == "buffer_room"]
    assert all(r.reason == "buffer_full" for r in paused)
    assert all(r.buffer_capacity == capacity for r in paused)
    assert resumed and all(r.paused_s > 0 for r in resumed)
    # Once per pause: paused and its end alternate, never two pauses in a row.
    order = [
        r.event
        for r in caplog.records
        if getattr(r, "event", None) in ("processing_paused", "processing_resumed")
    ]
    assert all(a != b for a, b in itertools.pairwise(order)), order
    assert order[0] == "processing_paused"
    assert pauses == len(paused)
    assert sorted(exported.ids("logs")) == sorted(telemetry.sent.acked["logs"])


# --- a poison payload goes dead alone ------------------------------------------------------


async def test_poison_payload_goes_dead_alone(
    database_url: str, s3_server: Any, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    await migrate(database_url)
    good = [n.to_bytes(8, "big") for n in range(1, 11)]
    rows = [("traces", span_request([s]), 1) for s in good[:5]]
    rows.append(("traces", b"\x0a\xff\xff\xff\xffgarbage", 3))
    rows += [("traces", span_request([s]), 1) for s in good[5:]]
    ids = await stage_rows(database_url, rows)
    poison_id = ids[5]
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket),
        **{**FAST, "batch_max_size": 25, "batch_flush_interval_ms": 300},
    ):
        status = await wait_drained(database_url, within_s=DEADLINE_S)
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))

    assert status == {"dead": 1}
    (dead,) = await queue_rows(database_url)
    assert dead["id"] == poison_id
    assert dead["status"] == "dead"
    assert dead["attempts"] == 1
    assert dead["lease_token"] is None
    assert "invalid traces protobuf" in dead["last_error"]
    # The rest of its batch was uploaded: one object with the ten good items.
    assert [r["item_count"] for r in exported.manifest] == [10]
    assert exported.manifest[0]["record_count"] == 10
    assert sorted(exported.ids("traces")) == sorted(s.hex() for s in good)
    buried = [r for r in events(caplog, "items_dead") if r.reason == "undecodable"]
    assert [r.item_ids for r in buried] == [[poison_id]]
    assert events(caplog, "batch_persist_failed") == []


# --- MAX_ATTEMPTS -> dead; requeue-dead -> pending -> drained -------------------------------


async def test_rows_go_dead_after_max_attempts_and_requeue_dead_revives_them(
    database_url: str,
    s3_server: Any,
    s3_bucket: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attempts are counted by failures of the batch itself (the store refusing the object
    as invalid here); an outage counts none (test_promise.py)."""
    caplog.set_level(logging.INFO, logger="otelworker")
    async with (
        refusing_s3() as endpoint,
        running_service(
            database_url=database_url,
            **s3_settings(s3_server, s3_bucket, s3_endpoint_url=endpoint),
            **FAST,
            max_attempts=2,
            retry_backoff_initial_ms=20,
            retry_backoff_max_ms=100,
        ) as svc,
    ):
        telemetry = Telemetry(svc.url, service_name="dead")
        await asyncio.to_thread(telemetry.send_spans, telemetry.spans(20), sizes=(4,))
        await asyncio.to_thread(telemetry.send_logs, telemetry.log_records(6), sizes=(2,))
        sent = telemetry.sent
        assert sent.requests == 8 and not sent.refused["traces"] and not sent.refused["logs"]

        status = await wait_for(
            lambda: queue_status(database_url),
            lambda s: s == {"dead": 8},
            within_s=DEADLINE_S,
            what="every row dead",
        )
        rows = await queue_rows(database_url)
        assert all(r["attempts"] == 2 and r["last_error"] for r in rows), rows
        assert all(r["last_error"].startswith("InvalidArgument") for r in rows), rows
        exhausted = [r for r in events(caplog, "items_dead") if r.reason == "max_attempts"]
        assert sum(r.count for r in exhausted) == 8
        assert all(r.counted for r in events(caplog, "batch_persist_failed"))

    # The store takes objects again.
    async with running_service(
        database_url=database_url, **s3_settings(s3_server, s3_bucket), **FAST
    ):
        env = cli_env(database_url)
        out = await cli(env, tmp_path, "requeue-dead", "--signal", "logs", "--limit", "1")
        assert "requeued 1 dead item(s)" in out
        status = await wait_for(
            lambda: queue_status(database_url),
            lambda s: s == {"dead": 7},
            within_s=DEADLINE_S,
            what="the requeued row to drain",
        )
        # Dead rows are never claimed on their own, S3 back or not.
        still_dead = await queue_rows(database_url)
        assert [r["id"] for r in still_dead] == [
            r["id"] for r in rows if r["id"] in {d["id"] for d in still_dead}
        ]
        assert sorted(r["signal"] for r in still_dead) == ["logs"] * 2 + ["traces"] * 5

        out = await cli(env, tmp_path, "requeue-dead")
        assert "requeued 7 dead item(s)" in out
        status = await wait_drained(database_url, within_s=DEADLINE_S)
        assert status == {}
        exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))

    assert Counter(exported.ids("traces")) == Counter(sent.acked["traces"])
    assert Counter(exported.ids("logs")) == Counter(sent.acked["logs"])


async def test_requeue_dead_with_nothing_dead(database_url: str, tmp_path: Path) -> None:
    await migrate(database_url)
    out = await cli(cli_env(database_url), tmp_path, "requeue-dead")
    assert "requeued 0 dead item(s)" in out


# --- gc-orphans --------------------------------------------------------------------------


async def test_gc_orphans_removes_only_old_unindexed_objects_under_the_prefix(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    async with running_service(
        database_url=database_url, **s3_settings(s3_server, s3_bucket), **FAST
    ) as svc:
        telemetry = Telemetry(svc.url, service_name="gc")
        await asyncio.to_thread(telemetry.send_spans, telemetry.spans(12))
        await wait_drained(database_url, within_s=DEADLINE_S)
    store = Store(s3=S3Access.of(s3_server, s3_bucket))
    exported = await read_exported(database_url, store)
    indexed = sorted(exported.keys)
    assert indexed and store.keys() == indexed

    orphan = f"otel/year=2020/month=01/day=01/hour=00/minute=00/traces_{uuid.uuid4()}.binpb.gz"
    assert KEY_LAYOUT.match(orphan)
    outside = "elsewhere/not-ours.binpb.gz"
    store.put(orphan, b"left behind by an upload whose transaction did not commit")
    store.put(outside, b"not under S3_PREFIX")
    everything = sorted([*indexed, orphan, outside])
    assert store.keys() == everything

    env = cli_env(database_url, s3_server, s3_bucket)
    out = await cli(env, tmp_path, "gc-orphans", "--older-than-s", "3600")
    assert "removed 0 orphan object(s)" in out  # too young
    assert store.keys() == everything

    # Below prune's least age for an orphan (an hour): a usage error, nothing removed.
    with pytest.raises(AssertionError, match="at least 3600"):
        await cli(env, tmp_path, "gc-orphans", "--older-than-s", "0")
    textfile = tmp_path / "otelworker_gc.prom"
    out = await cli(env, tmp_path, "gc-orphans", "--dry-run", "--textfile", str(textfile))
    assert "would remove 0 orphan object(s)" in out
    # For node_exporter's textfile collector: the alert on orphans reads this.
    families = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
    [found] = families["otelworker_gc_orphans_found"].samples
    assert found.value == 0 and found.labels == {"dry_run": "true"}
    assert families["otelworker_gc_orphans_last_run_timestamp_seconds"].samples[0].value > 0
    assert store.keys() == everything

    assert await gc_orphans_hours_later(database_url, s3_server, s3_bucket) == 1
    assert store.keys() == sorted([*indexed, outside])
    # The manifest's objects are intact and still decode.
    again = await read_exported(database_url, store)
    assert sorted(again.ids("traces")) == sorted(telemetry.sent.acked["traces"])


# --- the operator's signals: oldest staged item, dead rows -----------------------------------


async def test_oldest_age_rises_while_s3_is_down_and_falls_to_zero_after_the_drain(
    database_url: str, s3_server: Any, s3_bucket: str, tcp_proxy: Any
) -> None:
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket, s3_endpoint_url=endpoint),
        **FAST,
        retry_backoff_initial_ms=50,
        retry_backoff_max_ms=300,
        max_attempts=1000,
        backlog_refresh_interval_ms=100,
    ) as svc:
        registry = svc.service.metrics.registry

        def gauge(name: str) -> float:
            return float(registry.get_sample_value(f"otelworker_{name}") or 0.0)

        assert gauge("staging_oldest_age_seconds") == 0.0
        proxy.refuse()
        telemetry = Telemetry(svc.url, service_name="oldest-age")
        sent = await asyncio.to_thread(telemetry.send_all, 3, 3, 3)
        assert sum(len(v) for v in sent.refused.values()) == 0

        # It rises while nothing can be exported: past 1 s, then further.
        first = await until(
            lambda: (age := gauge("staging_oldest_age_seconds")) > 1.0 and age,
            within_s=DEADLINE_S,
            what="the oldest age to pass 1 s",
        )
        await until(
            lambda: gauge("staging_oldest_age_seconds") > first + 0.5,
            within_s=DEADLINE_S,
            what="the oldest age to keep rising",
        )
        assert gauge("staging_dead_items") == 0.0
        assert gauge("ready") == 1.0  # S3 is not a readiness dependency

        proxy.pass_through()
        await wait_drained(database_url, within_s=DEADLINE_S)
        await until(
            lambda: gauge("staging_oldest_age_seconds") == 0.0,
            within_s=DEADLINE_S,
            what="the oldest age to fall to 0 after the drain",
        )


# --- staged compressed: joined at the flush, a corrupt row dead alone --------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
async def test_staged_compressed_rows_are_joined_and_a_corrupt_one_goes_dead_alone(
    database_url: str, s3_server: Any, s3_bucket: str, compression: str
) -> None:
    async with running_service(
        database_url=database_url,
        role="ingress",
        s3_compression=compression,
    ) as ingress:
        telemetry = Telemetry(ingress.url, service_name=f"staged-{compression}")
        await asyncio.to_thread(telemetry.send_spans, telemetry.spans(40), sizes=(4,))
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT id, payload, payload_encoding, raw_bytes, service_names, payload_crc"
            " FROM ingestion_queue ORDER BY id"
        )
        # Staged in the object's codec, with the facts the flush needs and the checksum
        # of the stored bytes it checks them by.
        assert {r["payload_encoding"] for r in rows} == {compression}
        assert all(r["service_names"] == [f"staged-{compression}"] for r in rows)
        assert all(len(unstage(r["payload"])) == r["raw_bytes"] for r in rows)
        assert all(r["payload_crc"] == zlib.crc32(r["payload"]) for r in rows)
        # A row staged before migration 0005 (no checksum) is checked by decompression.
        await conn.execute(
            "UPDATE ingestion_queue SET payload_crc = NULL WHERE id = $1", rows[5]["id"]
        )
        # One row's stored bytes cut short (a torn write, a bug): it must go dead alone.
        poison = rows[3]["id"]
        poison_ids = set(record_ids("traces", otlp.decode("traces", unstage(rows[3]["payload"]))))
        await conn.execute(
            "UPDATE ingestion_queue SET payload = substring(payload FROM 1 FOR 20) WHERE id = $1",
            poison,
        )
        # And one old-style row (before migration 0003: identity, no facts) beside them.
        old_span = b"\x77" * 8
        await conn.execute(
            "INSERT INTO ingestion_queue (signal, payload, record_count) VALUES ('traces', $1, 1)",
            span_request([old_span], service_name="staged-before"),
        )
    finally:
        await conn.close()

    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, s3_bucket, s3_compression=compression),
        **{**FAST, "role": "worker", "batch_max_size": 25, "batch_flush_interval_ms": 300},
    ):
        status = await wait_drained(database_url, within_s=DEADLINE_S)
    assert status == {"dead": 1}
    (dead,) = await queue_rows(database_url)
    assert dead["id"] == poison
    store = Store(s3=S3Access.of(s3_server, s3_bucket))
    exported = await read_exported(database_url, store)
    expected = [i for i in telemetry.sent.acked["traces"] if i not in poison_ids]
    assert sorted(exported.ids("traces")) == sorted([*expected, old_span.hex()])
    services = {name for row in exported.manifest for name in row["service_names"]}
    assert services == {f"staged-{compression}", "staged-before"}
    # The objects are several gzip members / zstd frames, one per payload: a reader that
    # stopped after the first would see one request's spans, not the object's.
    big = max(exported.objects, key=lambda o: len(o.ids))
    assert len(big.ids) > 4
    assert sum(r["raw_bytes"] for r in exported.manifest) > 0
