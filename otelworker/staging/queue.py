"""The staging queue's port and its asyncpg adapter.

Every database operation on ``ingestion_queue`` and ``export_batches`` is here; the
queries themselves are in ``sql/queries.sql``. Driver errors become
:class:`~otelworker.exceptions.StagingUnavailable`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import asyncpg

from otelworker.exceptions import StagingRefused, StagingUnavailable
from otelworker.staging.database import DATA_ERRORS, DB_ERRORS, forget_connections
from otelworker.staging.sql import query


@dataclass(frozen=True, slots=True)
class Facts:
    """What the flush needs of a payload, taken from the door's one decode.

    ``encoding`` is how the payload is stored (``identity``, ``gzip`` or ``zstd``);
    decompressed, it is the canonical protobuf request of ``raw_bytes`` bytes. ``crc``:
    the CRC-32 of the stored bytes (None for rows staged before migration 0005).
    """

    encoding: str
    raw_bytes: int
    min_ns: int | None
    max_ns: int | None
    services: tuple[str, ...]
    crc: int | None = None


SERVICE_SEPARATOR = "\x1f"
_MAX_NS = (1 << 63) - 1  # bigint; a fixed64 timestamp past it is clamped
REPLACEMENT = "\ufffd"


def storable(text: str) -> str:
    """``text`` as a PostgreSQL ``text`` value can hold it: NUL, which no ``text`` value
    may contain (protobuf and OTLP/JSON allow it), becomes U+FFFD, and so does a lone
    surrogate, which UTF-8 cannot encode (neither decoder at the door lets one through).
    Only what is stored as ``text`` goes through here (service names, errors); a payload
    is ``bytea`` and keeps its bytes."""
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _joined_names(services: Sequence[str]) -> str:
    """A row's service names as stage_many carries them: storable, joined by U+001F (so a
    name holding U+001F has it replaced, else it would be split in two)."""
    return SERVICE_SEPARATOR.join(
        storable(n).replace(SERVICE_SEPARATOR, REPLACEMENT) for n in services
    )


@dataclass(frozen=True, slots=True)
class Claimed:
    """A staged payload claimed by this worker; ``facts`` None for rows staged before the
    door kept them (migration 0003): those are decoded at the flush."""

    id: int
    signal: str
    payload: bytes
    record_count: int
    attempts: int
    facts: Facts | None = None
    tenant: str = "default"

    @classmethod
    def from_row(cls, row: Any) -> Claimed:
        facts = None
        if row["raw_bytes"] is not None:
            facts = Facts(
                row["payload_encoding"],
                row["raw_bytes"],
                row["min_time_ns"],
                row["max_time_ns"],
                tuple(row["service_names"] or ()),
                row["payload_crc"],
            )
        return cls(
            row["id"],
            row["signal"],
            row["payload"],
            row["record_count"],
            row["attempts"],
            facts,
            row["tenant"],
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """One object in the bucket, as indexed in ``export_batches``."""

    batch_id: uuid.UUID
    signal: str
    object_key: str
    item_count: int
    record_count: int
    compressed_bytes: int
    raw_bytes: int
    min_time: datetime | None
    max_time: datetime | None
    service_names: Sequence[str]
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    backoff_initial_ms: int
    backoff_max_ms: int


class QueuePort(Protocol):
    """What the processing pipeline needs of the staging queue."""

    async def claim(
        self,
        limit: int,
        lease_s: float,
        token: uuid.UUID,
        max_bytes: int = 1 << 62,
        held: Sequence[int] = (),
    ) -> list[Claimed]: ...

    async def renew(self, ids: Sequence[int], lease_s: float, token: uuid.UUID) -> None: ...

    async def complete(
        self,
        manifest: Manifest,
        ids: Sequence[int],
        token: uuid.UUID,
        destinations: Sequence[str] = (),
    ) -> int | bool: ...

    async def fail(
        self,
        ids: Sequence[int],
        token: uuid.UUID,
        error: str,
        policy: RetryPolicy,
        *,
        counts: bool = True,
        step: int | None = None,
    ) -> list[tuple[int, str]]: ...

    async def kill(self, ids: Sequence[int], token: uuid.UUID, error: str) -> None: ...

    async def release(self, ids: Sequence[int], token: uuid.UUID) -> None: ...


class BacklogCount(NamedTuple):
    """One count of the queue: the backlog (pending, processing, failed), the snapshot it
    saw, the dead rows, and the age in seconds of the oldest item not yet exported."""

    items: int
    snapshot: str
    dead: int
    oldest_age_s: float
    tenants: dict[str, int] = {}  # a NamedTuple default, never mutated


async def fetch(pool: asyncpg.Pool, name: str, *args: Any) -> list[Any]:
    """The rows of the named query; driver errors become StagingUnavailable."""
    try:
        async with pool.acquire() as conn:
            rows: list[Any] = await conn.fetch(query(name), *args)
            return rows
    except DB_ERRORS as exc:
        await forget_connections(pool, exc)
        raise StagingUnavailable(f"{name}: {type(exc).__name__}") from exc


class PooledQueries:
    """An asyncpg adapter's base: the pool, the default tenant and the named queries run
    on a pooled connection, driver errors turned into StagingUnavailable (the pool's
    connections expired first when the error says the primary is gone)."""

    def __init__(self, pool: asyncpg.Pool, default_tenant: str = "default") -> None:
        self.pool = pool
        # Rows written before tenants (migration 0004) have none: they are this one's.
        self.default_tenant = default_tenant

    async def _fetch(self, name: str, *args: Any) -> list[Any]:
        return await fetch(self.pool, name, *args)

    async def _execute(self, name: str, *args: Any) -> str:
        try:
            async with self.pool.acquire() as conn:
                status: str = await conn.execute(query(name), *args)
                return status
        except DB_ERRORS as exc:
            await forget_connections(self.pool, exc)
            raise StagingUnavailable(f"{name}: {type(exc).__name__}") from exc


class StagingQueue(PooledQueries):
    """The asyncpg adapter of :class:`QueuePort`, plus the ingress and admin operations."""

    # --- ingress ----------------------------------------------------------------
    async def stage_many(
        self,
        signals: list[str],
        payloads: list[bytes],
        record_counts: list[int],
        facts: Sequence[Facts | None] | None = None,
        tenants: Sequence[str] | None = None,
    ) -> int:
        """Insert the rows in one transaction, wake idle pollers once; return the xid.

        One statement outside an explicit transaction block: PostgreSQL commits it before
        it answers, so the group commit costs a single round trip.
        """
        facts = facts or [None] * len(signals)
        encodings = [f.encoding if f else None for f in facts]
        raw = [f.raw_bytes if f else None for f in facts]
        low = [min(f.min_ns, _MAX_NS) if f and f.min_ns is not None else None for f in facts]
        high = [min(f.max_ns, _MAX_NS) if f and f.max_ns is not None else None for f in facts]
        names = [_joined_names(f.services) if f else None for f in facts]
        crcs = [f.crc if f else None for f in facts]
        owners = list(tenants) if tenants is not None else [self.default_tenant] * len(signals)
        try:
            async with self.pool.acquire() as conn:
                xid = await conn.fetchval(
                    query("stage_many"),
                    signals,
                    payloads,
                    record_counts,
                    encodings,
                    raw,
                    low,
                    high,
                    names,
                    owners,
                    crcs,
                    column=1,
                )
        except DATA_ERRORS as exc:
            raise StagingRefused(f"stage: {type(exc).__name__}") from exc
        except DB_ERRORS as exc:
            await forget_connections(self.pool, exc)
            raise StagingUnavailable(f"stage: {type(exc).__name__}") from exc
        return int(xid)

    async def backlog(self) -> BacklogCount:
        """Items staged and not exported, with the snapshot the count saw (and more)."""
        rows = await self._fetch("backlog", self.default_tenant)
        items, snapshot, dead, oldest_age_s, names, counts = rows[0]
        return BacklogCount(
            int(items),
            str(snapshot),
            int(dead),
            float(oldest_age_s),
            dict(zip(names, (int(c) for c in counts), strict=True)),
        )

    # --- processing ----------------------------------------------------------------
    async def claim(
        self,
        limit: int,
        lease_s: float,
        token: uuid.UUID,
        max_bytes: int = 1 << 62,
        held: Sequence[int] = (),
    ) -> list[Claimed]:
        """Up to ``limit`` rows, as many as start within ``max_bytes`` (the first always);
        never one of ``held``, the rows this worker (``token``) holds already."""
        rows = await self._fetch(
            "claim", limit, lease_s, token, max_bytes, self.default_tenant, list(held)
        )
        return sorted((Claimed.from_row(r) for r in rows), key=lambda c: c.id)

    async def renew(self, ids: Sequence[int], lease_s: float, token: uuid.UUID) -> None:
        await self._execute("renew_leases", list(ids), lease_s, token)

    async def complete(
        self,
        manifest: Manifest,
        ids: Sequence[int],
        token: uuid.UUID,
        destinations: Sequence[str] = (),
    ) -> int | bool:
        """Index the object and delete its items in one transaction; its transaction id.

        ``destinations``: the forwarding destinations that want the object; each gets a
        delivery row in the same transaction (and the forwarders a wake-up at commit).

        Returns False, committing nothing, when some rows are no longer ours (their lease
        expired and another worker claimed them): the object is then an orphan.
        """
        try:
            async with self.pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                try:
                    deleted, xid = await conn.fetchrow(query("delete_claimed"), list(ids), token)
                    if deleted != len(ids):
                        await tx.rollback()
                        return False
                    await conn.execute(
                        query("insert_manifest"),
                        manifest.batch_id,
                        manifest.signal,
                        manifest.object_key,
                        manifest.item_count,
                        manifest.record_count,
                        manifest.compressed_bytes,
                        manifest.raw_bytes,
                        manifest.min_time,
                        manifest.max_time,
                        [storable(n) for n in manifest.service_names],
                        manifest.tenant,
                        list(destinations),
                    )
                except BaseException:
                    await tx.rollback()
                    raise
                await tx.commit()
                return int(xid)
        except DATA_ERRORS as exc:
            raise StagingRefused(f"complete: {type(exc).__name__}") from exc
        except DB_ERRORS as exc:
            await forget_connections(self.pool, exc)
            raise StagingUnavailable(f"complete: {type(exc).__name__}") from exc

    async def fail(
        self,
        ids: Sequence[int],
        token: uuid.UUID,
        error: str,
        policy: RetryPolicy,
        *,
        counts: bool = True,
        step: int | None = None,
    ) -> list[tuple[int, str]]:
        """Mark claimed rows failed, for a retry after a backoff with full jitter; their
        ids and new status. ``counts``: the failure is one of the rows' attempts (past
        ``policy.max_attempts`` they are dead; the backoff grows with their attempts); if
        not (an outage), their attempts stay, they never die of it, and the backoff's
        exponent is ``step``."""
        rows = await self._fetch(
            "fail_claimed",
            list(ids),
            token,
            storable(error[:2000]),
            policy.max_attempts,
            float(policy.backoff_initial_ms),
            float(policy.backoff_max_ms),
            counts,
            step or 0,
        )
        return [(r["id"], r["status"]) for r in rows]

    async def kill(self, ids: Sequence[int], token: uuid.UUID, error: str) -> None:
        await self._execute("kill_claimed", list(ids), token, storable(error[:2000]))

    async def release(self, ids: Sequence[int], token: uuid.UUID) -> None:
        """Give back every claim of ``token`` (``ids``, the ones held in memory, included)."""
        await self._execute("release_claimed", token)

    # --- admin ----------------------------------------------------------------------
    async def requeue_dead(self, signal: str | None, limit: int) -> int:
        rows = await self._fetch("requeue_dead", signal, limit)
        return len(rows)

    async def dead_count(self) -> int:
        rows = await self._fetch("dead_count")
        return int(rows[0][0])

    async def manifest_keys_among(self, keys: Sequence[str]) -> set[str]:
        rows = await self._fetch("manifest_keys_among", list(keys))
        return {r[0] for r in rows}
