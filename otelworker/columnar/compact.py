"""Compaction: closed windows of OTLP objects into Parquet files, each record exactly once.

A window is by arrival: the manifest rows (``export_batches``) of one (tenant, signal)
stored before ``now - COMPACT_GRACE_S`` and not compacted yet, split by the hour they
arrived in (each file lands in one ``date=/hour=`` partition) and cut into chunks of
about ``COMPACT_TARGET_BYTES`` of their objects' raw (uncompressed protobuf) bytes. A
chunk becomes one Parquet file per table it has rows for (traces and logs: one; metrics:
up to five), written under fresh ids, uploaded, and then recorded in ONE transaction:

1. ``UPDATE export_batches SET compacted_at = now() WHERE batch_id = ANY(chunk) AND
   compacted_at IS NULL``: fewer rows than the chunk means another compactor took some
   first: roll back (this run's files become orphans, which ``gc-orphans`` removes);
2. else insert the files' ``parquet_files`` rows, and commit.

So a crash anywhere leaves either no record of a file (an orphan, its source rows still
uncompacted: the next run converts them again) or the file recorded once with its source
rows marked: a rerun never duplicates or skips a record. A record that arrives late (a
replay, a slow client) has a new manifest row and lands in a later file; no file is ever
rewritten.

In the loop (``ROLE=compactor``, ``compact`` without ``--once``), a chunk of an hour that
is not closed yet (its end not before the cut) waits until it is full or the hour closes,
so an hour gets a few large files rather than one per interval; ``--once`` takes
everything before the cut.

One compactor works on a (tenant, signal) at a time (a session advisory lock held for
the pass: a second one skips it rather than convert the same objects in vain); the
transaction above is what keeps the records exactly once even without the lock.

Metrics (``otelworker_compact_*``, docs/operations.md): counted where the events are
logged; after each pass, ``otelworker_compact_lag_seconds`` is the age of the oldest
object that pass was due to take and did not (``compact_oldest_due``): 0 while the
compactor keeps up.
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from otelworker.archive.reader import decompress
from otelworker.columnar.files import ParquetFile
from otelworker.exceptions import BadPayload, ObjectStoreError, StagingUnavailable
from otelworker.forwarding.forwarder import object_missing
from otelworker.logs import log_event
from otelworker.metrics import Metrics
from otelworker.otlp import SIGNALS
from otelworker.sinks.base import ObjectStore
from otelworker.staging.database import DB_ERRORS
from otelworker.staging.sql import query

PAGE_ROWS = 5000
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"


@dataclass(frozen=True, slots=True)
class Source:
    """One manifest row to compact."""

    batch_id: uuid.UUID
    object_key: str
    record_count: int
    raw_bytes: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Chunk:
    """Manifest rows of one (tenant, signal) and arrival hour that go into one set of
    files (one per table)."""

    tenant: str
    signal: str
    hour: datetime  # the arrival hour (UTC), the files' partition
    sources: tuple[Source, ...]

    @property
    def raw_bytes(self) -> int:
        return sum(s.raw_bytes for s in self.sources)


@dataclass(frozen=True, slots=True)
class Built:
    """A chunk converted: its files (uploaded) and the sources they hold (those whose
    object could be read; an unreadable one stays uncompacted)."""

    chunk: Chunk
    files: tuple[ParquetFile, ...]
    sources: tuple[Source, ...]
    unreadable: tuple[Source, ...] = ()


@dataclass
class CompactResult:
    chunks: int = 0  # chunks recorded
    files: int = 0
    rows: int = 0
    sources: int = 0  # manifest rows marked compacted
    lost_races: int = 0  # chunks another compactor recorded first (our files orphans)
    busy: int = 0  # (tenant, signal) passes skipped: another compactor held them
    unreadable: int = 0  # objects that could not be read (left uncompacted)
    bytes: int = 0  # Parquet bytes recorded


def pass_failure(exc: StagingUnavailable | ObjectStoreError) -> str:
    """The ``reason`` of a failed pass (metric and event): the database or the store."""
    return "database_error" if isinstance(exc, StagingUnavailable) else "object_store_error"


class LostRace(Exception):
    """Another compactor (or prune) took some of a chunk's source rows first."""


def plan_chunks(
    tenant: str,
    signal: str,
    sources: Sequence[Source],
    *,
    target_bytes: int,
    cut: datetime,
    partial_hours: bool,
) -> list[Chunk]:
    """Sources (in arrival order) cut into chunks: by arrival hour, then up to about
    ``target_bytes`` of raw bytes each. Without ``partial_hours``, the last chunk of an
    hour not closed at ``cut`` is held back unless it is full."""
    chunks: list[Chunk] = []
    current: list[Source] = []
    size = 0
    hour: datetime | None = None

    def close(full: bool) -> None:
        nonlocal current, size
        if not current:
            return
        assert hour is not None
        if full or partial_hours or hour + timedelta(hours=1) <= cut:
            chunks.append(Chunk(tenant, signal, hour, tuple(current)))
        current, size = [], 0

    for source in sources:
        at = source.created_at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        if hour is not None and at != hour:
            close(full=False)
        hour = at
        current.append(source)
        size += source.raw_bytes
        if size >= target_bytes:
            close(full=True)
    close(full=False)
    return chunks


def _ns_to_datetime(ns: int | None, *, ceil: bool) -> datetime | None:
    if ns is None:
        return None
    micros, rest = divmod(ns, 1000)
    if ceil and rest:
        micros += 1
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


def convert_chunk(
    chunk: Chunk, bodies: dict[uuid.UUID, bytes], prefix: str
) -> list[tuple[ParquetFile, bytes]]:
    """CPU work (run in a thread): decode each object, convert, write one Parquet file per
    table with rows. The files' ids are fresh; their bodies are returned to upload."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from otelworker.columnar.convert import tables_of, time_range, write_parquet
    from otelworker.columnar.schema import SIGNAL_TABLES, TIME_COLUMN, parquet_key

    parts: dict[str, list[Any]] = {name: [] for name in SIGNAL_TABLES[chunk.signal]}
    batch_ids: list[str] = []
    for source in chunk.sources:
        body = bodies.get(source.batch_id)
        if body is None:
            continue
        raw = decompress(source.object_key, body)
        try:
            converted = tables_of(chunk.signal, raw, chunk.tenant)
        except BadPayload as exc:
            raise BadPayload(f"{source.object_key}: {exc}") from None
        except MemoryError:
            raise
        except Exception as exc:
            # Whatever else converting one object raises (an Arrow error on data it cannot
            # hold, a converter's bug) is that object's: it is left out, uncompacted and
            # logged, and the rest of the chunk goes on; it never ends the compactor.
            raise BadPayload(
                f"{source.object_key}: cannot convert: {type(exc).__name__}: {exc}"
            ) from None
        for name, table in converted.items():
            if table.num_rows:
                parts[name].append(table)
        batch_ids.append(str(source.batch_id))
    out: list[tuple[ParquetFile, bytes]] = []
    hour = chunk.hour.strftime("%Y-%m-%dT%H")
    for name, tables in parts.items():
        if not tables:
            continue
        table = pa.concat_tables(tables)
        file_id = uuid.uuid4()
        sink = io.BytesIO()
        write_parquet(
            table, table_name=name, tenant=chunk.tenant, source_batches=batch_ids, sink=sink
        )
        body = sink.getvalue()
        low, high = time_range(table, TIME_COLUMN[name])
        services = pc.unique(table.column("ServiceName")).to_pylist()
        out.append(
            (
                ParquetFile(
                    file_id=file_id,
                    tenant=chunk.tenant,
                    table_name=name,
                    object_key=parquet_key(prefix, chunk.tenant, name, hour, str(file_id)),
                    row_count=table.num_rows,
                    compressed_bytes=len(body),
                    min_time=_ns_to_datetime(low, ceil=False),
                    max_time=_ns_to_datetime(high, ceil=True),
                    service_names=tuple(sorted(s for s in services if s is not None)),
                ),
                body,
            )
        )
    return out


class Compactor:
    """Compacts the manifest's closed windows (see the module's docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: ObjectStore,
        *,
        prefix: str,
        grace_s: float,
        target_bytes: int,
        default_tenant: str = "default",
        fetch_concurrency: int = 8,
        metrics: Metrics | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.prefix = prefix
        self.grace = timedelta(seconds=grace_s)
        self.target_bytes = target_bytes
        self.default_tenant = default_tenant
        self.fetch_concurrency = fetch_concurrency
        # The service's registry (served at /metrics); a command's own otherwise.
        self.metrics = metrics if metrics is not None else Metrics()

    # --- the database -------------------------------------------------------------------

    async def _fetch(self, name: str, *args: Any) -> list[Any]:
        try:
            async with self.pool.acquire() as conn:
                rows: list[Any] = await conn.fetch(query(name), *args)
                return rows
        except DB_ERRORS as exc:
            raise StagingUnavailable(f"{name}: {type(exc).__name__}") from exc

    async def tenants(self, signal: str, cut: datetime) -> list[str]:
        rows = await self._fetch("compact_tenants", signal, cut, self.default_tenant)
        return sorted(r["tenant"] for r in rows)

    async def pending(
        self, tenant: str, signal: str, cut: datetime, limit: int = PAGE_ROWS
    ) -> list[Source]:
        rows = await self._fetch("compact_pending", signal, cut, tenant, self.default_tenant, limit)
        return [
            Source(
                r["batch_id"],
                r["object_key"],
                int(r["record_count"]),
                int(r["raw_bytes"]),
                r["created_at"],
            )
            for r in rows
        ]

    # --- one chunk: build (convert, upload), then commit ---------------------------------

    async def build(self, chunk: Chunk) -> Built:
        """Read the chunk's objects, convert them, upload the files (fresh ids)."""
        slots = asyncio.Semaphore(self.fetch_concurrency)
        bodies: dict[uuid.UUID, bytes] = {}
        unreadable: list[Source] = []

        def leave_out(source: Source, message: str, reason: str, exc: Exception) -> None:
            """An object that cannot be compacted: left uncompacted, logged."""
            unreadable.append(source)
            self.metrics.compact_failures.labels(reason).inc()
            log_event(
                "compact_object_unreadable",
                message,
                reason=reason,
                level=logging.ERROR,
                object_key=source.object_key,
                error=str(exc)[:500],
            )

        async def get(source: Source) -> None:
            async with slots:
                try:
                    bodies[source.batch_id] = await self.store.get(source.object_key)
                except ObjectStoreError as exc:
                    if not object_missing(exc):
                        raise
                    leave_out(
                        source,
                        "an archived object could not be read; left uncompacted",
                        "object_missing",
                        exc,
                    )

        try:
            async with asyncio.TaskGroup() as group:
                for source in chunk.sources:
                    group.create_task(get(source))
        except* ObjectStoreError as failed:
            # A store outage fails the pass as one ObjectStoreError (the loop retries it
            # at the next interval), not as an ExceptionGroup that would end the loop.
            raise failed.exceptions[0] from None
        while True:
            try:
                written = await asyncio.to_thread(convert_chunk, chunk, bodies, self.prefix)
                break
            except BadPayload as exc:
                # One corrupt object: leave it out (uncompacted, logged), convert the rest.
                bad = next((s for s in chunk.sources if s.object_key in str(exc)), None)
                if bad is None or bad.batch_id not in bodies:
                    raise
                del bodies[bad.batch_id]
                leave_out(
                    bad,
                    "an archived object could not be decoded; left uncompacted",
                    "object_corrupt",
                    exc,
                )
        for file, body in written:
            await self.store.put(file.object_key, body, PARQUET_CONTENT_TYPE, None)
        kept = tuple(s for s in chunk.sources if s.batch_id in bodies)
        return Built(chunk, tuple(f for f, _ in written), kept, tuple(unreadable))

    async def commit(self, built: Built) -> None:
        """Record the files and mark their sources compacted, in one transaction; raise
        :class:`LostRace` (rolled back) when another compactor took a source first."""
        from otelworker.columnar.schema import SCHEMA_VERSION

        sources = built.sources
        ids = [s.batch_id for s in sources]
        window_start = min((s.created_at for s in sources), default=built.chunk.hour)
        window_end = max((s.created_at for s in sources), default=built.chunk.hour)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                status = await conn.execute(query("compact_mark"), ids)
                marked = int(status.split()[-1])
                if marked != len(ids):
                    raise LostRace(f"{len(ids) - marked} of {len(ids)} sources taken")
                await conn.executemany(
                    query("parquet_file_insert"),
                    [
                        (
                            f.file_id,
                            f.tenant,
                            f.table_name,
                            f.object_key,
                            f.row_count,
                            f.compressed_bytes,
                            f.min_time,
                            f.max_time,
                            list(f.service_names),
                            ids,
                            window_start,
                            window_end,
                            SCHEMA_VERSION,
                        )
                        for f in built.files
                    ],
                )
        except DB_ERRORS as exc:
            raise StagingUnavailable(f"compact commit: {type(exc).__name__}") from exc

    # --- passes ---------------------------------------------------------------------------

    async def run_once(
        self,
        *,
        tenant: str | None = None,
        signal: str | None = None,
        now: datetime | None = None,
        partial_hours: bool = True,
    ) -> CompactResult:
        """Compact everything closed at ``now`` (default: the database's clock is not
        asked; this process's), per (tenant, signal)."""
        now = now or datetime.now(UTC)
        cut = now - self.grace
        signals = (signal,) if signal else SIGNALS
        # What this pass is due to take: everything before the cut, or (the loop) only
        # the hours closed at the cut (an open hour's tail waits, see plan_chunks).
        due = cut if partial_hours else cut.replace(minute=0, second=0, microsecond=0)
        result = CompactResult()
        self.metrics.compact_runs.inc()
        try:
            for sig in signals:
                tenants = [tenant] if tenant else await self.tenants(sig, cut)
                for who in tenants:
                    await self._pass(who, sig, cut, partial_hours, result)
        except (StagingUnavailable, ObjectStoreError) as exc:
            self.metrics.compact_failures.labels(pass_failure(exc)).inc()
            if isinstance(exc, ObjectStoreError):
                # The database answers: the lag still says how far behind the copy is.
                await self._refresh_lag_or_log(now, due, signals, tenant)
            raise
        await self._refresh_lag_or_log(now, due, signals, tenant)
        return result

    async def _refresh_lag_or_log(
        self, now: datetime, due: datetime, signals: Sequence[str], tenant: str | None
    ) -> None:
        """The lag after a pass; a database that fails here leaves the gauge as it was
        (logged): the pass's work is done (or failed on its own account)."""
        try:
            await self.refresh_lag(now, due, signals, tenant)
        except StagingUnavailable as exc:
            log_event(
                "compact_lag_failed",
                "could not read the compaction lag; the gauge keeps its last value",
                reason="database_error",
                level=logging.WARNING,
                error=str(exc)[:500],
            )

    async def refresh_lag(
        self, now: datetime, due: datetime, signals: Sequence[str], tenant: str | None
    ) -> float:
        """``otelworker_compact_lag_seconds``: the age at ``now`` of the oldest object
        stored before ``due`` and not compacted yet (0 when none); one indexed probe per
        signal."""
        rows = await self._fetch(
            "compact_oldest_due", list(signals), due, tenant, self.default_tenant
        )
        oldest: datetime | None = rows[0][0] if rows else None
        lag = max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
        self.metrics.compact_lag.set(lag)
        return lag

    async def _pass(
        self, tenant: str, signal: str, cut: datetime, partial_hours: bool, result: CompactResult
    ) -> None:
        try:
            async with self.pool.acquire() as lock_conn:
                if not await lock_conn.fetchval(query("compact_try_lock"), tenant, signal):
                    result.busy += 1
                    log_event(
                        "compact_busy",
                        "another compactor is on this tenant and signal; skipped",
                        reason="locked",
                        level=logging.DEBUG,
                        tenant=tenant,
                        signal=signal,
                    )
                    return
                try:
                    await self._compact(tenant, signal, cut, partial_hours, result)
                finally:
                    if not lock_conn.is_closed():
                        await asyncio.shield(
                            lock_conn.fetchval(query("compact_unlock"), tenant, signal)
                        )
        except DB_ERRORS as exc:
            raise StagingUnavailable(f"compact lock: {type(exc).__name__}") from exc

    async def _compact(
        self, tenant: str, signal: str, cut: datetime, partial_hours: bool, result: CompactResult
    ) -> None:
        skipped: set[uuid.UUID] = set()  # unreadable this run: not tried again
        while True:
            sources = [
                s
                for s in await self.pending(tenant, signal, cut, PAGE_ROWS + len(skipped))
                if s.batch_id not in skipped
            ]
            if not sources:
                return
            full_page = len(sources) >= PAGE_ROWS
            chunks = plan_chunks(
                tenant,
                signal,
                sources,
                target_bytes=self.target_bytes,
                cut=cut,
                # A full page is taken whole (its last hour's tail too), so that a pass
                # always progresses; only a last page holds an open hour's tail back.
                partial_hours=partial_hours or full_page,
            )
            if not chunks:
                return
            for chunk in chunks:
                await self._one(chunk, result, skipped)
            if not full_page:
                # Held-back partial hours stay for a later pass; everything else is done.
                return

    async def _one(self, chunk: Chunk, result: CompactResult, skipped: set[uuid.UUID]) -> None:
        built = await self.build(chunk)
        for bad in built.unreadable:
            skipped.add(bad.batch_id)
        result.unreadable += len(built.unreadable)
        if not built.sources:
            return
        try:
            await self.commit(built)
        except LostRace as exc:
            result.lost_races += 1
            self.metrics.compact_failures.labels("lost_race").inc()
            log_event(
                "compact_lost_race",
                "another compactor recorded these objects first; this run's files are"
                " orphans (gc-orphans removes them)",
                reason="lost_race",
                level=logging.WARNING,
                tenant=chunk.tenant,
                signal=chunk.signal,
                detail=str(exc),
                orphans=[f.object_key for f in built.files],
            )
            return
        rows = sum(f.row_count for f in built.files)
        size = sum(f.compressed_bytes for f in built.files)
        result.chunks += 1
        result.files += len(built.files)
        result.rows += rows
        result.sources += len(built.sources)
        result.bytes += size
        for f in built.files:
            self.metrics.compact_files.labels(f.table_name).inc()
            self.metrics.compact_records.labels(f.table_name).inc(f.row_count)
            self.metrics.compact_bytes.labels(f.table_name).inc(f.compressed_bytes)
        self.metrics.compact_source_objects.labels(chunk.signal).inc(len(built.sources))
        log_event(
            "compact_chunk_recorded",
            "OTLP objects compacted into Parquet files",
            tenant=chunk.tenant,
            signal=chunk.signal,
            hour=chunk.hour.isoformat(),
            objects=len(built.sources),
            files=len(built.files),
            rows=rows,
            bytes=size,
        )


@dataclass
class CompactLoop:
    """ROLE=compactor and ``compact`` without ``--once``: a pass every interval."""

    compactor: Compactor
    interval_s: float
    tenant: str | None = None
    signal: str | None = None
    passes: int = field(default=0)

    async def run(self) -> None:
        while True:
            started = asyncio.get_running_loop().time()
            try:
                result = await self.compactor.run_once(
                    tenant=self.tenant, signal=self.signal, partial_hours=False
                )
                self.passes += 1
                if result.chunks or result.lost_races or result.unreadable:
                    log_event(
                        "compact_pass_finished",
                        "compaction pass finished",
                        chunks=result.chunks,
                        files=result.files,
                        rows=result.rows,
                        objects=result.sources,
                        lost_races=result.lost_races,
                        unreadable=result.unreadable,
                    )
            except (StagingUnavailable, ObjectStoreError) as exc:
                log_event(
                    "compact_pass_failed",
                    "compaction pass failed; retrying at the next interval",
                    # As otelworker_compact_failures_total counts it.
                    reason=pass_failure(exc),
                    level=logging.WARNING,
                    error_class=type(exc).__name__,
                    error=str(exc)[:500],
                )
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(self.interval_s - elapsed, 0.0))
