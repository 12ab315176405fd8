"""SIGKILL of a ``ROLE=compactor`` service, as an operator runs it: ``python -m otelworker
serve`` (tests/support/procs.py) on a real PostgreSQL over a seeded archive (local
object directory), killed five times at random points of its work (after a random number
of further chunks recorded, then a random delay), and once more in the window between a
file's upload and its commit (a lock the test holds keeps the commit waiting), then a
last instance finishes. Across all the files recorded in ``parquet_files``: no record
twice, none missing; the killed instances' uploads are orphans that ``gc-orphans``
removes (and only those), and the last instance's /metrics count what it did.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from otelworker.sinks.local import LocalObjectStore
from tests.support.columnar import cli
from tests.support.compaction import (
    PREFIX,
    Seeded,
    assert_exactly_once,
    compact_env,
    compacted_count,
    hour_of,
    migrated_pool,
    seed,
)
from tests.support.objects import wait_for
from tests.support.procs import ServiceProcess, run_service

pytestmark = pytest.mark.acceptance

KILLS = 5
READY_S = 120  # deadlines, not waits: generous for a loaded machine
DEADLINE_S = 90


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url) as p:
        yield p


def compactor_env(database_url: str, root: Path) -> dict[str, str]:
    return compact_env(
        database_url,
        root,
        ROLE="compactor",
        COMPACT_GRACE_S="0",
        COMPACT_INTERVAL_S="0.2",
        COMPACT_TARGET_BYTES="1024",  # an object a chunk: many commits to kill between
        DB_POOL_MIN_SIZE="1",
        DB_POOL_MAX_SIZE="4",
        SHUTDOWN_GRACE_S="5",
        LOG_LEVEL="INFO",
    )


async def start(env: dict[str, str]) -> ServiceProcess:
    return await asyncio.to_thread(run_service, env, entry="serve")


async def kill(proc: ServiceProcess) -> None:
    """SIGKILL of the service's process group (tests/support/procs.py), reaped."""
    await asyncio.to_thread(proc.kill)


def alive(proc: ServiceProcess) -> None:
    assert proc.returncode is None, f"the compactor exited by itself:\n{proc.log_tail()}"


def on_disk(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / PREFIX).rglob("*.parquet")}


async def in_manifest(pool: asyncpg.Pool) -> set[str]:
    return {r[0] for r in await pool.fetch("SELECT object_key FROM parquet_files")}


async def assert_recorded_once(pool: asyncpg.Pool) -> int:
    """What is recorded so far is recorded once: no source object in two files of a
    table, and the objects marked compacted are exactly those the files name."""
    named = await pool.fetch("SELECT table_name, unnest(source_batches) AS b FROM parquet_files")
    per = Counter((r["table_name"], r["b"]) for r in named)
    assert all(n == 1 for n in per.values()), [k for k, n in per.items() if n > 1][:5]
    marked = {
        r[0]
        for r in await pool.fetch(
            "SELECT batch_id FROM export_batches WHERE compacted_at IS NOT NULL"
        )
    }
    assert marked == {b for _, b in per}
    return len(marked)


def compact_samples(text: str) -> dict[str, float]:
    """The otelworker_compact_* samples of a scrape, summed over their labels."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("otelworker_compact_"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


async def test_sigkill_of_a_compactor_service_at_random_points_then_a_last_instance(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    seeded = Seeded()
    at = hour_of(datetime.now(UTC)) - timedelta(hours=2)
    for tenant in ("a", "b"):
        for signal in ("traces", "logs", "metrics"):
            await seed(
                pool,
                store,
                seeded,
                tenant=tenant,
                signal=signal,
                objects=20,
                records=30,
                created_at=at + timedelta(minutes=len(seeded.batches) % 60),
            )
    total = len(seeded.batches)
    env = compactor_env(database_url, root)
    rng = random.Random(2323)
    marked = 0
    at_kills: list[int] = []
    for _ in range(KILLS):
        proc = await start(env)
        try:
            # A random point: after a random number of further chunks recorded, and a
            # random moment into the next one (reading, converting, uploading, committing).
            target = marked + rng.randint(1, 12)
            await wait_for(
                lambda: compacted_count(pool),
                lambda n, target=target: n >= target,
                within_s=DEADLINE_S,
                interval=0.005,
                what=f"{target} objects compacted",
            )
            await asyncio.sleep(rng.uniform(0, 0.05))
            alive(proc)
        finally:
            await kill(proc)
        marked = await assert_recorded_once(pool)
        at_kills.append(marked)

    # Once more, between an upload and its commit: the test holds a lock that makes the
    # commit's insert into parquet_files wait, so the kill lands in that window.
    blocker = await asyncpg.connect(database_url)
    holding = blocker.transaction()
    await holding.start()
    await blocker.execute("LOCK TABLE parquet_files IN SHARE MODE")
    proc = await start(env)
    try:
        known = await in_manifest(pool)
        await wait_for(
            lambda: on_disk(root) - known,
            bool,
            within_s=DEADLINE_S,
            interval=0.02,
            what="a Parquet file uploaded and not recorded",
        )
        alive(proc)
    finally:
        await kill(proc)
        await holding.rollback()
        await blocker.close()
    # The killed commit never happens (its client is gone): nothing more is marked.
    assert await assert_recorded_once(pool) == marked
    assert marked < total, "the kills left nothing for the last instance"

    # A last instance finishes the work, and its /metrics say what it did.
    files_before = len(await in_manifest(pool))
    last = await start(env)
    try:
        await asyncio.to_thread(last.wait_ready, READY_S)
        await wait_for(
            lambda: compacted_count(pool),
            lambda n: n == total,
            within_s=DEADLINE_S,
            what="every object compacted",
        )
        async with httpx.AsyncClient(base_url=last.url, timeout=5) as client:

            async def scrape() -> dict[str, float]:
                response = await client.get("/metrics")
                assert response.status_code == 200
                return compact_samples(response.text)

            served = await wait_for(
                scrape,
                lambda s: (
                    s.get("otelworker_compact_source_objects_total") == total - marked
                    and s.get("otelworker_compact_lag_seconds") == 0
                ),
                within_s=DEADLINE_S,
                what="the last instance's metrics",
            )
        files_after = len(await in_manifest(pool))
        assert served["otelworker_compact_files_total"] == files_after - files_before
        assert served["otelworker_compact_runs_total"] >= 1
        assert served.get("otelworker_compact_failures_total", 0) == 0
        assert await asyncio.to_thread(last.terminate, 30) == 0
    finally:
        if last.returncode is None:
            await asyncio.to_thread(last.kill)

    await assert_exactly_once(pool, root, seeded)
    recorded = await in_manifest(pool)
    orphans = on_disk(root) - recorded
    # The figures, for the record (pytest -s shows them).
    print(
        f"\n{total} objects; compacted at the kills: {at_kills}; {len(orphans)} orphan"
        f" file(s) of {len(on_disk(root))} on disk, {len(recorded)} recorded"
    )
    assert orphans, "the kill between upload and commit left no orphan"
    assert all((root / key).exists() for key in recorded)

    # gc-orphans removes the killed instances' uploads, and only those. It takes only
    # objects older than an hour (a younger one may be an upload whose row is on its
    # way): every file is backdated two hours, as a run two hours from now would see them.
    two_hours_ago = time.time() - 2 * 3600
    for path in (root / PREFIX).rglob("*"):
        if path.is_file():
            os.utime(path, (two_hours_ago, two_hours_ago))
    gc_env = {k: v for k, v in env.items() if k != "ROLE"}
    dry = await cli(gc_env, "gc-orphans", "--older-than-s", "3600", "--dry-run")
    assert dry.code == 0, dry.err
    assert re.search(rf"would remove {len(orphans)} orphan object\(s\)", dry.out), dry.out
    assert on_disk(root) - recorded == orphans
    run = await cli(gc_env, "gc-orphans", "--older-than-s", "3600")
    assert run.code == 0, run.err
    assert re.search(rf"removed {len(orphans)} orphan object\(s\)", run.out), run.out
    assert on_disk(root) == recorded
    await assert_exactly_once(pool, root, seeded)
