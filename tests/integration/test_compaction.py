"""Compaction against a real PostgreSQL and a local object store: every record in exactly
one recorded Parquet file, reruns add nothing, late arrivals go to a later file, racing
compactors and SIGKILLed ones never duplicate or lose a row (their files are orphans
that gc-orphans removes, and gc-orphans never takes a recorded one), prune --parquet.

The manifest is seeded directly (tests/support/compaction.py: objects written in the
archive's layout, rows inserted with chosen arrival times) so that windows and hours are
the test's to choose.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal as signals
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow.parquet as pq
import pytest

from otelworker.archive.manifest import ArchiveIndex
from otelworker.archive.prune import ORPHAN_MIN_AGE, gc_orphans, prune, prune_parquet
from otelworker.archive.reader import decompress
from otelworker.columnar.compact import Compactor, LostRace, plan_chunks
from otelworker.sinks.local import LocalObjectStore
from tests.support.compaction import (
    NS,
    PREFIX,
    Seeded,
    assert_exactly_once,
    compact_env,
    compacted_count,
    hour_of,
    migrated_pool,
    recorded,
    seed,
    start_compact,
    until_all_compacted,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url) as p:
        yield p


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "objects"


def compactor(pool: asyncpg.Pool, root: Path, target: int = 128 * 1024**2) -> Compactor:
    return Compactor(pool, LocalObjectStore(root), prefix=PREFIX, grace_s=300, target_bytes=target)


async def test_compact_once_records_every_record_once_and_a_rerun_adds_nothing(
    pool: asyncpg.Pool, root: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    two_hours_ago = hour_of(now) - timedelta(hours=2)
    for tenant in ("acme", "globex"):
        for signal in ("traces", "logs", "metrics"):
            for hour in (two_hours_ago, two_hours_ago + timedelta(hours=1)):
                await seed(
                    pool,
                    store,
                    seeded,
                    tenant=tenant,
                    signal=signal,
                    objects=3,
                    records=20,
                    created_at=hour + timedelta(minutes=10),
                )
    # Inside the grace: not closed yet, left for later.
    await seed(
        pool, store, seeded, tenant="acme", signal="traces", objects=1, records=5, created_at=now
    )
    young = seeded.batches[-1]
    young_ids = seeded.ids[("acme", "traces")][-5:]

    # A small target: several files per hour.
    result = await compactor(pool, root, target=2000).run_once(now=now)
    assert result.lost_races == 0 and result.unreadable == 0
    assert result.sources == 2 * 3 * 2 * 3
    rows = await pool.fetch("SELECT * FROM parquet_files ORDER BY object_key")
    assert result.files == len(rows) > 2 * 3 * 2
    for row in rows:
        sources = await pool.fetch(
            "SELECT created_at FROM export_batches WHERE batch_id = ANY($1)", row["source_batches"]
        )
        hours = {hour_of(s["created_at"].astimezone(UTC)) for s in sources}
        assert len(hours) == 1  # one arrival hour per file: its partition
        [hour] = hours
        assert row["object_key"].startswith(
            f"{PREFIX}/{row['tenant']}/parquet/{row['table_name']}/"
            f"date={hour:%Y-%m-%d}/hour={hour:%H}/part-{row['file_id']}.parquet"
        ), row["object_key"]
        assert row["window_start"] <= row["window_end"] < now - timedelta(seconds=300)
        assert row["schema_version"] == 1
        assert row["service_names"] == ["checkout"]
        assert row["compressed_bytes"] == (root / row["object_key"]).stat().st_size
        assert row["min_time"] >= datetime.fromtimestamp(NS / 1e9, UTC)
        assert row["min_time"] <= row["max_time"]
        meta = pq.read_metadata(root / row["object_key"]).metadata
        assert meta[b"otelworker.schema_version"] == b"1"

    # The young object waits; everything else is in exactly one file.
    assert (
        await pool.fetchval("SELECT compacted_at FROM export_batches WHERE batch_id = $1", young)
        is None
    )
    found = await recorded(pool, root)
    assert not set(young_ids) & set(found[("acme", "traces")])

    again = await compactor(pool, root, target=2000).run_once(now=now)
    assert (again.files, again.sources) == (0, 0)
    assert await pool.fetchval("SELECT count(*) FROM parquet_files") == len(rows)

    # Once its window closes, the young object goes to a file of its own.
    later = await compactor(pool, root).run_once(now=now + timedelta(seconds=301))
    assert (later.sources, later.files) == (1, 1)
    await assert_exactly_once(pool, root, seeded)
    # gc-orphans knows the Parquet files: none is taken for an orphan.
    assert (
        await gc_orphans(
            store,
            ArchiveIndex(pool),
            prefix=PREFIX,
            older_than=ORPHAN_MIN_AGE,
            now=now + timedelta(hours=2),
        )
        == 0
    )
    assert await pool.fetchval("SELECT count(*) FROM parquet_files") == len(rows) + 1


async def test_late_arrivals_land_in_a_later_file_and_closed_files_stay(
    pool: asyncpg.Pool, root: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    hour = hour_of(now) - timedelta(hours=3)
    await seed(
        pool,
        store,
        seeded,
        tenant="t",
        signal="traces",
        objects=4,
        records=10,
        created_at=hour + timedelta(minutes=5),
    )
    await compactor(pool, root).run_once(now=now)
    before = {
        r["object_key"]: r["row_count"] for r in await pool.fetch("SELECT * FROM parquet_files")
    }
    assert len(before) == 1
    mtimes = {k: (root / k).stat().st_mtime_ns for k in before}

    # A row that shows up after its window was compacted (a replay, a long transaction):
    # the same arrival hour, committed late.
    await seed(
        pool,
        store,
        seeded,
        tenant="t",
        signal="traces",
        objects=2,
        records=10,
        created_at=hour + timedelta(minutes=20),
    )
    result = await compactor(pool, root).run_once(now=now)
    assert (result.sources, result.files) == (2, 1)
    after = {
        r["object_key"]: r["row_count"] for r in await pool.fetch("SELECT * FROM parquet_files")
    }
    assert {k: v for k, v in after.items() if k in before} == before  # never rewritten
    assert {k: (root / k).stat().st_mtime_ns for k in before} == mtimes
    [new] = set(after) - set(before)
    assert after[new] == 20
    assert f"/date={hour:%Y-%m-%d}/hour={hour:%H}/" in new
    await assert_exactly_once(pool, root, seeded)


async def test_the_loop_holds_an_open_hour_until_it_closes_or_fills(
    pool: asyncpg.Pool, root: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC).replace(minute=30)
    open_hour = hour_of(now)
    await seed(
        pool,
        store,
        seeded,
        tenant="t",
        signal="logs",
        objects=2,
        records=5,
        created_at=open_hour + timedelta(minutes=1),
    )
    c = compactor(pool, root)
    held = await c.run_once(now=now, partial_hours=False)
    assert held.sources == 0
    closed = await c.run_once(now=open_hour + timedelta(hours=1, seconds=301), partial_hours=False)
    assert closed.sources == 2
    await assert_exactly_once(pool, root, seeded)


async def test_a_missing_or_corrupt_object_is_left_uncompacted_and_the_rest_compacted(
    pool: asyncpg.Pool, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    at = hour_of(now) - timedelta(hours=2)
    await seed(pool, store, seeded, tenant="t", signal="logs", objects=3, records=5, created_at=at)
    rows = await pool.fetch("SELECT batch_id, object_key FROM export_batches ORDER BY batch_id")
    missing, corrupt, good = rows
    (root / missing["object_key"]).unlink()
    (root / corrupt["object_key"]).write_bytes(b"not an object")
    result = await compactor(pool, root).run_once(now=now)
    assert (result.sources, result.unreadable, result.files) == (1, 2, 1)
    left = await pool.fetch("SELECT batch_id FROM export_batches WHERE compacted_at IS NULL")
    assert {r["batch_id"] for r in left} == {missing["batch_id"], corrupt["batch_id"]}
    logged = {
        (r.reason, r.object_key)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "compact_object_unreadable"
    }
    assert logged == {
        ("object_missing", missing["object_key"]),
        ("object_corrupt", corrupt["object_key"]),
    }
    assert good["batch_id"] not in {r["batch_id"] for r in left}


async def test_an_object_the_converter_fails_on_is_left_out_and_the_compactor_goes_on(
    pool: asyncpg.Pool,
    root: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a corrupt object: one the conversion raises on (an Arrow error, a converter's
    bug). That object is left uncompacted and logged; its chunk-mates are compacted and
    the pass returns: it never ends the compactor."""
    from otelworker.columnar import convert

    caplog.set_level(logging.INFO, logger="otelworker")
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    at = hour_of(now) - timedelta(hours=2)
    await seed(pool, store, seeded, tenant="t", signal="logs", objects=3, records=5, created_at=at)
    rows = await pool.fetch("SELECT batch_id, object_key FROM export_batches ORDER BY batch_id")
    poisoned = rows[1]
    poisoned_raw = decompress(poisoned["object_key"], (root / poisoned["object_key"]).read_bytes())
    real = convert.tables_of

    def failing(signal: str, raw: bytes, tenant: str) -> Any:
        if raw == poisoned_raw:
            raise ValueError("an Arrow error on this object")
        return real(signal, raw, tenant)

    monkeypatch.setattr(convert, "tables_of", failing)
    result = await compactor(pool, root).run_once(now=now)
    assert (result.sources, result.unreadable) == (2, 1)
    left = await pool.fetch("SELECT batch_id FROM export_batches WHERE compacted_at IS NULL")
    assert [r["batch_id"] for r in left] == [poisoned["batch_id"]]
    logged = [r for r in caplog.records if getattr(r, "event", None) == "compact_object_unreadable"]
    assert [(r.reason, r.object_key) for r in logged] == [  # type: ignore[attr-defined]
        ("object_corrupt", poisoned["object_key"])
    ]
    assert "ValueError" in logged[0].error  # type: ignore[attr-defined]


def test_plan_chunks_cuts_by_hour_and_size() -> None:
    from otelworker.columnar.compact import Source

    base = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    sources = [
        Source(uuid.uuid4(), f"k{i}", 1, 100, base + timedelta(minutes=20 * i)) for i in range(7)
    ]  # 10:00 10:20 10:40 | 11:00 11:20 11:40 | 12:00
    chunks = plan_chunks(
        "t", "logs", sources, target_bytes=250, cut=base + timedelta(hours=3), partial_hours=False
    )
    assert [len(c.sources) for c in chunks] == [3, 3, 1]
    assert [c.hour.hour for c in chunks] == [10, 11, 12]
    chunks = plan_chunks(
        "t", "logs", sources, target_bytes=200, cut=base + timedelta(hours=3), partial_hours=False
    )
    assert [len(c.sources) for c in chunks] == [2, 1, 2, 1, 1]
    # 12:00 is not closed at 12:30 without partial hours: held back.
    chunks = plan_chunks(
        "t",
        "logs",
        sources,
        target_bytes=10**6,
        cut=base + timedelta(hours=2, minutes=30),
        partial_hours=False,
    )
    assert [c.hour.hour for c in chunks] == [10, 11]


async def test_racing_compactors_never_duplicate_and_the_loser_leaves_orphans(
    pool: asyncpg.Pool, root: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    at = hour_of(now) - timedelta(hours=2)
    await seed(
        pool, store, seeded, tenant="t", signal="traces", objects=3, records=10, created_at=at
    )
    a, b = compactor(pool, root), compactor(pool, root)
    sources = await a.pending("t", "traces", now)
    [chunk] = plan_chunks("t", "traces", sources, target_bytes=10**9, cut=now, partial_hours=True)
    built_a = await a.build(chunk)
    built_b = await b.build(chunk)  # both converted and uploaded the same objects
    await b.commit(built_b)
    with pytest.raises(LostRace):
        await a.commit(built_a)
    assert await pool.fetchval("SELECT count(*) FROM parquet_files") == 1
    await assert_exactly_once(pool, root, seeded)
    [orphan] = [f.object_key for f in built_a.files]
    assert (root / orphan).exists()
    index = ArchiveIndex(pool)
    removed = await gc_orphans(
        store, index, prefix=PREFIX, older_than=ORPHAN_MIN_AGE, now=now + timedelta(hours=2)
    )
    assert removed == 1
    assert not (root / orphan).exists()
    [kept] = [f.object_key for f in built_b.files]
    assert (root / kept).exists()

    # Two whole passes at once: the (tenant, signal) lock lets one work, the other skips.
    await seed(
        pool,
        store,
        seeded,
        tenant="t",
        signal="traces",
        objects=3,
        records=10,
        created_at=at + timedelta(minutes=1),
    )
    results = await asyncio.gather(a.run_once(now=now), b.run_once(now=now))
    assert sum(r.sources for r in results) == 3
    await assert_exactly_once(pool, root, seeded)


async def test_sigkill_of_compact_at_random_points_then_rerun(
    pool: asyncpg.Pool, root: Path, database_url: str, tmp_path: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    at = hour_of(now) - timedelta(hours=2)
    for signal in ("traces", "logs"):
        for tenant in ("a", "b"):
            await seed(
                pool,
                store,
                seeded,
                tenant=tenant,
                signal=signal,
                objects=40,
                records=30,
                created_at=at + timedelta(minutes=len(seeded.batches) % 60),
            )
    env = compact_env(
        database_url,
        root,
        COMPACT_GRACE_S="0",
        COMPACT_TARGET_BYTES="1024",  # an object a chunk: many commits to kill between
        LOG_LEVEL="WARNING",
    )
    rng = random.Random(23)
    kills = 0
    marked = 0
    for _ in range(5):
        proc = await start_compact(env, tmp_path, "--once")
        # A random point: after a random number of further chunks recorded, and a random
        # moment into the next one (reading, converting, uploading or committing it).
        target = marked + rng.randint(1, 25)
        while proc.returncode is None and marked < target:
            await asyncio.sleep(0.002)
            marked = await compacted_count(pool)
        await asyncio.sleep(rng.uniform(0, 0.02))
        if proc.returncode is None:
            proc.send_signal(signals.SIGKILL)
            kills += 1
        await proc.communicate()
        # Whatever was recorded so far is recorded once.
        named = await pool.fetch("SELECT unnest(source_batches) AS b FROM parquet_files")
        assert len(named) == len({r["b"] for r in named})
        marked = await compacted_count(pool)
        assert marked == len(named)
    assert kills == 5 and marked < len(seeded.batches)
    proc = await start_compact(env, tmp_path, "--once")
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert b"compacted" in out
    await assert_exactly_once(pool, root, seeded)
    # The killed runs' uploads are orphans: gc-orphans removes them and only them.
    in_manifest = {r[0] for r in await pool.fetch("SELECT object_key FROM parquet_files")}
    before = {p.relative_to(root).as_posix() for p in (root / PREFIX).rglob("*.parquet")}
    orphans = await gc_orphans(
        store,
        ArchiveIndex(pool),
        prefix=PREFIX,
        older_than=ORPHAN_MIN_AGE,
        now=datetime.now(UTC) + timedelta(hours=2),
    )
    on_disk = {p.relative_to(root).as_posix() for p in (root / PREFIX).rglob("*.parquet")}
    assert on_disk == in_manifest
    assert orphans == len(before - in_manifest)
    await assert_exactly_once(pool, root, seeded)


async def test_prune_parquet_and_prune_keeps_what_is_not_compacted(
    pool: asyncpg.Pool, root: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    old = hour_of(now) - timedelta(days=3)
    await seed(pool, store, seeded, tenant="t", signal="logs", objects=2, records=5, created_at=old)
    await seed(pool, store, seeded, tenant="u", signal="logs", objects=1, records=5, created_at=old)
    await compactor(pool, root).run_once(now=now)
    files = {r["object_key"]: r["tenant"] for r in await pool.fetch("SELECT * FROM parquet_files")}
    assert sorted(files.values()) == ["t", "u"]
    # Not compacted yet (arrived after the pass, backdated): OTLP prune keeps it.
    await seed(pool, store, seeded, tenant="t", signal="logs", objects=1, records=5, created_at=old)
    index = ArchiveIndex(pool)
    pruned = await prune(index, store, older_than=timedelta(days=1), prefix=PREFIX, now=now)
    assert (pruned.rows, pruned.kept_uncompacted) == (3, 1)
    assert await pool.fetchval("SELECT count(*) FROM export_batches") == 1
    # The Parquet files outlive their OTLP objects (their own retention), and no file was
    # taken for an orphan by prune's sweep.
    assert all((root / k).exists() for k in files)

    dry = await prune_parquet(
        index,
        store,
        older_than=timedelta(days=1),
        dry_run=True,
        now=now + timedelta(days=2),
        tenant="t",
    )
    assert (dry.rows, dry.objects) == (1, 1)
    assert all((root / k).exists() for k in files)
    kept = await prune_parquet(index, store, older_than=timedelta(days=1), now=now)
    assert kept.rows == 0  # compacted just now: younger than a day
    done = await prune_parquet(
        index, store, older_than=timedelta(days=1), now=now + timedelta(days=2), tenant="t"
    )
    assert done.rows == done.objects == 1
    left = {r["object_key"] for r in await pool.fetch("SELECT object_key FROM parquet_files")}
    assert left == {k for k, t in files.items() if t == "u"}
    assert {k for k in files if (root / k).exists()} == left
    # --force takes the uncompacted object too.
    forced = await prune(
        index, store, older_than=timedelta(days=1), prefix=PREFIX, now=now, force=True
    )
    assert (forced.rows, forced.kept_uncompacted) == (1, 0)


async def test_role_compactor_compacts_in_the_service(
    pool: asyncpg.Pool, root: Path, database_url: str, tmp_path: Path
) -> None:
    from otelworker.service import Service
    from otelworker.settings import load_settings

    store = LocalObjectStore(root)
    seeded = Seeded()
    at = hour_of(datetime.now(UTC)) - timedelta(hours=2)
    for signal in ("traces", "logs", "metrics"):
        await seed(
            pool, store, seeded, tenant="t", signal=signal, objects=2, records=5, created_at=at
        )
    settings = load_settings(
        database_url=database_url,
        role="compactor",
        local_object_dir=str(root),
        s3_prefix=PREFIX,
        compact_grace_s=0,
        compact_interval_s=0.2,
        embedded_db_dir=str(tmp_path / "unused"),
    )
    service = Service(settings)
    await service.start()
    try:
        assert service.committer is None and service.pipeline is None  # nothing else runs
        await until_all_compacted(pool, 30)
        assert service.supervisor.healthy
    finally:
        await service.stop()
    await assert_exactly_once(pool, root, seeded)


async def test_compact_without_once_loops_until_sigterm(
    pool: asyncpg.Pool, root: Path, database_url: str, tmp_path: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    at = hour_of(datetime.now(UTC)) - timedelta(hours=2)
    await seed(pool, store, seeded, tenant="t", signal="logs", objects=2, records=5, created_at=at)
    env = compact_env(database_url, root, COMPACT_INTERVAL_S="0.2")
    proc = await start_compact(env, tmp_path, "--signal", "logs")
    try:
        await until_all_compacted(pool, 60)
        # A later arrival is taken by a later pass of the same process.
        await seed(
            pool,
            store,
            seeded,
            tenant="t",
            signal="logs",
            objects=1,
            records=5,
            created_at=at + timedelta(minutes=30),
        )
        await until_all_compacted(pool, 60)
        proc.send_signal(signals.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    await assert_exactly_once(pool, root, seeded)
    assert await pool.fetchval("SELECT count(*) FROM parquet_files") == 2
