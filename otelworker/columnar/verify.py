"""``otelworker verify``: the proof that the Parquet copy equals the OTLP objects.

Per Parquet file whose data overlaps ``[since, until)``:

- its rows (read from the file itself) equal its ``parquet_files.row_count``;
- for otel_traces and otel_logs, they equal the sum of its source manifest rows'
  ``record_count``; a metrics object fills up to five tables, so the metric tables'
  files that share source objects are checked together (a connected group: the sum of
  their rows equals the sum of their sources' data points);
- no source object is in two files of one table (exactly once);
- a sample of its rows (``sample`` per file, 0: all) equals the same records read from
  the source objects (fetched, decoded with :mod:`otelworker.archive.reader`, converted
  again with :func:`otelworker.columnar.convert.to_tables`), field by field, both ways:
  each sampled Parquet row is among the source records, and each sampled source record
  is among the file's rows. Rows are matched on a key (a span's (TraceId, SpanId), a log
  record's (Timestamp, TraceId, SpanId), a data point's (MetricName, TimeUnix)); a row
  whose key matches but whose values differ is reported with the columns that differ.

A file whose source objects were pruned cannot be checked against them: it is reported
as unverified (not a failure).
"""

from __future__ import annotations

import asyncio
import io
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import asyncpg

from otelworker.archive.reader import read_object
from otelworker.columnar.files import ParquetFileRow
from otelworker.columnar.query import SLACK
from otelworker.exceptions import StagingUnavailable
from otelworker.logs import log_event
from otelworker.sinks.base import ObjectStore
from otelworker.staging.database import DB_ERRORS

FILE_COLUMNS = """file_id, tenant, table_name, object_key, row_count, compressed_bytes,
    min_time, max_time, service_names, source_batches, window_start, window_end, schema_version"""

SELECT_FILES = f"""
SELECT {FILE_COLUMNS}
  FROM parquet_files
 WHERE ($1::text IS NULL OR tenant = $1)
   AND (max_time IS NULL OR max_time >= $2)
   AND (min_time IS NULL OR min_time < $3)
 ORDER BY table_name, min_time NULLS FIRST, file_id
"""

SHARING_FILES = f"""
SELECT {FILE_COLUMNS}
  FROM parquet_files
 WHERE source_batches && $1::uuid[]
"""

SOURCES = """
SELECT batch_id, signal, object_key, record_count, COALESCE(tenant, $2) AS tenant
  FROM export_batches
 WHERE batch_id = ANY ($1::uuid[])
"""

KEYS: dict[str, tuple[str, ...]] = {
    "otel_traces": ("TraceId", "SpanId"),
    "otel_logs": ("Timestamp", "TraceId", "SpanId"),
}
METRIC_KEY = ("MetricName", "TimeUnix")
_SHOWN = 120  # characters of a differing value shown


@dataclass(frozen=True, slots=True)
class Source:
    batch_id: uuid.UUID
    signal: str
    object_key: str
    record_count: int
    tenant: str


@dataclass
class FileCheck:
    file: ParquetFileRow
    rows: int | None = None
    sampled: int = 0
    problems: list[str] = field(default_factory=list)
    unverified: str | None = None


@dataclass
class Report:
    checks: list[FileCheck] = field(default_factory=list)

    @property
    def failed(self) -> list[FileCheck]:
        return [c for c in self.checks if c.problems]

    @property
    def ok(self) -> bool:
        return not self.failed

    def print(self, out: IO[str]) -> None:
        for check in self.checks:
            f = check.file
            if check.problems:
                out.write(f"MISMATCH {f.object_key}\n")
                for problem in check.problems:
                    out.write(f"  {problem}\n")
            elif check.unverified:
                out.write(f"unverified {f.object_key}: {check.unverified}\n")
            else:
                out.write(
                    f"ok {f.object_key} ({check.rows} rows, {check.sampled} compared each way)\n"
                )
        unverified = sum(1 for c in self.checks if c.unverified and not c.problems)
        out.write(
            f"verified {len(self.checks)} file(s): {len(self.checks) - len(self.failed)} agree,"
            f" {len(self.failed)} disagree, {unverified} unverified (sources pruned)\n"
        )


async def _fetch(pool: asyncpg.Pool, sql: str, *args: Any) -> list[Any]:
    try:
        async with pool.acquire() as conn:
            rows: list[Any] = await conn.fetch(sql, *args)
            return rows
    except DB_ERRORS as exc:
        raise StagingUnavailable(f"verify: {type(exc).__name__}") from exc


def _components(files: Sequence[ParquetFileRow]) -> list[list[ParquetFileRow]]:
    """Files grouped by shared source objects (union-find over batch ids)."""
    parent: dict[uuid.UUID, uuid.UUID] = {}

    def find(x: uuid.UUID) -> uuid.UUID:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for f in files:
        ids = [f.file_id, *f.source_batches]
        for other in ids[1:]:
            parent[find(other)] = find(ids[0])
    groups: dict[uuid.UUID, list[ParquetFileRow]] = defaultdict(list)
    for f in files:
        groups[find(f.file_id)].append(f)
    return list(groups.values())


def _plain_types(schema: Any) -> Any:
    """The schema with every timestamp an int64 (exact nanoseconds in Python)."""
    import pyarrow as pa

    def plain(t: Any) -> Any:
        if pa.types.is_timestamp(t):
            return pa.int64()
        if pa.types.is_map(t):
            return pa.map_(plain(t.key_type), plain(t.item_type))
        if pa.types.is_list(t):
            return pa.list_(plain(t.value_type))
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, plain(f.type)) for f in t])
        return t

    return pa.schema([pa.field(f.name, plain(f.type)) for f in schema])


def _norm(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return tuple(_norm(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _norm(v)) for k, v in value.items())
    return value


def _rows(table: Any, indices: Sequence[int]) -> list[dict[str, Any]]:
    import pyarrow as pa

    taken = table.take(pa.array(indices, pa.int64())) if indices else table.slice(0, 0)
    taken = taken.cast(_plain_types(taken.schema))
    return [{k: _norm(v) for k, v in row.items()} for row in taken.to_pylist()]


def _keys(table: Any, columns: Sequence[str]) -> dict[tuple[Any, ...], list[int]]:
    plain = table.select(list(columns))
    plain = plain.cast(_plain_types(plain.schema))
    out: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(*(plain.column(c).to_pylist() for c in columns), strict=True)):
        out[key].append(i)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _compare(
    label: str,
    sampled: Any,
    other: Any,
    key_columns: Sequence[str],
    indices: Sequence[int],
    other_label: str,
) -> list[str]:
    """Each sampled row of ``sampled`` is among ``other``'s rows: the problems if not."""
    problems: list[str] = []
    other_keys = _keys(other, key_columns)
    rows = _rows(sampled, indices)
    columns = [c for c in sampled.column_names if c in other.column_names]
    keys = [tuple(row[c] for c in key_columns) for row in rows]
    # Every candidate row taken at once (one take and conversion, not one per row).
    wanted = sorted({i for key in set(keys) for i in other_keys.get(key, ())})
    by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for cand in _rows(other, wanted):
        by_key[tuple(cand[c] for c in key_columns)].append(cand)
    for index, row, key in zip(indices, rows, keys, strict=True):
        candidates = by_key.get(key, [])
        if any(all(row[c] == cand[c] for c in columns) for cand in candidates):
            continue
        shown = ", ".join(f"{c}={_short(v)}" for c, v in zip(key_columns, key, strict=True))
        if not candidates:
            problems.append(f"{label} row {index} ({shown}) is not in {other_label}")
            continue
        nearest = min(candidates, key=lambda cand: sum(row[c] != cand[c] for c in columns))
        diffs = [
            f"{c}: {_short(row[c])} != {_short(nearest[c])}"
            for c in columns
            if row[c] != nearest[c]
        ]
        problems.append(
            f"{label} row {index} ({shown}) differs from {other_label}: " + "; ".join(diffs)
        )
    return problems


def _sample(n_rows: int, sample: int, rng: random.Random) -> list[int]:
    if sample == 0 or sample >= n_rows:
        return list(range(n_rows))
    return sorted(rng.sample(range(n_rows), sample))


async def _read_parquet(store: ObjectStore, key: str) -> Any:
    import pyarrow.parquet as pq

    body = await store.get(key)
    return await asyncio.to_thread(pq.read_table, io.BytesIO(body))


async def verify(
    pool: asyncpg.Pool,
    store: ObjectStore,
    *,
    since: datetime,
    until: datetime,
    tenant: str | None,
    sample: int,
    seed: int | None = None,
    default_tenant: str = "default",
) -> Report:
    """Check every file whose data overlaps ``[since, until)`` (see the module's doc)."""
    import pyarrow as pa

    from otelworker.columnar.convert import to_tables
    from otelworker.columnar.schema import SIGNAL_TABLES

    rng = random.Random(seed)
    chosen = [
        ParquetFileRow.from_row(r)
        for r in await _fetch(pool, SELECT_FILES, tenant, since - SLACK, until + SLACK)
    ]
    signal_of = {t: s for s, tables in SIGNAL_TABLES.items() for t in tables}
    # The metric tables' files sharing sources with a chosen one are checked with it.
    known = {f.file_id: f for f in chosen}
    frontier = [f for f in chosen if signal_of.get(f.table_name) == "metrics"]
    while frontier:
        batches = sorted({b for f in frontier for b in f.source_batches})
        frontier = []
        for row in await _fetch(pool, SHARING_FILES, batches):
            f = ParquetFileRow.from_row(row)
            if f.file_id not in known and (tenant is None or f.tenant == tenant):
                known[f.file_id] = f
                frontier.append(f)
    files = list(known.values())
    chosen_ids = {f.file_id for f in chosen}
    batch_ids = sorted({b for f in files for b in f.source_batches})
    sources = {
        r["batch_id"]: Source(
            r["batch_id"], r["signal"], r["object_key"], int(r["record_count"]), r["tenant"]
        )
        for r in await _fetch(pool, SOURCES, batch_ids, default_tenant)
    }
    checks = {f.file_id: FileCheck(f) for f in files}

    # Exactly once: a source object in one file per table.
    holders: dict[tuple[str, uuid.UUID], list[ParquetFileRow]] = defaultdict(list)
    for f in files:
        for b in f.source_batches:
            holders[(f.table_name, b)].append(f)
    for (table, batch), holding in holders.items():
        if len(holding) > 1:
            names = ", ".join(h.object_key for h in holding)
            for h in holding:
                checks[h.file_id].problems.append(
                    f"source object {batch} is in {len(holding)} files of {table}: {names}"
                )

    for group in _components(files):
        missing = sorted({b for f in group for b in f.source_batches if b not in sources})
        tables: dict[uuid.UUID, Any] = {}
        unreadable = False
        for f in group:
            check = checks[f.file_id]
            try:
                table = await _read_parquet(store, f.object_key)
            except Exception as exc:  # missing object, not Parquet, truncated, ...
                check.problems.append(f"cannot be read: {type(exc).__name__}: {exc}"[:500])
                unreadable = True
                continue
            tables[f.file_id] = table
            check.rows = table.num_rows
            if table.num_rows != f.row_count:
                check.problems.append(
                    f"{table.num_rows} rows in the file, {f.row_count} in parquet_files"
                )
        if unreadable:
            continue
        if missing:
            for f in group:
                checks[
                    f.file_id
                ].unverified = f"{len(missing)} source object(s) no longer in the manifest (pruned)"
            continue
        signal = signal_of.get(group[0].table_name, "")
        expected = sum(
            sources[b].record_count for b in {b for f in group for b in f.source_batches}
        )
        got = sum(tables[f.file_id].num_rows for f in group)
        if got != expected:
            what = "the files of a metrics group" if len(group) > 1 else "the file"
            for f in group:
                checks[f.file_id].problems.append(
                    f"{got} rows in {what}, {expected} records in the source objects"
                    f" ({', '.join(sorted(str(b) for b in f.source_batches))})"
                )
        # The records again, from the OTLP objects.
        converted: dict[uuid.UUID, dict[str, Any]] = {}
        for batch in {b for f in group for b in f.source_batches}:
            source = sources[batch]
            request = await read_object(store, source.signal, source.object_key)
            converted[batch] = await asyncio.to_thread(
                to_tables, source.signal, request, source.tenant
            )
        for f in group:
            parts = [
                converted[b][f.table_name] for b in f.source_batches if f.table_name in converted[b]
            ]
            parquet = tables[f.file_id]
            if not parts:
                continue
            origin = pa.concat_tables(parts)
            if parquet.column_names != origin.column_names:
                checks[f.file_id].problems.append(
                    f"columns {parquet.column_names} in the file, {origin.column_names}"
                    " converted from the source objects"
                )
            key = KEYS.get(f.table_name, METRIC_KEY if signal == "metrics" else ())
            if not set(key) <= set(parquet.column_names) & set(origin.column_names):
                continue
            check = checks[f.file_id]
            wanted_p = _sample(parquet.num_rows, sample, rng)
            wanted_o = _sample(origin.num_rows, sample, rng)
            check.sampled = max(len(wanted_p), len(wanted_o))
            check.problems += _compare(
                "parquet", parquet, origin, key, wanted_p, "the source objects"
            )
            check.problems += _compare("source record", origin, parquet, key, wanted_o, "the file")
    report = Report(
        [checks[f.file_id] for f in files if f.file_id in chosen_ids or checks[f.file_id].problems]
    )
    for check in report.failed:
        log_event(
            "verify_mismatch",
            "a Parquet file disagrees with its source objects",
            reason="mismatch",
            object_key=check.file.object_key,
            problems=len(check.problems),
        )
    log_event(
        "verify_finished",
        "verify finished",
        files=len(report.checks),
        failed=len(report.failed),
    )
    return report
