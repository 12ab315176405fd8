"""The query's file cache (least recently used out, bounded, never what the query needs)
and DuckDB's lock-down (the views' files readable, nothing else)."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otelworker.columnar.files import ParquetFileRow
from otelworker.columnar.query import (
    CacheTooSmall,
    FileCache,
    Filters,
    Plan,
    connect,
    execute,
)
from otelworker.columnar.schema import TABLES, TIME_COLUMN

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Store:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets: list[str] = []

    async def get(self, key: str) -> bytes:
        self.gets.append(key)
        return self.objects[key]


def _file(key: str, size: int) -> ParquetFileRow:
    return ParquetFileRow(
        uuid.uuid4(), "a", "otel_traces", key, 1, size, NOW, NOW, (), (), NOW, NOW, 1
    )


async def test_least_recently_used_files_make_room_never_the_querys_own(tmp_path: Path) -> None:
    store = Store({k: k.encode() * 100 for k in ("a", "b", "c", "d")})  # 100 bytes each
    cache = FileCache(tmp_path, max_bytes=300)
    files = {k: _file(k, 100) for k in store.objects}
    [a, b, c] = await cache.fetch_all(store, [files["a"], files["b"], files["c"]])
    for age, path in ((30, a), (20, b), (10, c)):  # a oldest, c newest
        os.utime(path, (NOW.timestamp() - age, NOW.timestamp() - age))
    await cache.fetch_all(store, [files["a"]])  # a hit: now the most recent, not fetched
    assert store.gets == ["a", "b", "c"]
    await cache.fetch_all(store, [files["d"], files["c"]])
    assert not b.exists(), "b was the least recently used"
    assert a.exists() and c.exists() and cache.path_of("d").exists()
    assert store.gets == ["a", "b", "c", "d"]
    with pytest.raises(CacheTooSmall):
        await cache.fetch_all(store, [_file(k, 100) for k in "abcd"])


def test_the_views_read_their_files_and_nothing_else(tmp_path: Path) -> None:
    schema = TABLES["otel_traces"]
    rows = {name: [None] for name in schema.names}
    rows["Timestamp"] = [NOW]
    rows["ServiceName"] = ["checkout"]
    rows["Tenant"] = ["a"]
    table = pa.Table.from_pydict(rows, schema=schema)
    mine, other = tmp_path / "mine.parquet", tmp_path / "other.parquet"
    pq.write_table(table, mine)
    pq.write_table(table, other)
    plan = Plan({t: [] for t in TABLES}, Filters(tenant="a"), dict(TIME_COLUMN))
    conn = connect(plan, {"otel_traces": [mine]}, TABLES, spill_dir=tmp_path / "spill")
    try:
        assert execute(conn, "SELECT ServiceName FROM otel_traces").rows == [("checkout",)]
        assert execute(conn, "SELECT count(*) FROM otel_logs").rows == [(0,)]
        for sql in (
            f"SELECT * FROM read_parquet('{other}')",
            f"SELECT * FROM read_parquet('{tmp_path}/*.parquet')",
            "SELECT * FROM read_text('/etc/hostname')",
            "SET enable_external_access = true",
            "INSTALL httpfs",
        ):
            with pytest.raises(duckdb.Error):
                execute(conn, sql)
    finally:
        conn.close()
