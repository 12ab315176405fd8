"""The compactor's metrics (otelworker_compact_*, docs/operations.md#compactor) against a
real PostgreSQL and a local object store: the counters move with what a pass records
(files, rows and bytes per table, source objects per signal, equal to the manifest's
figures), failures are counted by reason (a missing and a corrupt object, a lost race,
an unreachable database), the lag is the age of the oldest object a pass was due to take
and did not, and all of it is served on /metrics by a ROLE=compactor service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from otelworker.columnar.compact import Built, Chunk, Compactor
from otelworker.exceptions import StagingUnavailable
from otelworker.metrics import Metrics
from otelworker.sinks.local import LocalObjectStore
from tests.support.compaction import PREFIX, Seeded, hour_of, migrated_pool, seed
from tests.support.objects import wait_for
from tests.support.server import running_service

pytestmark = pytest.mark.integration

SIGNALS = ("traces", "logs", "metrics")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url) as p:
        yield p


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "objects"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample of the registry (0 when the series does not exist yet)."""
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def manifest_figures(pool: asyncpg.Pool) -> dict[str, dict[str, float]]:
    """What the counters should say, from the database: per table the files, rows and
    bytes recorded; per signal the objects marked compacted."""
    figures: dict[str, dict[str, float]] = {"files": {}, "records": {}, "bytes": {}}
    for row in await pool.fetch(
        "SELECT table_name, count(*) AS files, sum(row_count) AS records,"
        " sum(compressed_bytes) AS bytes FROM parquet_files GROUP BY table_name"
    ):
        for what in ("files", "records", "bytes"):
            figures[what][row["table_name"]] = float(row[what])
    figures["objects"] = {
        r["signal"]: float(r["n"])
        for r in await pool.fetch(
            "SELECT signal, count(*) AS n FROM export_batches"
            " WHERE compacted_at IS NOT NULL GROUP BY signal"
        )
    }
    return figures


def assert_counters_match(metrics: Metrics, figures: dict[str, dict[str, float]]) -> None:
    for what, family in (
        ("files", "otelworker_compact_files_total"),
        ("records", "otelworker_compact_records_total"),
        ("bytes", "otelworker_compact_bytes_total"),
    ):
        for table, expected in figures[what].items():
            assert value(metrics, family, table=table) == expected, (family, table)
    for signal in SIGNALS:
        assert value(metrics, "otelworker_compact_source_objects_total", signal=signal) == figures[
            "objects"
        ].get(signal, 0.0), signal


class Beaten(Compactor):
    """A compactor whose every chunk is recorded first by a rival, between its build and
    its commit (as a second compactor without the lock would): each commit is a lost race."""

    def __init__(self, rival: Compactor, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rival = rival

    async def build(self, chunk: Chunk) -> Built:
        built = await super().build(chunk)
        await self.rival.commit(await self.rival.build(chunk))
        return built


async def test_a_pass_counts_what_it_records_and_its_failures_by_reason(
    pool: asyncpg.Pool,
    root: Path,
    database_url: str,
    tcp_proxy: Callable[[str, int], Any],
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC)
    at = hour_of(now) - timedelta(hours=2) + timedelta(minutes=10)
    for signal in SIGNALS:
        await seed(
            pool, store, seeded, tenant="t", signal=signal, objects=3, records=30, created_at=at
        )
    # A missing and a corrupt object, older than the rest: the lag's oldest.
    broken_at = at - timedelta(minutes=5)
    await seed(
        pool, store, seeded, tenant="t", signal="logs", objects=2, records=3, created_at=broken_at
    )
    missing, corrupt = await pool.fetch(
        "SELECT object_key FROM export_batches WHERE created_at = $1 ORDER BY object_key",
        broken_at,
    )
    (root / missing["object_key"]).unlink()
    (root / corrupt["object_key"]).write_bytes(b"not an object")

    # The compactor's pool goes through a proxy: the database can be taken away below.
    parts = urlsplit(database_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = tcp_proxy(parts.hostname, parts.port)
    proxied = await asyncpg.create_pool(proxy.url_for(database_url), min_size=1, max_size=4)
    metrics = Metrics()
    compactor = Compactor(
        proxied, store, prefix=PREFIX, grace_s=300, target_bytes=1024, metrics=metrics
    )
    try:
        result = await compactor.run_once(now=now)
        assert (result.sources, result.unreadable) == (9, 2)
        figures = await manifest_figures(pool)
        assert set(figures["files"]) == {"otel_traces", "otel_logs", "otel_metrics_gauge"}
        assert sum(figures["files"].values()) == result.files > 3  # a small target: several
        assert_counters_match(metrics, figures)
        assert sum(figures["records"].values()) == result.rows == 9 * 30
        assert value(metrics, "otelworker_compact_runs_total") == 1
        assert value(metrics, "otelworker_compact_failures_total", reason="object_missing") == 1
        assert value(metrics, "otelworker_compact_failures_total", reason="object_corrupt") == 1
        # The two unreadable objects are due and not compacted: the lag is their age.
        lag = value(metrics, "otelworker_compact_lag_seconds")
        assert lag == pytest.approx((now - broken_at).total_seconds(), abs=0.01)

        # A lost race: counted as a failure, and none of the beaten run's files count.
        rival = Compactor(pool, store, prefix=PREFIX, grace_s=300, target_bytes=10**9)
        beaten = Beaten(
            rival, proxied, store, prefix=PREFIX, grace_s=300, target_bytes=10**9, metrics=metrics
        )
        await seed(
            pool, store, seeded, tenant="r", signal="traces", objects=2, records=4, created_at=at
        )
        raced = await beaten.run_once(now=now, tenant="r", signal="traces")
        assert (raced.lost_races, raced.files) == (1, 0)
        assert value(metrics, "otelworker_compact_failures_total", reason="lost_race") == 1
        assert value(metrics, "otelworker_compact_runs_total") == 2
        assert_counters_match(metrics, figures)  # the rival's file is not this process's

        # Its scope (tenant r, traces) has nothing left due.
        assert value(metrics, "otelworker_compact_lag_seconds") == 0
        # The database unreachable: the pass fails, counted once as database_error.
        await compactor.run_once(now=now)
        assert value(metrics, "otelworker_compact_lag_seconds") == lag
        proxy.refuse()
        with pytest.raises(StagingUnavailable):
            await compactor.run_once(now=now)
        assert value(metrics, "otelworker_compact_failures_total", reason="database_error") == 1
        assert value(metrics, "otelworker_compact_runs_total") == 4
        assert value(metrics, "otelworker_compact_lag_seconds") == lag  # as of the last pass
    finally:
        proxy.pass_through()
        proxied.terminate()


async def test_the_lag_counts_only_what_a_pass_is_due_to_take(
    pool: asyncpg.Pool, root: Path
) -> None:
    """In the loop an open hour's tail waits for the hour to close: it is not lag. An
    object of a closed hour that a pass could not take is, until a pass takes it."""
    store = LocalObjectStore(root)
    seeded = Seeded()
    now = datetime.now(UTC).replace(minute=30)
    open_hour = hour_of(now)
    await seed(
        pool,
        store,
        seeded,
        tenant="t",
        signal="traces",
        objects=2,
        records=3,
        created_at=open_hour + timedelta(minutes=1),
    )
    late_at = open_hour - timedelta(minutes=50)  # a closed hour
    await seed(
        pool, store, seeded, tenant="t", signal="logs", objects=1, records=3, created_at=late_at
    )
    key = await pool.fetchval("SELECT object_key FROM export_batches WHERE signal = 'logs'")
    body = (root / key).read_bytes()
    (root / key).unlink()  # not there yet (a store that lags behind, say)
    metrics = Metrics()
    compactor = Compactor(
        pool, store, prefix=PREFIX, grace_s=300, target_bytes=10**9, metrics=metrics
    )

    held = await compactor.run_once(now=now, partial_hours=False)
    assert (held.sources, held.unreadable) == (0, 1)
    lag = value(metrics, "otelworker_compact_lag_seconds")
    assert lag == pytest.approx((now - late_at).total_seconds(), abs=0.01)

    (root / key).write_bytes(body)  # back: the next pass takes it
    taken = await compactor.run_once(now=now, partial_hours=False)
    assert taken.sources == 1
    assert value(metrics, "otelworker_compact_lag_seconds") == 0
    # The open hour's objects still wait (and are older than the grace): not lag.
    waiting = await pool.fetchval("SELECT count(*) FROM export_batches WHERE compacted_at IS NULL")
    assert waiting == 2
    # compact --once takes everything before the cut, the open hour's tail too.
    everything = await compactor.run_once(now=now)
    assert everything.sources == 2
    assert value(metrics, "otelworker_compact_lag_seconds") == 0
    assert value(metrics, "otelworker_compact_source_objects_total", signal="traces") == 2
    assert value(metrics, "otelworker_compact_source_objects_total", signal="logs") == 1
    assert value(metrics, "otelworker_compact_runs_total") == 3


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_compactor_service_serves_its_metrics(
    pool: asyncpg.Pool, root: Path, database_url: str, tmp_path: Path
) -> None:
    store = LocalObjectStore(root)
    seeded = Seeded()
    at = hour_of(datetime.now(UTC)) - timedelta(hours=2)
    for signal in SIGNALS:
        await seed(
            pool, store, seeded, tenant="t", signal=signal, objects=2, records=5, created_at=at
        )
    async with (
        running_service(
            database_url=database_url,
            role="compactor",
            local_object_dir=str(root),
            s3_prefix=PREFIX,
            compact_grace_s=0,
            compact_interval_s=0.2,
            embedded_db_dir=str(tmp_path / "unused"),
        ) as svc,
        httpx.AsyncClient(base_url=svc.url, timeout=5) as client,
    ):

        async def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            response = await client.get("/metrics")
            assert response.status_code == 200
            return scrape(response.text)

        def objects(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
            return sum(
                v
                for (name, _), v in got.items()
                if name == "otelworker_compact_source_objects_total"
            )

        got = await wait_for(
            samples, lambda s: objects(s) == 6, within_s=30, what="every object compacted"
        )
    figures = await manifest_figures(pool)
    for what, name in (
        ("files", "otelworker_compact_files_total"),
        ("records", "otelworker_compact_records_total"),
        ("bytes", "otelworker_compact_bytes_total"),
    ):
        served = {dict(labels)["table"]: v for (n, labels), v in got.items() if n == name}
        assert served == figures[what], name
    assert got[("otelworker_compact_source_objects_total", (("signal", "traces"),))] == 2
    assert got[("otelworker_compact_runs_total", ())] >= 1
    assert got[("otelworker_compact_lag_seconds", ())] == 0
    assert not any(v for (name, _), v in got.items() if name == "otelworker_compact_failures_total")


def test_every_compactor_metric_is_documented() -> None:
    """Each otelworker_compact_* family is in the metrics reference and in the compaction
    section of the query docs."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
        if family.name.startswith("otelworker_compact_")
    }
    assert len(names) == 7, names
    operations = (docs / "operations.md").read_text()
    compaction = (docs / "query.md").read_text().split("## Compaction", 1)[1].split("\n## ", 1)[0]
    for name in sorted(names):
        assert f"`{name}`" in operations, name
        assert f"`{name}`" in compaction, name
