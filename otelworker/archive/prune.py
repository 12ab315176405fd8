"""``prune`` and ``gc-orphans``: delete what the archive no longer needs, never what a
manifest row still names.

``prune`` deletes manifest rows stored before the cut (``created_at``) in chunks, each
chunk committed *before* its objects are deleted: a crash in between leaves objects no
row names (orphans), never a row naming a missing object. It then sweeps orphans, as
``gc-orphans`` does, so a re-run finishes what a crashed run left.

``gc-orphans`` deletes objects under ``S3_PREFIX`` that no manifest row names and that
are older than an age. The age protects uploads in progress: a worker writes the object
first and commits its row after, so a young object without a row may be about to get one.

Objects live under ``{S3_PREFIX}/{tenant}/year=...`` and, stored before tenants, under
``{S3_PREFIX}/year=...`` (DEFAULT_TENANT's): listing ``{S3_PREFIX}/`` finds both. A
``prune`` of one tenant deletes only that tenant's rows and sweeps only that tenant's
keys (:func:`tenant_prefixes`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from otelworker.archive.manifest import Expired, ExpiringIndex, KnownKeys, Totals, Undelivered
from otelworker.exceptions import ObjectStoreError, OtelWorkerError
from otelworker.logs import log_event
from otelworker.otlp import SIGNALS
from otelworker.sinks.base import ObjectStore

CHUNK_ROWS = 1000
SWEEP_PAGE = 500
DELETE_CONCURRENCY = 8
# No object younger than this is ever taken for an orphan (gc-orphans' default and least
# age, prune's least age for its sweep): its manifest row may still be on its way.
ORPHAN_MIN_AGE = timedelta(hours=1)
ORPHAN_MIN_AGE_S = int(ORPHAN_MIN_AGE.total_seconds())


class PruneError(OtelWorkerError):
    """Manifest rows were deleted but some of their objects could not be."""


def tenant_prefixes(prefix: str, tenant: str | None, default_tenant: str) -> list[str]:
    """The key prefixes to list for ``tenant``'s objects (None: everything under ``prefix``).

    A tenant's objects are under ``{prefix}/{tenant}/``; DEFAULT_TENANT's also under
    ``{prefix}/year=`` (stored before tenants). A tenant name has no ``=`` or ``/``, so
    the prefixes of two tenants, and those of the old layout, never overlap.
    """
    root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    if tenant is None:
        return [root]
    prefixes = [f"{root}{tenant}/"]
    if tenant == default_tenant:
        prefixes.append(f"{root}year=")
    return prefixes


@dataclass
class PruneResult:
    rows: int = 0  # manifest rows deleted (or, in a dry run, to delete)
    objects: int = 0  # their objects deleted
    bytes: int = 0  # their stored bytes
    orphans: int = 0  # orphan objects deleted (or found, in a dry run)
    cutoff: datetime | None = None  # rows stored before this went
    # Objects past the cut that a destination has not taken (a pending, processing or dead
    # delivery): kept, in all and per destination; with force, deleted and counted lost.
    kept: int = 0
    kept_for: dict[str, int] = field(default_factory=dict)
    lost_for: dict[str, int] = field(default_factory=dict)
    # Objects past the cut not compacted into the Parquet copy yet (it is in use): kept
    # unless forced, so that no record is missing from the copy.
    kept_uncompacted: int = 0


@runtime_checkable
class CompactionAware(Protocol):
    """What prune asks of the manifest about the Parquet copy (ArchiveIndex)."""

    async def uncompacted(self, before: datetime, tenant: str | None = None) -> int: ...


@runtime_checkable
class DeliveryAware(Protocol):
    """What prune asks of the manifest about forwarding (ArchiveIndex)."""

    async def undelivered(self, before: datetime, tenant: str | None = None) -> Undelivered: ...


async def gc_orphans(
    store: ObjectStore,
    index: KnownKeys,
    *,
    prefix: str,
    older_than: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
    tenant: str | None = None,
    default_tenant: str = "default",
) -> int:
    """Delete objects under ``prefix`` that no manifest row names, older than the age
    (only ``tenant``'s keys, unless None: :func:`tenant_prefixes`). The age is at least
    :data:`ORPHAN_MIN_AGE` (ValueError below it): a younger object without a row may be an
    upload whose row is about to commit, and deleting it would lose acknowledged data."""
    if not older_than >= ORPHAN_MIN_AGE:
        raise ValueError(
            f"the age of an orphan must be at least {ORPHAN_MIN_AGE_S} seconds (an hour):"
            " a younger object may be an upload whose manifest row is still on its way"
        )
    cutoff = (now or datetime.now(UTC)) - older_than
    found = 0
    page: list[str] = []

    async def sweep(keys: list[str]) -> int:
        known = await index.manifest_keys_among(keys)
        orphans = [k for k in keys if k not in known]
        if not dry_run:
            await delete_objects(store, orphans)
        return len(orphans)

    for under in tenant_prefixes(prefix, tenant, default_tenant):
        async for obj in store.list(under):
            if obj.last_modified <= cutoff:
                page.append(obj.key)
            if len(page) >= SWEEP_PAGE:
                found += await sweep(page)
                page = []
    if page:
        found += await sweep(page)
    return found


async def delete_objects(store: ObjectStore, keys: Sequence[str]) -> None:
    """Delete ``keys``, a few at a time; the first failure stops the rest."""
    slots = asyncio.Semaphore(DELETE_CONCURRENCY)

    async def delete(key: str) -> None:
        async with slots:
            await store.delete(key)

    try:
        async with asyncio.TaskGroup() as group:
            for key in keys:
                group.create_task(delete(key))
    except* ObjectStoreError as failed:
        error = failed.exceptions[0]
        raise error from None


async def prune(
    index: ExpiringIndex,
    store: ObjectStore,
    *,
    older_than: timedelta,
    prefix: str,
    dry_run: bool = False,
    now: datetime | None = None,
    chunk_rows: int = CHUNK_ROWS,
    tenant: str | None = None,
    default_tenant: str = "default",
    force: bool = False,
) -> PruneResult:
    """Delete the manifest rows stored before ``now - older_than``, then their objects
    (only ``tenant``'s rows, and orphans among its keys, unless None).

    A row that a forwarding destination has not taken (a pending, processing or dead
    delivery) is kept, and counted in ``kept``/``kept_for``; with ``force`` it goes too,
    its deliveries counted lost per destination (``lost_for``, and in the database's
    ``delivery_losses``: ``otelworker_forward_lost_objects_total``)."""
    now = now or datetime.now(UTC)
    cutoff = now - older_than
    result = PruneResult(cutoff=cutoff)
    orphan_age = max(older_than, ORPHAN_MIN_AGE)
    forced: dict[str, Any] = {"force": True} if force else {}
    if isinstance(index, DeliveryAware):
        undelivered = await index.undelivered(cutoff, tenant)
        if force:
            if dry_run:
                result.lost_for = dict(undelivered.by_destination)
        else:
            result.kept, result.kept_for = undelivered.objects, dict(undelivered.by_destination)
    if not force and isinstance(index, CompactionAware):
        result.kept_uncompacted = await index.uncompacted(cutoff, tenant)
    if dry_run:
        totals = await index.expired_totals(cutoff, tenant, **forced)
        result.rows = result.objects = totals.objects
        result.bytes = totals.bytes
        result.orphans = await gc_orphans(
            store,
            index,
            prefix=prefix,
            older_than=orphan_age,
            dry_run=True,
            now=now,
            tenant=tenant,
            default_tenant=default_tenant,
        )
        return result
    for signal in SIGNALS:
        while True:
            expired = await index.expire(signal, cutoff, chunk_rows, tenant, **forced)  # committed
            if not expired.keys:
                break
            result.rows += len(expired.keys)
            result.bytes += expired.bytes
            for destination, lost in expired.lost.items():
                result.lost_for[destination] = result.lost_for.get(destination, 0) + lost
            try:
                await delete_objects(store, expired.keys)
            except ObjectStoreError as exc:
                log_event(
                    "prune_object_delete_failed",
                    "manifest rows deleted but an object could not be; it is left an orphan",
                    reason=getattr(exc, "reason", None) or type(exc).__name__,
                    level=logging.ERROR,
                    signal=signal,
                    rows=len(expired.keys),
                )
                raise PruneError(
                    f"deleted {result.rows} manifest rows, but not all of their objects"
                    f" ({exc}); the objects left are orphans that a re-run of prune (or"
                    " gc-orphans) removes"
                ) from exc
            result.objects += len(expired.keys)
            log_event(
                "prune_chunk_deleted",
                "manifest rows and their objects deleted",
                level=logging.DEBUG,
                signal=signal,
                rows=len(expired.keys),
                bytes=expired.bytes,
            )
            if len(expired.keys) < chunk_rows:
                break
    result.orphans = await gc_orphans(
        store,
        index,
        prefix=prefix,
        older_than=orphan_age,
        now=now,
        tenant=tenant,
        default_tenant=default_tenant,
    )
    log_event(
        "archive_pruned",
        "manifest rows older than the cut and their objects deleted",
        tenant=tenant,
        rows=result.rows,
        bytes=result.bytes,
        orphans=result.orphans,
        cutoff=cutoff.isoformat(),
        kept_undelivered=result.kept,
        kept_uncompacted=result.kept_uncompacted,
        kept_for=result.kept_for,
        lost_for=result.lost_for,
    )
    if result.lost_for:
        log_event(
            "forward_objects_lost",
            "prune --force deleted objects that destinations had not taken",
            reason="prune_force",
            level=logging.WARNING,
            lost_for=result.lost_for,
        )
    return result


class ParquetIndex(Protocol):
    """What ``prune --parquet`` needs of the manifest (ArchiveIndex)."""

    async def expire_parquet(self, before: datetime, limit: int, tenant: str | None) -> Expired: ...

    async def parquet_expired_totals(self, before: datetime, tenant: str | None) -> Totals: ...


async def prune_parquet(
    index: ParquetIndex,
    store: ObjectStore,
    *,
    older_than: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
    chunk_rows: int = CHUNK_ROWS,
    tenant: str | None = None,
) -> PruneResult:
    """``prune --parquet AGE``: delete the parquet_files rows recorded (compacted) before
    ``now - older_than`` in chunks, each committed before its files are deleted (a crash
    in between leaves orphans that gc-orphans removes, never a row naming a missing file).
    The OTLP objects are not touched: their retention is --older-than's."""
    now = now or datetime.now(UTC)
    cutoff = now - older_than
    result = PruneResult(cutoff=cutoff)
    if dry_run:
        totals = await index.parquet_expired_totals(cutoff, tenant)
        result.rows = result.objects = totals.objects
        result.bytes = totals.bytes
        return result
    while True:
        expired = await index.expire_parquet(cutoff, chunk_rows, tenant)  # committed
        if not expired.keys:
            break
        result.rows += len(expired.keys)
        result.bytes += expired.bytes
        try:
            await delete_objects(store, expired.keys)
        except ObjectStoreError as exc:
            log_event(
                "prune_object_delete_failed",
                "parquet_files rows deleted but a file could not be; it is left an orphan",
                reason=getattr(exc, "reason", None) or type(exc).__name__,
                level=logging.ERROR,
                table="parquet_files",
                rows=len(expired.keys),
            )
            raise PruneError(
                f"deleted {result.rows} parquet_files rows, but not all of their files"
                f" ({exc}); the files left are orphans that gc-orphans removes"
            ) from exc
        result.objects += len(expired.keys)
        if len(expired.keys) < chunk_rows:
            break
    log_event(
        "parquet_pruned",
        "Parquet files compacted before the cut deleted",
        tenant=tenant,
        files=result.rows,
        bytes=result.bytes,
        cutoff=cutoff.isoformat(),
    )
    return result
