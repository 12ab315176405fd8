"""The manifest (``export_batches``) as the archive commands read and prune it.

Queries are in ``staging/sql/queries.sql`` (``archive_*``); driver errors become
:class:`~otelworker.exceptions.StagingUnavailable`. A row without a tenant (stored before
tenants, migration 0004) is DEFAULT_TENANT's: the queries resolve it, so every
:class:`BatchRow` names its tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg

from otelworker.archive.selection import Selection
from otelworker.staging.queue import fetch

PAGE_ROWS = 1000
# The manifest's min/max_time went through a float of seconds and are rounded to the
# microsecond, so an object is selected a millisecond generously; its records are then
# filtered by their exact nanoseconds.
_SLACK = timedelta(milliseconds=1)
_FIRST = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One manifest row: an object and what it holds."""

    batch_id: uuid.UUID
    signal: str
    object_key: str
    item_count: int
    record_count: int
    compressed_bytes: int
    raw_bytes: int
    min_time: datetime | None
    max_time: datetime | None
    service_names: tuple[str, ...]
    created_at: datetime
    tenant: str = "default"  # whose data (a row without one: DEFAULT_TENANT, resolved)

    @classmethod
    def from_row(cls, row: Any) -> BatchRow:
        return cls(
            row["batch_id"],
            row["signal"],
            row["object_key"],
            int(row["item_count"]),
            int(row["record_count"]),
            int(row["compressed_bytes"]),
            int(row["raw_bytes"]),
            row["min_time"],
            row["max_time"],
            tuple(row["service_names"] or ()),
            row["created_at"],
            row["tenant"],
        )


@dataclass(frozen=True, slots=True)
class Totals:
    objects: int = 0
    records: int = 0
    bytes: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.objects + other.objects, self.records + other.records, self.bytes + other.bytes
        )


@dataclass(frozen=True, slots=True)
class Expired:
    """Manifest rows deleted (committed) by one prune step: their objects may now go."""

    keys: list[str]
    bytes: int
    # prune --force: per destination, the objects deleted before it had taken them.
    lost: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Undelivered:
    """Objects stored before a cut that a destination has not taken yet (prune keeps
    them): ``objects`` distinct in all, and per destination."""

    objects: int = 0
    by_destination: dict[str, int] = field(default_factory=dict)


class KnownKeys(Protocol):
    """What ``gc-orphans`` needs: which of some keys a manifest row names."""

    async def manifest_keys_among(self, keys: Sequence[str]) -> set[str]: ...


class ExpiringIndex(KnownKeys, Protocol):
    """What ``prune`` needs of the manifest."""

    async def expire(
        self, signal: str, before: datetime, limit: int, tenant: str | None = None
    ) -> Expired: ...

    async def expired_totals(self, before: datetime, tenant: str | None = None) -> Totals: ...


def _filters(selection: Selection) -> tuple[datetime | None, datetime | None, str | None]:
    since = selection.since - _SLACK if selection.since is not None else None
    until = selection.until + _SLACK if selection.until is not None else None
    return since, until, selection.service


class ArchiveIndex:
    """The asyncpg adapter: selection pages, totals, and the prune's deletes.

    ``default_tenant`` (DEFAULT_TENANT) is whose the rows without a tenant are.
    """

    def __init__(self, pool: asyncpg.Pool, default_tenant: str = "default") -> None:
        self.pool = pool
        self.default_tenant = default_tenant

    async def _fetch(self, name: str, *args: Any) -> list[Any]:
        return await fetch(self.pool, name, *args)

    async def rows(self, selection: Selection) -> AsyncIterator[BatchRow]:
        """The selected rows, signal by signal, each in the order they were stored.

        Read a page at a time (keyset pagination, no transaction held open), so a long
        replay neither holds a snapshot nor the whole manifest in memory.
        """
        since, until, service = _filters(selection)
        remaining = selection.limit
        for signal in selection.signals:
            after = _FIRST
            while remaining is None or remaining > 0:
                page = PAGE_ROWS if remaining is None else min(PAGE_ROWS, remaining)
                rows = await self._fetch(
                    "archive_batches",
                    signal,
                    since,
                    until,
                    service,
                    *after,
                    page,
                    selection.tenant,
                    self.default_tenant,
                )
                for row in rows:
                    yield BatchRow.from_row(row)
                if remaining is not None:
                    remaining -= len(rows)
                if len(rows) < page:
                    break
                after = (rows[-1]["created_at"], rows[-1]["batch_id"])

    async def totals(self, selection: Selection) -> Totals:
        """Objects, records and stored bytes that :meth:`rows` yields."""
        since, until, service = _filters(selection)
        remaining = selection.limit
        total = Totals()
        for signal in selection.signals:
            if remaining is not None and remaining <= 0:
                break
            [row] = await self._fetch(
                "archive_totals",
                signal,
                since,
                until,
                service,
                remaining,
                selection.tenant,
                self.default_tenant,
            )
            part = Totals(int(row[0]), int(row[1]), int(row[2]))
            total += part
            if remaining is not None:
                remaining -= part.objects
        return total

    async def manifest_keys_among(self, keys: Sequence[str]) -> set[str]:
        rows = await self._fetch("manifest_keys_among", list(keys))
        return {r[0] for r in rows}

    async def expire(
        self,
        signal: str,
        before: datetime,
        limit: int,
        tenant: str | None = None,
        force: bool = False,
    ) -> Expired:
        """Delete (and commit) up to ``limit`` rows of ``signal`` stored before ``before``
        (only ``tenant``'s, unless None); a row a destination has not taken yet only with
        ``force`` (its deliveries are then counted lost)."""
        rows = await self._fetch(
            "archive_expire", signal, before, limit, tenant, self.default_tenant, force
        )
        lost: dict[str, int] = {}
        for r in rows:
            for destination in r["lost"] or ():
                lost[destination] = lost.get(destination, 0) + 1
        return Expired(
            [r["object_key"] for r in rows], sum(int(r["compressed_bytes"]) for r in rows), lost
        )

    async def expired_totals(
        self, before: datetime, tenant: str | None = None, force: bool = False
    ) -> Totals:
        [row] = await self._fetch(
            "archive_expired_totals", before, tenant, self.default_tenant, force
        )
        return Totals(int(row[0]), 0, int(row[1]))

    async def uncompacted(self, before: datetime, tenant: str | None = None) -> int:
        """Rows stored before ``before`` not compacted yet while the Parquet copy is in use
        (any parquet_files row): prune keeps them unless forced."""
        [row] = await self._fetch("archive_kept_uncompacted", before, tenant, self.default_tenant)
        return int(row[0])

    async def expire_parquet(self, before: datetime, limit: int, tenant: str | None) -> Expired:
        """Delete (and commit) up to ``limit`` parquet_files rows recorded before ``before``
        (only ``tenant``'s, unless None): their files may go after."""
        rows = await self._fetch("parquet_expire", before, tenant, limit)
        return Expired(
            [r["object_key"] for r in rows], sum(int(r["compressed_bytes"]) for r in rows)
        )

    async def parquet_expired_totals(self, before: datetime, tenant: str | None) -> Totals:
        [row] = await self._fetch("parquet_expired_totals", before, tenant)
        return Totals(int(row[0]), 0, int(row[1]))

    async def undelivered(self, before: datetime, tenant: str | None = None) -> Undelivered:
        """Rows stored before ``before`` that a destination has not taken yet."""
        rows = await self._fetch("archive_kept_for_delivery", before, tenant, self.default_tenant)
        total = 0
        by_destination: dict[str, int] = {}
        for r in rows:
            if r["destination"] is None:
                total = int(r["objects"])
            else:
                by_destination[r["destination"]] = int(r["objects"])
        return Undelivered(total, by_destination)
