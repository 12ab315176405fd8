"""The staging schema and queue against a real PostgreSQL: migrations, schema.sql, group commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from otelworker.exceptions import StagingUnavailable
from otelworker.metrics import Metrics
from otelworker.staging.database import create_pool, latest_version, migrate, schema_is_current
from otelworker.staging.group_commit import GroupCommitter
from otelworker.staging.maintenance import QueueVacuum
from otelworker.staging.queue import StagingQueue
from otelworker.staging.sql import migrations, query, schema
from tests.support.provision import PgServer, create_database, drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
def other_database(pg_server: PgServer) -> Iterator[str]:
    """A second fresh database on the same server."""
    dsn = create_database(pg_server.dsn)
    yield dsn
    drop_database(pg_server.dsn, dsn)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(
        database_url, min_size=1, max_size=8, connect_timeout_s=5, startup_timeout_s=10
    )
    async with p.acquire() as conn:
        await migrate(conn)
    try:
        yield p
    finally:
        await p.close()


# --- migrations ---------------------------------------------------------------------------------


async def test_concurrent_migrations_apply_once(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        assert not await schema_is_current(conns[0])
        start = asyncio.Event()

        async def run(conn: Any) -> list[int]:
            await start.wait()
            return await migrate(conn)

        tasks = [asyncio.create_task(run(c)) for c in conns]
        await asyncio.sleep(0)
        start.set()
        results = await asyncio.gather(*tasks)

        every = [m.version for m in migrations()]
        # Exactly one replica applied them; the others found the schema current.
        assert sorted(results, key=len) == [[], [], [], every]
        rows = await conns[0].fetch("SELECT version, name FROM otelworker_migrations ORDER BY 1")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in migrations()
        ]
        for conn in conns:
            assert await schema_is_current(conn)
        assert latest_version() == every[-1]
    finally:
        for conn in conns:
            await conn.close()


async def test_migrate_again_is_a_no_op(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn) == [m.version for m in migrations()]
        await conn.execute(
            "INSERT INTO ingestion_queue (signal, payload, record_count) VALUES ('logs', 'x', 1)"
        )
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM ingestion_queue") == 1
        assert await conn.fetchval("SELECT count(*) FROM otelworker_migrations") == len(
            migrations()
        )
    finally:
        await conn.close()


async def test_migrate_waits_for_a_migration_in_progress(database_url: str) -> None:
    """The advisory lock, observed: a second migrate blocks while the first holds it."""
    holder = await asyncpg.connect(database_url)
    waiter = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(query("migration_lock"))
        blocked = asyncio.create_task(migrate(waiter))
        waiting_pid = waiter.get_server_pid()
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            wait_event = await holder.fetchval(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", waiting_pid
            )
            if wait_event == "Lock":
                break
            assert not blocked.done(), "migrate did not wait for the advisory lock"
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert not blocked.done()
        await tx.rollback()
        assert await asyncio.wait_for(blocked, 10) == [m.version for m in migrations()]
    finally:
        await holder.close()
        await waiter.close()


async def _describe_schema(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        columns = await conn.fetch(
            """
            SELECT table_name, column_name, ordinal_position, data_type, udt_name,
                   is_nullable, column_default, is_identity, identity_generation
            FROM information_schema.columns
            WHERE table_schema = 'public' AND table_name <> 'otelworker_migrations'
            ORDER BY table_name, ordinal_position
            """
        )
        indexes = await conn.fetch(
            """
            SELECT tablename, indexname, indexdef FROM pg_indexes
            WHERE schemaname = 'public' AND tablename <> 'otelworker_migrations'
            ORDER BY tablename, indexname
            """
        )
        constraints = await conn.fetch(
            """
            SELECT c.relname AS table_name, k.conname, k.contype, pg_get_constraintdef(k.oid) AS def
            FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relname <> 'otelworker_migrations'
            ORDER BY 1, 2
            """
        )
        tables = await conn.fetch(
            """
            SELECT table_name FROM information_schema.tables
            WHERE table_schema = 'public' AND table_name <> 'otelworker_migrations'
            ORDER BY 1
            """
        )
    finally:
        await conn.close()
    return {
        "tables": [tuple(r) for r in tables],
        "columns": [tuple(r) for r in columns],
        "indexes": [tuple(r) for r in indexes],
        "constraints": [tuple(r) for r in constraints],
    }


async def test_schema_sql_matches_the_migrations(database_url: str, other_database: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    conn = await asyncpg.connect(other_database)
    try:
        await conn.execute(schema())
    finally:
        await conn.close()

    migrated = await _describe_schema(database_url)
    from_schema = await _describe_schema(other_database)

    assert [t[0] for t in migrated["tables"]] == [
        "deliveries",
        "delivery_losses",
        "export_batches",
        "ingestion_queue",
        "parquet_files",
    ]
    for part in ("tables", "columns", "indexes", "constraints"):
        assert from_schema[part] == migrated[part], part

    columns = {c[1] for c in migrated["columns"] if c[0] == "ingestion_queue"}
    assert {
        "id",
        "signal",
        "payload",
        "record_count",
        "status",
        "attempts",
        "available_at",
        "lease_expires_at",
        "received_at",
        "last_error",
    } <= columns
    # A partial index serves the claim of available rows.
    claim_indexes = [
        i for i in migrated["indexes"] if i[0] == "ingestion_queue" and " WHERE " in i[2]
    ]
    assert claim_indexes, migrated["indexes"]


async def test_schema_version_reports_current_only_after_migrating(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await schema_is_current(conn) is False
        await migrate(conn)
        assert await schema_is_current(conn) is True
        # A newer schema (a rolling upgrade's new process migrated it): old code stays ready.
        newer = latest_version() + 1
        await conn.execute(
            "INSERT INTO otelworker_migrations (version, name) VALUES ($1, 'from the future')",
            newer,
        )
        assert await schema_is_current(conn) is True
        await conn.execute(
            "DELETE FROM otelworker_migrations WHERE version >= $1", latest_version()
        )
        assert await schema_is_current(conn) is False
    finally:
        await conn.close()


# --- the queue's ingress side -------------------------------------------------------------------


async def test_stage_many_inserts_all_rows_in_one_transaction(pool: asyncpg.Pool) -> None:
    queue = StagingQueue(pool)
    async with pool.acquire() as listener:
        notified = asyncio.Event()

        def on_notify(*_: object) -> None:
            notified.set()

        await listener.add_listener("otelworker_staged", on_notify)
        try:
            await queue.stage_many(
                ["traces", "metrics", "logs"], [b"a", b"bb", b"\x00ccc"], [1, 2, 3]
            )
            await asyncio.wait_for(notified.wait(), 5)  # idle pollers are woken
        finally:
            await listener.remove_listener("otelworker_staged", on_notify)

    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT signal, payload, record_count, status, attempts, available_at <= now() AS due,"
            " lease_expires_at, lease_token, last_error, received_at FROM ingestion_queue"
            " ORDER BY id"
        )
    assert [(r["signal"], bytes(r["payload"]), r["record_count"]) for r in rows] == [
        ("traces", b"a", 1),
        ("metrics", b"bb", 2),
        ("logs", b"\x00ccc", 3),
    ]
    assert all(r["status"] == "pending" and r["attempts"] == 0 and r["due"] for r in rows)
    assert all(r["lease_expires_at"] is None and r["lease_token"] is None for r in rows)
    assert len({r["received_at"] for r in rows}) == 1  # one transaction
    assert (await queue.backlog())[0] == 3


async def test_stage_many_is_all_or_nothing(pool: asyncpg.Pool) -> None:
    queue = StagingQueue(pool)
    with pytest.raises(StagingUnavailable):
        await queue.stage_many(["traces", "bogus"], [b"a", b"b"], [1, 1])
    assert (await queue.backlog())[0] == 0


async def test_group_commit_coalesces_concurrent_requests(pool: asyncpg.Pool) -> None:
    queue = StagingQueue(pool)
    calls: list[int] = []

    async def counting_stage_many(
        signals: list[str],
        payloads: list[bytes],
        counts: list[int],
        facts: list[Any],
        tenants: list[str],
    ) -> None:
        calls.append(len(signals))
        await queue.stage_many(signals, payloads, counts, facts, tenants)

    committer = GroupCommitter(counting_stage_many, max_items=64, max_bytes=1 << 20)
    workers = [asyncio.create_task(committer.run()) for _ in range(2)]
    try:
        await asyncio.gather(
            *(committer.stage("logs", f"payload-{i}".encode(), 1) for i in range(300))
        )
        async with pool.acquire() as conn:
            payloads = [
                bytes(r[0]) for r in await conn.fetch("SELECT payload FROM ingestion_queue")
            ]
        assert sorted(payloads) == sorted(f"payload-{i}".encode() for i in range(300))
        assert sum(calls) == 300
        assert len(calls) < 300  # coalesced
        assert max(calls) <= 64  # GROUP_COMMIT_MAX_ITEMS
        await committer.drain()
        with pytest.raises(StagingUnavailable):
            await committer.stage("logs", b"late", 1)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def test_a_cancelled_request_is_still_committed(pool: asyncpg.Pool) -> None:
    """A client that goes away, or a commit timeout, cancels only the request's wait."""
    queue = StagingQueue(pool)
    started = asyncio.Event()
    release = asyncio.Event()

    async def held_stage_many(
        signals: list[str],
        payloads: list[bytes],
        counts: list[int],
        facts: list[Any],
        tenants: list[str],
    ) -> int:
        started.set()
        await release.wait()
        return await queue.stage_many(signals, payloads, counts, facts, tenants)

    committer = GroupCommitter(held_stage_many, max_items=64, max_bytes=1 << 20)
    worker = asyncio.create_task(committer.run())
    try:
        in_flight = asyncio.create_task(committer.stage("logs", b"in-flight", 1))
        await asyncio.wait_for(started.wait(), 20)  # its commit has begun
        waiting = asyncio.create_task(committer.stage("logs", b"waiting", 1))
        kept = asyncio.create_task(committer.stage("logs", b"kept", 1))
        await asyncio.sleep(0)  # both queued behind the commit in flight
        in_flight.cancel()
        waiting.cancel()
        release.set()
        assert isinstance(await kept, int)
        for task in (in_flight, waiting):
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.wait_for(committer.drain(), 20)
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT payload FROM ingestion_queue")
        assert sorted(bytes(r[0]) for r in rows) == [b"in-flight", b"kept", b"waiting"]
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_group_commit_failure_fails_every_waiting_request(
    database_url: str, tcp_proxy: Any
) -> None:
    parts = urlsplit(database_url)
    proxy = tcp_proxy(parts.hostname, parts.port or 5432)
    p = await create_pool(
        proxy.url_for(database_url),
        min_size=1,
        max_size=2,
        connect_timeout_s=1,
        startup_timeout_s=5,
    )
    try:
        async with p.acquire() as conn:
            await migrate(conn)
        queue = StagingQueue(p)
        committer = GroupCommitter(queue.stage_many, max_items=256, max_bytes=1 << 20)
        worker = asyncio.create_task(committer.run())
        try:
            proxy.refuse()
            results = await asyncio.gather(
                *(committer.stage("traces", b"x", 1) for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(r, StagingUnavailable) for r in results), results
            assert not worker.done()  # the committer survives a failed commit

            proxy.pass_through()
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    await committer.stage("traces", b"back", 1)
                    break
                except StagingUnavailable:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.2)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    finally:
        await p.close()

    conn = await asyncpg.connect(database_url)
    try:
        payloads = [bytes(r[0]) for r in await conn.fetch("SELECT payload FROM ingestion_queue")]
    finally:
        await conn.close()
    assert payloads == [b"back"]  # none of the failed requests was staged


async def test_claim_takes_only_the_rows_that_start_within_the_byte_budget(
    pool: asyncpg.Pool,
) -> None:
    queue = StagingQueue(pool)
    sizes = [100, 300, 50, 1000, 10]
    await queue.stage_many(["logs"] * 5, [bytes(n) for n in sizes], [1] * 5)
    token = uuid.uuid4()
    # 100 + 300 = 400 < 450 starts the third (ending at 450): three rows.
    first = await queue.claim(10, 30.0, token, max_bytes=450)
    assert [len(c.payload) for c in first] == [100, 300, 50]
    # A budget smaller than the next payload still takes that one row, and only it.
    second = await queue.claim(10, 30.0, token, max_bytes=1)
    assert [len(c.payload) for c in second] == [1000]
    rest = await queue.claim(10, 30.0, token)
    assert [len(c.payload) for c in rest] == [10]


# --- the queue's own VACUUM (otelworker/staging/maintenance.py) ----------------------------


async def test_queue_vacuum_reclaims_dead_rows_one_process_at_a_time(
    pool: asyncpg.Pool, database_url: str
) -> None:
    queue = StagingQueue(pool)
    payloads = [bytes([i % 251]) * 4000 for i in range(200)]  # TOASTed
    await queue.stage_many(["logs"] * 200, payloads, [1] * 200)
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM ingestion_queue")
    metrics = Metrics()
    vacuum = QueueVacuum(database_url, 60.0, metrics)

    async def dead_tuples() -> int:
        async with pool.acquire() as conn:
            # The statistics are sent at the end of each transaction: ask for fresh ones.
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            return int(
                await conn.fetchval(
                    "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'ingestion_queue'"
                )
            )

    assert await vacuum.vacuum_once() is True
    assert await dead_tuples() == 0
    async with pool.acquire() as conn:
        vacuumed = await conn.fetchval(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'ingestion_queue'"
        )
    assert vacuumed >= 1

    # Another process holds the turn: this one skips it (and leaves no lock behind).
    holder = await asyncpg.connect(database_url)
    try:
        assert await holder.fetchval(query("vacuum_lock")) is True
        assert await vacuum.vacuum_once() is False
    finally:
        await holder.close()
    assert await vacuum.vacuum_once() is True

    # The task: runs every interval, counted.
    fast = QueueVacuum(database_url, 0.02, metrics)
    task = asyncio.create_task(fast.run(), name="queue-vacuum")
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while metrics.queue_vacuums._value.get() < 2:
            assert asyncio.get_running_loop().time() < deadline, "no vacuum ran"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
