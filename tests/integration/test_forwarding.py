"""Forwarding against a real PostgreSQL and the local object store: the hand-off in the
manifest's transaction, the claim (SKIP LOCKED, leases), two forwarders sharing the work,
and the commands (``redeliver``, ``destinations``, ``prune``, ``requeue-dead
--destination``) as an operator runs them. The destinations are small aiohttp OTLP/HTTP
receivers in the test's loop that count what they were sent."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from otelworker import otlp
from otelworker.forwarding.deliveries import CHANNEL, DeliveryQueue
from otelworker.forwarding.destinations import load_destinations
from otelworker.forwarding.forwarder import Forwarder
from otelworker.metrics import Metrics
from otelworker.settings import Compression
from otelworker.sinks.base import object_key
from otelworker.sinks.local import LocalObjectStore
from otelworker.staging.database import create_pool
from otelworker.staging.queue import Manifest, StagingQueue
from otelworker.supervisor import Supervisor
from tests.integration.test_archive import json_lines, ok, run_cli
from tests.integration.test_failures import FAST, cli_env
from tests.support.objects import (
    Telemetry,
    migrate,
    record_ids,
    span_request,
    stage_rows,
    until,
    wait_drained,
)
from tests.support.server import running_service

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0


# --- a counting OTLP/HTTP receiver -----------------------------------------------------------


@dataclass
class Receiver:
    """POST /{destination}/v1/{signal}: decodes the body, counts its records' ids per
    destination and signal, answers ``status`` (200: an OTLP success)."""

    url: str = ""
    status: int = 200
    received: dict[tuple[str, str], Counter[Hashable]] = field(default_factory=dict)
    tenants: Counter[tuple[str, str | None]] = field(default_factory=Counter)
    requests: int = 0
    arrived: dict[Hashable, float] = field(default_factory=dict)  # id -> first arrival

    def ids(self, destination: str, signal: str) -> Counter[Hashable]:
        return self.received.get((destination, signal), Counter())

    def endpoint(self, destination: str) -> str:
        return f"{self.url}/{destination}"

    async def handle(self, request: web.Request) -> web.Response:
        destination, signal = request.match_info["dest"], request.match_info["signal"]
        body = await request.read()
        if body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        self.requests += 1
        if self.status != 200:
            return web.Response(status=self.status, text="no")
        ids = record_ids(signal, otlp.decode(signal, body))
        self.received.setdefault((destination, signal), Counter()).update(ids)
        now = time.monotonic()
        for i in ids:
            self.arrived.setdefault(i, now)
        self.tenants[(destination, request.headers.get("X-Scope-OrgID"))] += len(ids)
        return web.Response(
            body=otlp.success(signal, otlp.PROTOBUF), content_type="application/x-protobuf"
        )


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/{dest}/v1/{signal}", rx.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rx.url = f"http://127.0.0.1:{port}"
    try:
        yield rx
    finally:
        await runner.cleanup()


def write_destinations(path: Path, entries: Sequence[dict[str, Any]]) -> str:
    path.write_bytes(orjson.dumps({"destinations": list(entries)}))
    return str(path)


# --- archived objects made by hand -----------------------------------------------------------


@dataclass
class Seeded:
    batch_id: uuid.UUID
    key: str
    span_ids: list[str]


async def seed(
    dsn: str,
    objects_dir: Path,
    n: int,
    destinations: Sequence[str] = (),
    *,
    tenant: str = "default",
    spans: int = 3,
    stored_ago: timedelta | None = None,
) -> list[Seeded]:
    """``n`` archived trace objects (gzip'd, in the local store, with manifest rows) and a
    pending delivery of each for every one of ``destinations``."""
    store = LocalObjectStore(objects_dir)
    conn = await asyncpg.connect(dsn)
    out: list[Seeded] = []
    try:
        for _ in range(n):
            span_ids = [os.urandom(8) for _ in range(spans)]
            raw = span_request(span_ids)
            body = gzip.compress(raw)
            batch_id = uuid.uuid4()
            key = object_key(
                "otel", "traces", batch_id, datetime.now(UTC), Compression.GZIP, tenant
            )
            await store.put(key, body, "application/x-protobuf", "gzip")
            now = datetime.now(UTC)
            created = now - stored_ago if stored_ago is not None else now
            await conn.execute(
                "INSERT INTO export_batches (batch_id, signal, object_key, item_count,"
                " record_count, compressed_bytes, raw_bytes, min_time, max_time,"
                " service_names, tenant, created_at)"
                " VALUES ($1, 'traces', $2, 1, $3, $4, $5, $6, $6, '{staged}', $7, $8)",
                batch_id,
                key,
                spans,
                len(body),
                len(raw),
                now,
                tenant,
                created,
            )
            for destination in destinations:
                await conn.execute(
                    "INSERT INTO deliveries (destination, batch_id, object_key, signal, tenant,"
                    " record_count, raw_bytes, compressed_bytes, created_at)"
                    " VALUES ($1, $2, $3, 'traces', $4, $5, $6, $7, $8)",
                    destination,
                    batch_id,
                    key,
                    tenant,
                    spans,
                    len(raw),
                    len(body),
                    created,
                )
            out.append(Seeded(batch_id, key, [s.hex() for s in span_ids]))
    finally:
        await conn.close()
    return out


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def statuses(dsn: str, destination: str | None = None) -> Counter[str]:
    rows = await fetch(
        dsn,
        "SELECT status, count(*) AS n FROM deliveries WHERE $1::text IS NULL OR destination = $1"
        " GROUP BY status",
        destination,
    )
    return Counter({r["status"]: int(r["n"]) for r in rows})


@contextlib.asynccontextmanager
async def pool_of(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(dsn, min_size=1, max_size=8, connect_timeout_s=5, startup_timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()


# --- the hand-off, end to end -----------------------------------------------------------------


async def test_exported_objects_reach_every_destination_that_wants_them_and_only_those(
    database_url: str, tmp_path: Path
) -> None:
    async with receiver() as rx:
        destinations = write_destinations(
            tmp_path / "destinations.json",
            [
                {"name": "tempo", "endpoint": rx.endpoint("tempo"), "signals": ["traces"]},
                {
                    "name": "loki",
                    "endpoint": rx.endpoint("loki"),
                    "signals": ["logs"],
                    "tenants": ["team-a"],
                },
                {"name": "everything", "endpoint": rx.endpoint("everything"), "concurrency": 2},
            ],
        )
        async with running_service(
            database_url=database_url,
            local_object_dir=str(tmp_path / "objects"),
            destinations_file=destinations,
            **FAST,
        ) as svc:
            sent = {}
            for tenant in ("team-a", "team-b"):
                telemetry = Telemetry(
                    svc.url, service_name=tenant, tag=tenant, headers={"X-Scope-OrgID": tenant}
                )
                await asyncio.to_thread(telemetry.send_all, 12, 6, 6)
                sent[tenant] = telemetry.sent
            await wait_drained(database_url, within_s=DEADLINE_S)
            await until(
                lambda: statuses(database_url),
                within_s=DEADLINE_S,
                what="every delivery delivered",
            )
            await until_delivered(database_url)
            forwarder = svc.service.forwarder
            assert forwarder is not None and forwarder.cache.hits > 0  # handed over in memory

        # Each manifest row has exactly the deliveries its signal and tenant call for.
        rows = await fetch(
            database_url,
            "SELECT b.signal, b.tenant, array_agg(d.destination ORDER BY d.destination) AS d"
            " FROM export_batches b LEFT JOIN deliveries d USING (batch_id)"
            " GROUP BY b.batch_id, b.signal, b.tenant",
        )
        assert rows
        for row in rows:
            expected = ["everything"]
            if row["signal"] == "traces":
                expected.append("tempo")
            if row["signal"] == "logs" and row["tenant"] == "team-a":
                expected.append("loki")
            assert list(row["d"]) == sorted(expected), dict(row)

        def acked(signal: str, *tenants: str) -> Counter[Hashable]:
            return Counter(i for t in tenants for i in sent[t].acked[signal])

        assert rx.ids("tempo", "traces") == acked("traces", "team-a", "team-b")
        assert rx.ids("loki", "logs") == acked("logs", "team-a")
        for signal in ("traces", "metrics", "logs"):
            assert rx.ids("everything", signal) == acked(signal, "team-a", "team-b")
        assert not rx.ids("tempo", "logs") and not rx.ids("loki", "traces")
        # The object's tenant rides in the tenant header.
        assert {t for (d, t) in rx.tenants if d == "everything"} == {"team-a", "team-b"}


async def until_delivered(dsn: str, destination: str | None = None) -> None:
    async def check() -> bool:
        s = await statuses(dsn, destination)
        return bool(s) and set(s) == {"delivered"}

    await until(check, within_s=DEADLINE_S, what="every delivery delivered")


async def test_the_deliveries_commit_with_the_manifest_row_or_not_at_all(
    database_url: str,
) -> None:
    await migrate(database_url)
    async with pool_of(database_url) as pool:
        queue = StagingQueue(pool)
        [item] = await stage_rows(database_url, [("traces", span_request([b"a" * 8]), 1)])
        token = uuid.uuid4()
        await queue.claim(10, 30.0, token)
        listener = await asyncpg.connect(database_url)
        heard: list[str] = []
        await listener.add_listener(CHANNEL, lambda *a: heard.append(a[3]))

        def manifest(key: str) -> Manifest:
            return Manifest(uuid.uuid4(), "traces", key, 1, 1, 10, 20, None, None, ["s"], "t")

        # Not our lease any more: nothing commits, neither the manifest row nor deliveries.
        assert await queue.complete(manifest("k/lost"), [item], uuid.uuid4(), ["a", "b"]) is False
        assert not await fetch(database_url, "SELECT 1 FROM export_batches")
        assert not await fetch(database_url, "SELECT 1 FROM deliveries")
        # Ours: both, in one transaction, and one wake-up naming the destinations.
        assert await queue.complete(manifest("k/ok"), [item], token, ["a", "b"])
        rows = await fetch(
            database_url,
            "SELECT destination, object_key, tenant, record_count, raw_bytes, compressed_bytes,"
            " status FROM deliveries ORDER BY destination",
        )
        assert [tuple(r) for r in rows] == [
            ("a", "k/ok", "t", 1, 20, 10, "pending"),
            ("b", "k/ok", "t", 1, 20, 10, "pending"),
        ]
        await until(lambda: heard, within_s=5, what="the notification")
        assert heard == ["a,b"]
        await listener.close()


# --- the claim --------------------------------------------------------------------------------


async def test_claim_skips_locked_and_held_rows_and_takes_expired_leases_back(
    database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url)
    await seed(database_url, tmp_path / "objects", 3, ["tempo", "other"])
    async with pool_of(database_url) as pool:
        q = DeliveryQueue(pool)
        mine, theirs = uuid.uuid4(), uuid.uuid4()
        first = await q.claim("tempo", 2, 0.5, mine)
        assert len(first) == 2 and {d.destination for d in first} == {"tempo"}
        # The third is the only one left; the claimed ones are not offered while leased.
        [third] = await q.claim("tempo", 5, 30.0, theirs)
        assert third.id not in {d.id for d in first}
        assert await q.claim("tempo", 5, 30.0, theirs) == []
        await asyncio.sleep(0.7)  # the first two leases expire
        # Never a row this forwarder still holds, even with its lease run out ...
        held = [d.id for d in first]
        assert await q.claim("tempo", 5, 30.0, mine, held) == []
        # ... but another forwarder takes them back.
        back = await q.claim("tempo", 5, 30.0, theirs)
        assert sorted(d.id for d in back) == sorted(held)
        # And the mark of the forwarder that lost the lease changes nothing.
        assert not await q.delivered(first[0].id, mine, 0, "200")
        assert await q.delivered(first[0].id, theirs, 0, "200")
        # A retry is pending again after its delay; a release gives back at once.
        assert await q.retry(first[1].id, theirs, 3600.0, "503", "down")
        assert await q.claim("tempo", 5, 30.0, mine) == []
        await q.release(theirs)
        [again] = await q.claim("tempo", 5, 30.0, mine)
        assert again.id == third.id
        assert len(await q.claim("other", 10, 30.0, mine)) == 3  # another destination's


async def test_two_forwarders_share_the_work_without_sending_anything_twice(
    database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url)
    seeded = await seed(database_url, tmp_path / "objects", 60, ["tempo"])
    async with receiver() as rx, pool_of(database_url) as pool:
        path = write_destinations(
            tmp_path / "d.json",
            [{"name": "tempo", "endpoint": rx.endpoint("tempo"), "concurrency": 3}],
        )
        destinations = load_destinations(path)
        store = LocalObjectStore(tmp_path / "objects")
        supervisors = [Supervisor(), Supervisor()]
        forwarders = [
            Forwarder(
                DeliveryQueue(pool),
                store,
                Metrics(),
                destinations=lambda: destinations,
                lease_s=30.0,
                backoff_max_s=5.0,
                poll_interval_s=0.2,
                cache_bytes=0,
            )
            for _ in supervisors
        ]
        for forwarder, sup in zip(forwarders, supervisors, strict=True):
            forwarder.start(sup, database_url)
        await until_delivered(database_url, "tempo")
        for forwarder, sup in zip(forwarders, supervisors, strict=True):
            await forwarder.stop(sup, 2.0)
            await sup.cancel_all()
        expected = Counter(i for s in seeded for i in s.span_ids)
        assert rx.ids("tempo", "traces") == expected  # each span exactly once
        assert rx.requests == 60
        per = [
            f.metrics.registry.get_sample_value(
                "otelworker_forward_attempts_total",
                {"destination": "tempo", "outcome": "delivered"},
            )
            or 0
            for f in forwarders
        ]
        assert sum(per) == 60 and all(p > 0 for p in per), per  # both took a share


async def test_a_missing_object_is_dead_and_a_refusing_destination_parks_it_dead(
    database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url)
    seeded = await seed(database_url, tmp_path / "objects", 2, ["tempo"])
    (tmp_path / "objects" / seeded[0].key).unlink()  # gone (pruned with --force, say)
    async with receiver() as rx, pool_of(database_url) as pool:
        rx.status = 400
        destinations = load_destinations(
            write_destinations(
                tmp_path / "d.json", [{"name": "tempo", "endpoint": rx.endpoint("tempo")}]
            )
        )
        sup = Supervisor()
        forwarder = Forwarder(
            DeliveryQueue(pool),
            LocalObjectStore(tmp_path / "objects"),
            Metrics(),
            destinations=lambda: destinations,
            lease_s=30.0,
            backoff_max_s=5.0,
            poll_interval_s=0.2,
            cache_bytes=0,
        )
        forwarder.start(sup, database_url)
        await until(lambda: statuses(database_url), within_s=DEADLINE_S, what="deliveries")

        async def both_dead() -> bool:
            return (await statuses(database_url)) == Counter({"dead": 2})

        await until(both_dead, within_s=DEADLINE_S, what="both dead")
        await forwarder.refresh_stats()
        assert (
            forwarder.metrics.registry.get_sample_value(
                "otelworker_forward_dead_objects", {"destination": "tempo"}
            )
            == 2
        )
        await forwarder.stop(sup, 1.0)
        await sup.cancel_all()
    rows = {
        r["object_key"]: r
        for r in await fetch(
            database_url, "SELECT object_key, last_status, last_error FROM deliveries"
        )
    }
    assert rows[seeded[0].key]["last_status"] == "object_missing"
    assert "not in the object store" in rows[seeded[0].key]["last_error"]
    assert rows[seeded[1].key]["last_status"] == "http_400"


# --- the commands -------------------------------------------------------------------------------


def forwarding_env(database_url: str, tmp_path: Path, destinations: str) -> dict[str, str]:
    return {
        **cli_env(database_url),
        "LOCAL_OBJECT_DIR": str(tmp_path / "objects"),
        "DESTINATIONS_FILE": destinations,
    }


async def test_redeliver_queues_once_unless_again_and_only_what_the_destination_takes(
    database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url)
    old = await seed(database_url, tmp_path / "objects", 4, stored_ago=timedelta(days=3))
    await seed(database_url, tmp_path / "objects", 2, tenant="team-b")
    path = write_destinations(
        tmp_path / "d.json",
        [
            {"name": "tempo", "endpoint": "http://127.0.0.1:9/t", "signals": ["traces"]},
            {"name": "loki", "endpoint": "http://127.0.0.1:9/l", "signals": ["logs"]},
            {"name": "a-only", "endpoint": "http://127.0.0.1:9/a", "tenants": ["default"]},
        ],
    )
    env = forwarding_env(database_url, tmp_path, path)

    run = ok(
        await run_cli(
            env, tmp_path, "redeliver", "--destination", "tempo", "--since", "30d", "--dry-run"
        )
    )
    assert "would queue 6 object(s)" in run.out, run.out
    assert await statuses(database_url) == Counter()
    run = ok(await run_cli(env, tmp_path, "redeliver", "--destination", "tempo", "--since", "30d"))
    assert "queued 6 object(s)" in run.out, run.out
    run = ok(await run_cli(env, tmp_path, "redeliver", "--destination", "tempo", "--since", "30d"))
    assert "queued 0 object(s)" in run.out and "6 skipped" in run.out, run.out
    assert await statuses(database_url, "tempo") == Counter({"pending": 6})

    # Delivered ones are skipped too, unless --again; pending ones stay as they are.
    await fetch(
        database_url,
        "UPDATE deliveries SET status = 'delivered', delivered_at = now()"
        " WHERE object_key = ANY($1::text[])",
        [s.key for s in old],
    )
    run = ok(await run_cli(env, tmp_path, "redeliver", "--destination", "tempo", "--since", "30d"))
    assert "queued 0 object(s)" in run.out, run.out
    run = ok(
        await run_cli(
            env, tmp_path, "redeliver", "--destination", "tempo", "--since", "30d", "--again"
        )
    )
    assert "queued 4 object(s)" in run.out, run.out
    assert await statuses(database_url, "tempo") == Counter({"pending": 6})

    # A destination that takes no traces gets none; one of a tenant only that tenant's.
    run = ok(await run_cli(env, tmp_path, "redeliver", "--destination", "loki", "--since", "30d"))
    assert "queued 0 object(s)" in run.out, run.out
    run = ok(await run_cli(env, tmp_path, "redeliver", "--destination", "a-only", "--since", "30d"))
    assert "queued 4 object(s)" in run.out, run.out
    # The window: objects whose data is older than --since are not selected.
    await fetch(database_url, "DELETE FROM deliveries")
    run = ok(
        await run_cli(
            env,
            tmp_path,
            "redeliver",
            "--destination",
            "tempo",
            "--since",
            "1h",
            "--tenant",
            "team-b",
        )
    )
    assert "queued 2 object(s)" in run.out, run.out

    bad = await run_cli(env, tmp_path, "redeliver", "--destination", "nope", "--since", "1h")
    assert bad.code == 2 and "no destination 'nope'" in bad.err


async def test_destinations_lists_progress_and_requeue_dead_brings_a_destination_back(
    database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url)
    seeded = await seed(database_url, tmp_path / "objects", 5, ["tempo", "gone"])
    keys = [s.key for s in seeded]
    await fetch(
        database_url,
        "UPDATE deliveries SET status = 'delivered', delivered_at = now(), rejected_records = 1"
        " WHERE destination = 'tempo' AND object_key = ANY($1::text[])",
        keys[:2],
    )
    await fetch(
        database_url,
        "UPDATE deliveries SET status = 'dead', last_status = '400', last_error = 'bad span',"
        " last_attempt_at = now() WHERE destination = 'tempo' AND object_key = $1",
        keys[2],
    )
    await fetch(database_url, "UPDATE deliveries SET created_at = now() - interval '2 hours'")
    path = write_destinations(
        tmp_path / "d.json",
        [
            {"name": "tempo", "endpoint": "http://127.0.0.1:9/t"},
            {"name": "idle", "endpoint": "http://127.0.0.1:9/i"},
        ],
    )
    env = forwarding_env(database_url, tmp_path, path)
    listed = {
        o["destination"]: o
        for o in json_lines(ok(await run_cli(env, tmp_path, "destinations", "--json")).out)
    }
    assert list(listed) == ["tempo", "idle", "gone"]
    tempo = listed["tempo"]
    assert tempo["configured"] is True
    assert (tempo["pending_objects"], tempo["delivered_objects"], tempo["dead_objects"]) == (
        2,
        2,
        1,
    )
    assert (tempo["delivered_records"], tempo["rejected_records"]) == (4, 2)
    assert 7000 < tempo["oldest_pending_s"] < 7400
    assert tempo["last_error"]["status"] == "400" and tempo["last_error"]["message"] == "bad span"
    assert listed["gone"]["configured"] is False and listed["gone"]["pending_objects"] == 5
    assert listed["idle"]["pending_objects"] == 0 and listed["idle"]["last_error"] is None

    table = ok(await run_cli(env, tmp_path, "destinations")).out
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["DESTINATION", "CONFIGURED", "PENDING"]
    assert any(line.startswith("gone") and "not configured" in line for line in lines)
    assert "tempo: last error: 400: bad span" in table

    run = ok(await run_cli(env, tmp_path, "requeue-dead", "--destination", "tempo"))
    assert "requeued 1 dead deliveries for destination tempo" in run.out
    assert await statuses(database_url, "tempo") == Counter({"pending": 3, "delivered": 2})
    # Without --destination it still means the staging queue's dead items.
    run = ok(await run_cli(env, tmp_path, "requeue-dead"))
    assert "requeued 0 dead item(s)" in run.out


async def test_prune_keeps_what_a_destination_has_not_taken_and_force_counts_it_lost(
    database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url)
    objects = tmp_path / "objects"
    old = await seed(database_url, objects, 4, ["tempo"], stored_ago=timedelta(days=40))
    young = await seed(database_url, objects, 1, ["tempo"])
    # Two old objects taken, one dead (refused: not taken, so kept), one still pending.
    await fetch(
        database_url,
        "UPDATE deliveries SET status = 'delivered' WHERE object_key = ANY($1::text[])",
        [old[0].key, old[1].key],
    )
    await fetch(
        database_url, "UPDATE deliveries SET status = 'dead' WHERE object_key = $1", old[2].key
    )
    path = write_destinations(
        tmp_path / "d.json", [{"name": "tempo", "endpoint": "http://127.0.0.1:9"}]
    )
    env = forwarding_env(database_url, tmp_path, path)

    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "30d", "--dry-run"))
    assert "would delete 2 manifest row(s)" in run.out, run.out
    assert "kept 2 object(s) that destinations have not taken yet (tempo 2)" in run.out
    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "30d"))
    assert "deleted 2 manifest row(s)" in run.out and "kept 2 object(s)" in run.out, run.out
    keys = {
        r["object_key"] for r in await fetch(database_url, "SELECT object_key FROM export_batches")
    }
    assert keys == {old[2].key, old[3].key, young[0].key}
    assert (objects / old[3].key).exists() and not (objects / old[0].key).exists()
    assert (objects / old[2].key).exists()  # the dead one: requeue-dead can still send it

    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "30d", "--force", "--dry-run"))
    assert "would delete 2 manifest row(s)" in run.out and "would lose" in run.out, run.out
    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "30d", "--force"))
    assert "deleted 2 manifest row(s)" in run.out, run.out
    assert "lost undelivered object(s) per destination: tempo 2" in run.out, run.out
    assert not (objects / old[3].key).exists() and not (objects / old[2].key).exists()
    assert await statuses(database_url, "tempo") == Counter({"pending": 1})  # the young one

    # The loss is kept in the database: the forwarder's metric and the listing show it.
    async with pool_of(database_url) as pool:
        forwarder = Forwarder(
            DeliveryQueue(pool),
            LocalObjectStore(objects),
            Metrics(),
            destinations=lambda: [],
            lease_s=30.0,
            backoff_max_s=5.0,
            poll_interval_s=1.0,
            cache_bytes=0,
        )
        await forwarder.refresh_stats()
        registry = forwarder.metrics.registry
        assert (
            registry.get_sample_value(
                "otelworker_forward_lost_objects_total", {"destination": "tempo"}
            )
            == 2
        )
        assert (
            registry.get_sample_value(
                "otelworker_forward_pending_objects", {"destination": "tempo"}
            )
            == 1
        )
    [listed] = json_lines(ok(await run_cli(env, tmp_path, "destinations", "--json")).out)
    assert listed["lost_objects"] == 2


async def test_a_forwarder_only_process_delivers_what_a_worker_exported(
    database_url: str, tmp_path: Path
) -> None:
    """ROLE=worker with no destinations file makes no deliveries; with it, a ROLE=forwarder
    process (no exporter of its own) sends what the worker committed, woken by NOTIFY."""
    async with receiver() as rx:
        path = write_destinations(
            tmp_path / "d.json", [{"name": "tempo", "endpoint": rx.endpoint("tempo")}]
        )
        objects = str(tmp_path / "objects")
        common = {"database_url": database_url, "local_object_dir": objects, **FAST}
        async with running_service(
            role="forwarder", destinations_file=path, forward_poll_interval_s=3600, **common
        ) as fwd:
            assert fwd.service.pipeline is None and fwd.service.forwarder is not None
            async with running_service(destinations_file=path, **common) as svc:
                # This process's own forwarder stopped: its exporter still hands off.
                assert svc.service.forwarder is not None
                await svc.service.forwarder.stop(svc.service.supervisor, 1.0)
                telemetry = Telemetry(svc.url, service_name="solo")
                started = time.monotonic()
                await asyncio.to_thread(telemetry.send_spans, telemetry.spans(6), sizes=(2,))
                await until(
                    lambda: sum(rx.ids("tempo", "traces").values()) >= 6,
                    within_s=DEADLINE_S,
                    what="the spans at the destination",
                )
                # Not the hour-long poll interval: NOTIFY woke the forwarder process.
                assert time.monotonic() - started < 30
        assert rx.ids("tempo", "traces") == Counter(telemetry.sent.acked["traces"])


async def test_ack_to_delivery_latency_at_default_settings(
    database_url: str, tmp_path: Path
) -> None:
    """At the default batch and poll settings, a record acknowledged at the door reaches an
    idle, healthy destination well within 2 s (no polling interval on that path: the
    exporter's commit wakes the forwarder in the process)."""
    async with receiver() as rx:
        path = write_destinations(
            tmp_path / "d.json", [{"name": "tempo", "endpoint": rx.endpoint("tempo")}]
        )
        async with running_service(
            database_url=database_url,
            local_object_dir=str(tmp_path / "objects"),
            destinations_file=path,
        ) as svc:
            telemetry = Telemetry(svc.url, service_name="latency")
            acked_at: dict[Hashable, float] = {}

            def send(n: int) -> None:
                for _ in range(n):
                    spans = telemetry.spans(5)
                    telemetry.send_spans(spans, sizes=(5,))
                    now = time.monotonic()
                    for span in spans:
                        acked_at[telemetry.span_id(span)] = now
                    time.sleep(0.1)

            await asyncio.to_thread(send, 40)
            await until(
                lambda: len(rx.arrived) >= len(acked_at), within_s=DEADLINE_S, what="all spans"
            )
        latencies = sorted(rx.arrived[i] - acked_at[i] for i in acked_at)
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"ack-to-delivery latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
        assert p99 < 2.0, (p50, p99)


async def test_an_object_missing_from_s3_is_told_apart_from_an_outage(
    s3_server: Any, s3_bucket: str, tcp_proxy: Any
) -> None:
    """The forwarder parks a delivery dead only when the store says the object is not
    there (S3's NoSuchKey); an unreachable store is an outage, retried."""
    from otelworker.exceptions import ObjectStoreError
    from otelworker.forwarding.forwarder import object_missing
    from otelworker.settings import load_settings
    from otelworker.sinks.factory import open_store
    from tests.integration.test_failures import proxied_s3, s3_settings

    store = await open_store(load_settings(**s3_settings(s3_server, s3_bucket)))
    try:
        await store.put("otel/present", b"x", "application/x-protobuf", None)
        assert await store.get("otel/present") == b"x"
        with pytest.raises(ObjectStoreError) as missing:
            await store.get("otel/absent")
        assert object_missing(missing.value), missing.value
    finally:
        await store.close()
    proxy, endpoint = proxied_s3(tcp_proxy, s3_server)
    proxy.refuse()  # the store is unreachable
    settings = load_settings(
        **s3_settings(s3_server, s3_bucket, s3_endpoint_url=endpoint, s3_timeout_s=2)
    )
    store = await open_store(settings.model_copy(update={"s3_create_bucket": False}))
    try:
        with pytest.raises(ObjectStoreError) as outage:
            await store.get("otel/present")
        assert not object_missing(outage.value), outage.value
    finally:
        await store.close()
