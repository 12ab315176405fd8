"""``otelworker verify``: passes on a clean Parquet copy; fails, naming the file, when a
file's rows are tampered with (a row dropped, a value changed) or a count disagrees."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.support.columnar import Copy, cli, make_copy

pytestmark = pytest.mark.integration

WINDOW = ("--since", "2025-12-31T00:00:00Z", "--until", "2026-01-02T00:00:00Z")


@pytest.fixture
async def copy(database_url: str, tmp_path: Path) -> Copy:
    return await make_copy(database_url, tmp_path)


def _key(copy: Copy, table: str, tenant: str = "a") -> str:
    # One file per (tenant, table), unless the records arrived across an hour's end.
    return next(k for k in copy.keys if f"/{tenant}/parquet/{table}/" in k)


async def test_verify_passes_on_a_clean_copy(copy: Copy) -> None:
    run = await cli(copy.env(), "verify", *WINDOW, "--sample", "0")
    assert run.code == 0, (run.out, run.err)
    assert "0 disagree" in run.out
    assert run.out.count("\nok ") + run.out.startswith("ok ") == len(copy.keys)


async def test_a_dropped_row_fails_naming_the_file(copy: Copy) -> None:
    key = _key(copy, "otel_traces")
    path = copy.objects / key
    table = pq.read_table(path)
    pq.write_table(table.slice(1), path)
    run = await cli(copy.env(), "verify", *WINDOW)
    assert run.code == 1, run.out
    assert f"MISMATCH {key}" in run.out
    assert "rows in the file" in run.out
    assert run.out.count("MISMATCH") == 1


async def test_a_changed_value_fails_naming_the_file_and_column(copy: Copy) -> None:
    key = _key(copy, "otel_logs", "b")
    path = copy.objects / key
    table = pq.read_table(path)
    bodies = table.column("Body").to_pylist()
    bodies[3] = "tampered"
    table = table.set_column(table.schema.get_field_index("Body"), "Body", pa.array(bodies))
    pq.write_table(table, path)
    run = await cli(copy.env(), "verify", *WINDOW, "--sample", "0")
    assert run.code == 1, run.out
    assert f"MISMATCH {key}" in run.out
    assert "Body: 'tampered' !=" in run.out
    assert run.out.count("MISMATCH") == 1
    # A metric value changed: the gauge file is named, the other metric tables are not.
    gauge = _key(copy, "otel_metrics_gauge")
    path = copy.objects / gauge
    table = pq.read_table(path)
    index = table.schema.get_field_index("Value")
    table = table.set_column(index, "Value", pc.add(table.column("Value"), 0.5))
    pq.write_table(table, path)
    run = await cli(copy.env(), "verify", *WINDOW, "--sample", "3", "--seed", "1")
    assert run.code == 1, run.out
    assert f"MISMATCH {gauge}" in run.out
    assert "Value:" in run.out


async def test_a_count_mismatch_fails_naming_the_file(copy: Copy) -> None:
    key = _key(copy, "otel_metrics_histogram", "b")
    conn = await asyncpg.connect(copy.database_url)
    try:
        await conn.execute(
            "UPDATE parquet_files SET row_count = row_count + 1 WHERE object_key = $1", key
        )
    finally:
        await conn.close()
    run = await cli(copy.env(), "verify", *WINDOW)
    assert run.code == 1, run.out
    assert f"MISMATCH {key}" in run.out
    assert "in parquet_files" in run.out
