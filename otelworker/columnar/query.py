"""``otelworker query``: SQL over the Parquet copy, in an embedded DuckDB.

The seven tables (:data:`otelworker.columnar.schema.TABLES`) are views of the files the
``parquet_files`` manifest selects for the filters (tenant, time range, service), and for
the time bounds the SQL's own WHERE clause sets, where they can be read safely
(:func:`sql_time_bounds`). Only those files are fetched from the object store, into a
bounded local cache (:class:`FileCache`, QUERY_CACHE_DIR, QUERY_CACHE_BYTES, least
recently used out first; a file is immutable, so its object key is its cache key), then
hard-linked into a directory of the query's own. DuckDB is then locked down before the
SQL runs: external access off but for exactly those files, no extension loading, no
replacement scans of Python objects, configuration locked. So the SQL reads what the
views hold and nothing else: ``--tenant`` (or a tenant's token) confines it to that
tenant's files. Only one read-only statement (SELECT, WITH ... SELECT) is run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import asyncpg
import duckdb
import orjson

from otelworker.columnar.files import ParquetFileRow
from otelworker.exceptions import OtelWorkerError, StagingUnavailable
from otelworker.logs import log_event
from otelworker.sinks.base import ObjectStore
from otelworker.staging.database import DB_ERRORS

# The manifest's times are timestamptz (microseconds) and a file's data is in
# nanoseconds: a file is selected a millisecond generously on each side (as the archive
# commands select objects); rows are then filtered by their exact nanoseconds.
SLACK = timedelta(milliseconds=1)
FORMATS = ("table", "csv", "json")
_RUN_PREFIX = "run-"

SELECT_FILES = """
SELECT file_id, tenant, table_name, object_key, row_count, compressed_bytes, min_time,
       max_time, service_names, source_batches, window_start, window_end, schema_version
  FROM parquet_files
 WHERE table_name = $1
   AND ($2::text IS NULL OR tenant = $2)
   AND ($3::timestamptz IS NULL OR max_time IS NULL OR max_time >= $3)
   AND ($4::timestamptz IS NULL OR min_time IS NULL OR min_time < $4)
   AND ($5::text IS NULL OR $5 = ANY (service_names))
 ORDER BY min_time NULLS FIRST, file_id
"""


class QueryRefused(OtelWorkerError):
    """The SQL is not one read-only statement (exit 2)."""


class TokenRefused(OtelWorkerError):
    """The token names no tenant, or another tenant than --tenant (exit 4)."""


class CacheTooSmall(OtelWorkerError):
    """The query's files do not fit in QUERY_CACHE_BYTES."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """``[since, until)`` of a table's time column; None is open on that side."""

    since: datetime | None = None
    until: datetime | None = None

    def narrowed(self, other: Bounds) -> Bounds:
        since = max((t for t in (self.since, other.since) if t is not None), default=None)
        until = min((t for t in (self.until, other.until) if t is not None), default=None)
        return Bounds(since, until)


@dataclass(frozen=True, slots=True)
class Filters:
    tenant: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    service: str | None = None


# --- the SQL ---------------------------------------------------------------------------


def check_read_only(sql: str) -> None:
    """Refuse anything but one SELECT (``WITH ... SELECT`` is one too)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"the SQL does not parse: {exc}") from None
    if len(statements) != 1:
        raise QueryRefused(f"one statement at a time (got {len(statements)})")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"only read-only queries (SELECT, WITH ... SELECT), not {kind.name}")


def _walk(node: Any) -> Iterable[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


_LOWER = {"COMPARE_GREATERTHANOREQUALTO", "COMPARE_GREATERTHAN"}
_UPPER = {"COMPARE_LESSTHAN", "COMPARE_LESSTHANOREQUALTO"}
_MIRROR = {
    "COMPARE_GREATERTHANOREQUALTO": "COMPARE_LESSTHANOREQUALTO",
    "COMPARE_GREATERTHAN": "COMPARE_LESSTHAN",
    "COMPARE_LESSTHAN": "COMPARE_GREATERTHAN",
    "COMPARE_LESSTHANOREQUALTO": "COMPARE_GREATERTHANOREQUALTO",
}
_TIME_TYPES = {"TIMESTAMP", "TIMESTAMPTZ", "TIMESTAMP_NS", "TIMESTAMP_US", "TIMESTAMP_MS", "DATE"}


def _constant_time(node: Any, parse: Any) -> datetime | None:
    """A string constant, or one cast to a timestamp or date type, as a UTC time."""
    if not isinstance(node, dict):
        return None
    if node.get("class") == "CAST":
        type_name = str((node.get("type_expr") or {}).get("type_name", "")).upper()
        if type_name.replace(" WITH TIME ZONE", "TZ") not in _TIME_TYPES or node.get("try_cast"):
            return None
        node = node.get("child")
        if not isinstance(node, dict):
            return None
    if node.get("class") != "CONSTANT":
        return None
    literal = node.get("literal") or {}
    text = literal.get("text")
    if literal.get("kind") != "STRING" or not isinstance(text, str):
        return None
    result: datetime | None = parse(text)
    return result


def _is_time_column(node: Any, column: str, names: set[str]) -> bool:
    if not isinstance(node, dict) or node.get("class") != "COLUMN_REF":
        return False
    parts = [str(p).lower() for p in node.get("column_names", [])]
    if not parts or parts[-1] != column.lower():
        return False
    return len(parts) == 1 or (len(parts) == 2 and parts[0] in names)


def _conjuncts(node: Any) -> list[Any]:
    if isinstance(node, dict) and node.get("type") == "CONJUNCTION_AND":
        return [c for child in node.get("children", []) for c in _conjuncts(child)]
    return [node] if node else []


def sql_time_bounds(sql: str, time_columns: dict[str, str]) -> dict[str, Bounds]:
    """The time bounds the SQL's WHERE clause sets on a table, where it is safe to read.

    Conservative: a table's bounds are read only when the statement names it exactly once,
    as the sole FROM of a SELECT whose WHERE has, among its top-level AND terms,
    ``<time column> >=|>|<|<= <literal>`` (either way round) or ``<time column> BETWEEN
    <literal> AND <literal>``, the literal a string or one cast to a timestamp or date.
    Anything else (OR, NOT, expressions, a join, a second reference in a subquery or CTE)
    leaves the table unbounded: never narrow wrongly. Bounds are inclusive (a strict
    comparison is taken as an inclusive one: files are selected generously).
    """
    parser = duckdb.connect(":memory:")
    try:
        parser.execute("SET TimeZone = 'UTC'")
        serialized = parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
        if serialized is None:
            return {}
        tree = orjson.loads(serialized[0])

        def parse(text: str) -> datetime | None:
            try:
                row = parser.execute("SELECT TRY_CAST(? AS TIMESTAMPTZ)", [text]).fetchone()
            except duckdb.Error:
                return None
            if row is None or not isinstance(row[0], datetime):
                return None
            return row[0].astimezone(UTC)

        if tree.get("error"):
            return {}
        nodes = list(_walk(tree.get("statements", [])))
        references: dict[str, int] = {}
        for node in nodes:
            if node.get("type") == "BASE_TABLE" and node.get("schema_name") in ("", "main"):
                name = str(node.get("table_name", "")).lower()
                references[name] = references.get(name, 0) + 1
        out: dict[str, Bounds] = {}
        for node in nodes:
            if node.get("type") != "SELECT_NODE":
                continue
            source = node.get("from_table") or {}
            if source.get("type") != "BASE_TABLE" or source.get("schema_name") not in ("", "main"):
                continue
            table = str(source.get("table_name", "")).lower()
            if table not in time_columns or references.get(table) != 1:
                continue
            names = {table} | ({str(source["alias"]).lower()} if source.get("alias") else set())
            column = time_columns[table]
            bounds = Bounds()
            for term in _conjuncts(node.get("where_clause")):
                kind = term.get("type") if isinstance(term, dict) else None
                if kind == "COMPARE_BETWEEN" and _is_time_column(term.get("input"), column, names):
                    low = _constant_time(term.get("lower"), parse)
                    high = _constant_time(term.get("upper"), parse)
                    until = None if high is None else high + timedelta(microseconds=1)
                    bounds = bounds.narrowed(Bounds(low, until))
                    continue
                if kind not in _LOWER | _UPPER:
                    continue
                left, right = term.get("left"), term.get("right")
                if _is_time_column(right, column, names):
                    left, right, kind = right, left, _MIRROR[kind]
                if not _is_time_column(left, column, names):
                    continue
                at = _constant_time(right, parse)
                if at is None:
                    continue
                if kind in _LOWER:
                    bounds = bounds.narrowed(Bounds(since=at))
                else:
                    # Inclusive of the bound itself: `< X` keeps a file starting at X.
                    bounds = bounds.narrowed(Bounds(until=at + timedelta(microseconds=1)))
            if bounds != Bounds():
                out[table] = bounds
        return out
    except duckdb.Error:
        return {}
    finally:
        parser.close()


def referenced_tables(sql: str) -> set[str] | None:
    """The (lower-case) names of the tables the SQL names; None if it cannot be told."""
    parser = duckdb.connect(":memory:")
    try:
        serialized = parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
        if serialized is None:
            return None
        tree = orjson.loads(serialized[0])
        if tree.get("error"):
            return None
        return {
            str(node.get("table_name", "")).lower()
            for node in _walk(tree.get("statements", []))
            if node.get("type") == "BASE_TABLE"
        }
    except duckdb.Error:
        return None
    finally:
        parser.close()


# --- the manifest ----------------------------------------------------------------------


async def select_files(
    pool: asyncpg.Pool, table: str, filters: Filters, bounds: Bounds
) -> list[ParquetFileRow]:
    """The table's files whose data may hold rows in ``bounds`` (and the filters)."""
    since = bounds.since - SLACK if bounds.since is not None else None
    until = bounds.until + SLACK if bounds.until is not None else None
    try:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                SELECT_FILES, table, filters.tenant, since, until, filters.service
            )
    except DB_ERRORS as exc:
        raise StagingUnavailable(f"parquet_files: {type(exc).__name__}") from exc
    return [ParquetFileRow.from_row(r) for r in rows]


# --- the cache ---------------------------------------------------------------------------


@dataclass
class FileCache:
    """Parquet files fetched from the object store, at most ``max_bytes`` on disk.

    A file's name is the SHA-256 of its object key (objects are immutable: a key names
    one content forever). A hit refreshes the file's mtime; room is made by removing the
    least recently used files, never one the current query needs. Written atomically
    (temporary name, then rename), so concurrent queries share the directory.
    """

    directory: Path
    max_bytes: int
    fetched: list[str] = field(default_factory=list)  # object keys fetched this run

    def path_of(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest() + ".parquet")

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for entry in os.scandir(self.directory):
            if entry.is_file() and entry.name.endswith(".parquet"):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                out.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return out

    def sweep_runs(self) -> None:
        """Remove the run directories of queries whose process is gone (killed)."""
        for entry in os.scandir(self.directory):
            if not (entry.is_dir() and entry.name.startswith(_RUN_PREFIX)):
                continue
            try:
                pid = int(entry.name[len(_RUN_PREFIX) :].split("-", 1)[0])
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(entry.path, ignore_errors=True)
            except (ValueError, PermissionError):
                continue

    def _make_room(self, needed: int, keep: set[Path]) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total + needed <= self.max_bytes:
                break
            if path in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log_event("query_cache_evicted", "query cache file evicted", path=path.name)

    async def fetch_all(self, store: ObjectStore, files: Sequence[ParquetFileRow]) -> list[Path]:
        """Every file's local path, fetching those not cached."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sweep_runs()
        needed = sum(f.compressed_bytes for f in files)
        if needed > self.max_bytes:
            raise CacheTooSmall(
                f"the query needs {len(files)} file(s) of {needed} bytes, more than"
                f" QUERY_CACHE_BYTES={self.max_bytes}: narrow it (--since/--until, --service,"
                " a WHERE on the time column) or raise QUERY_CACHE_BYTES"
            )
        paths = [self.path_of(f.object_key) for f in files]
        keep = set(paths)
        for file, path in zip(files, paths, strict=True):
            if path.exists():
                os.utime(path)
                continue
            body = await store.get(file.object_key)
            self._make_room(len(body), keep)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, path)
            self.fetched.append(file.object_key)
            log_event(
                "query_file_fetched",
                "parquet file fetched into the query cache",
                object_key=file.object_key,
                bytes=len(body),
            )
        return paths


# --- running it ------------------------------------------------------------------------


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ts(at: datetime) -> str:
    return f"TIMESTAMPTZ {_quote(at.astimezone(UTC).isoformat())}"


@dataclass
class Plan:
    """Which files each table's view reads (and the row filters of the flags)."""

    files: dict[str, list[ParquetFileRow]]
    filters: Filters
    time_columns: dict[str, str]

    @property
    def all_files(self) -> list[ParquetFileRow]:
        return [f for files in self.files.values() for f in files]


def view_sql(table: str, paths: Sequence[Path], plan: Plan) -> str:
    where = []
    column = _ident(plan.time_columns[table])
    if plan.filters.since is not None:
        where.append(f"{column} >= {_ts(plan.filters.since)}")
    if plan.filters.until is not None:
        where.append(f"{column} < {_ts(plan.filters.until)}")
    if plan.filters.service is not None:
        where.append(f'"ServiceName" = {_quote(plan.filters.service)}')
    if plan.filters.tenant is not None:
        where.append(f'"Tenant" = {_quote(plan.filters.tenant)}')
    files = ", ".join(_quote(str(p)) for p in paths)
    source = f"read_parquet([{files}], union_by_name = true)"
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"CREATE VIEW {_ident(table)} AS SELECT * FROM {source}{clause}"


def connect(
    plan: Plan,
    paths: dict[str, list[Path]],
    schemas: dict[str, Any],
    spill_dir: Path | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views, then locked down (see the module's doc).

    ``spill_dir``: where a sort or join larger than memory spills (the query's own
    directory; without it, such a query fails for want of memory).
    """
    import pyarrow as pa

    conn = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("SET autoload_known_extensions = false")
    conn.execute("SET python_enable_replacements = false")
    allowed: list[str] = []
    for table, schema in schemas.items():
        if paths.get(table):
            conn.execute(view_sql(table, paths[table], plan))
            allowed.extend(str(p) for p in paths[table])
        else:
            empty = pa.Table.from_batches([], schema=schema)
            conn.register(f"_empty_{table}", empty)
            conn.execute(
                f"CREATE VIEW {_ident(table)} AS SELECT * FROM {_ident('_empty_' + table)}"
            )
    conn.execute(f"SET allowed_paths = [{', '.join(_quote(p) for p in allowed)}]")
    if spill_dir is not None:
        spill_dir.mkdir(parents=True, exist_ok=True)
        conn.execute(f"SET temp_directory = {_quote(str(spill_dir))}")
        conn.execute(f"SET allowed_directories = [{_quote(str(spill_dir) + os.sep)}]")
    conn.execute("SET enable_external_access = false")
    conn.execute("SET lock_configuration = true")
    return conn


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def execute(conn: duckdb.DuckDBPyConnection, sql: str) -> Result:
    cursor = conn.execute(sql)
    columns = [d[0] for d in cursor.description or []]
    return Result(columns, cursor.fetchall())


async def plan_query(pool: asyncpg.Pool, sql: str, filters: Filters) -> Plan:
    from otelworker.columnar.schema import TABLES, TIME_COLUMN

    from_sql = sql_time_bounds(sql, {t.lower(): c for t, c in TIME_COLUMN.items()})
    named = referenced_tables(sql)
    files: dict[str, list[ParquetFileRow]] = {}
    for table in TABLES:
        if named is not None and table.lower() not in named:
            # Not named by the SQL: an empty view, no file fetched.
            files[table] = []
            continue
        bounds = Bounds(filters.since, filters.until).narrowed(
            from_sql.get(table.lower(), Bounds())
        )
        files[table] = await select_files(pool, table, filters, bounds)
    return Plan(files, filters, dict(TIME_COLUMN))


async def run_query(
    pool: asyncpg.Pool, store: ObjectStore, cache: FileCache, sql: str, filters: Filters
) -> Result:
    """Plan, fetch, run: the whole of ``otelworker query`` but the printing."""
    from otelworker.columnar.schema import TABLES

    check_read_only(sql)
    plan = await plan_query(pool, sql, filters)
    cached = await cache.fetch_all(store, plan.all_files)
    by_key = dict(zip((f.object_key for f in plan.all_files), cached, strict=True))
    # The query's own directory of hard links: another query's eviction cannot take a
    # file from under this one, and DuckDB is allowed exactly these paths.
    run_dir = cache.directory / f"{_RUN_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    run_dir.mkdir()
    try:
        paths: dict[str, list[Path]] = {}
        for table, files in plan.files.items():
            paths[table] = []
            for f in files:
                link = run_dir / by_key[f.object_key].name
                if not link.exists():
                    try:
                        os.link(by_key[f.object_key], link)
                    except OSError:
                        shutil.copyfile(by_key[f.object_key], link)
                paths[table].append(link)
        log_event(
            "query_planned",
            "query planned",
            tenant=filters.tenant,
            files=len(plan.all_files),
            bytes=sum(f.compressed_bytes for f in plan.all_files),
            fetched=len(cache.fetched),
            tables={t: len(fs) for t, fs in plan.files.items() if fs},
        )
        conn = connect(plan, paths, TABLES, spill_dir=run_dir / "spill")
        try:
            return execute(conn, sql)
        finally:
            conn.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# --- printing --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A value as JSON holds it: maps as objects, bytes as hex, times in RFC 3339."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(_plain(value)).decode()
    plain = _plain(value)
    return plain if isinstance(plain, str) else str(plain)


def render(result: Result, fmt: str, out: IO[str]) -> None:
    if fmt == "json":
        for row in result.rows:
            record = {c: _plain(v) for c, v in zip(result.columns, row, strict=True)}
            out.write(orjson.dumps(record).decode() + "\n")
        return
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(result.columns)
        for row in result.rows:
            writer.writerow([_cell(v) for v in row])
        out.write(buffer.getvalue())
        return
    cells = [[_cell(v).replace("\n", "\\n") for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for cell_row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, cell_row, strict=True)]
    numeric = [
        all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in result.rows)
        and bool(result.rows)
        for i in range(len(result.columns))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out.write(line(result.columns) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for cell_row in cells:
        out.write(line(cell_row) + "\n")
    out.write(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})\n")
