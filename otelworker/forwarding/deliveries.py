"""The ``deliveries`` table's port and its asyncpg adapter.

One row per (destination, archived object): inserted with the object's manifest row (the
exporter's ``complete``) or by ``redeliver``; claimed by a forwarder with ``FOR UPDATE
SKIP LOCKED`` under a lease; marked delivered, pending again (retry) or dead. The queries
are in ``staging/sql/queries.sql`` (``delivery_*``, ``redeliver*``); driver errors become
:class:`~otelworker.exceptions.StagingUnavailable`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from otelworker.staging.queue import PooledQueries, storable

CHANNEL = "otelworker_deliveries"  # NOTIFY payload: destination names, comma-separated
MAX_ERROR_CHARS = 2000  # deliveries.last_error's bound


def bounded(text: str) -> str:
    """An error text as ``last_error`` holds it: storable, at most 2000 characters."""
    text = storable(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One claimed delivery: the object to send and to whom."""

    id: int
    destination: str
    batch_id: uuid.UUID
    object_key: str
    signal: str
    tenant: str
    record_count: int
    raw_bytes: int
    compressed_bytes: int
    attempts: int  # made before this claim
    created_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> Delivery:
        return cls(
            int(row["id"]),
            row["destination"],
            row["batch_id"],
            row["object_key"],
            row["signal"],
            row["tenant"],
            int(row["record_count"]),
            int(row["raw_bytes"]),
            int(row["compressed_bytes"]),
            int(row["attempts"]),
            row["created_at"],
        )


@dataclass(frozen=True, slots=True)
class DestinationStats:
    destination: str
    pending: int
    lag_s: float
    dead: int


class DeliveryPort(Protocol):
    """What the forwarder needs of the deliveries table."""

    async def claim(
        self,
        destination: str,
        limit: int,
        lease_s: float,
        token: uuid.UUID,
        held: Sequence[int] = (),
    ) -> list[Delivery]: ...

    async def renew(self, ids: Sequence[int], lease_s: float, token: uuid.UUID) -> None: ...

    async def delivered(
        self, delivery_id: int, token: uuid.UUID, rejected: int, status: str
    ) -> bool: ...

    async def retry(
        self, delivery_id: int, token: uuid.UUID, delay_s: float, status: str, error: str
    ) -> bool: ...

    async def dead(self, delivery_id: int, token: uuid.UUID, status: str, error: str) -> bool: ...

    async def release(self, token: uuid.UUID) -> None: ...

    async def stats(self) -> list[DestinationStats]: ...

    async def losses(self) -> dict[str, int]: ...


class DeliveryQueue(PooledQueries):
    """The asyncpg adapter of :class:`DeliveryPort`, plus the commands' queries."""

    async def _mark(self, name: str, *args: Any) -> bool:
        """An UPDATE of one row we hold: whether it was still ours to mark."""
        return (await self._execute(name, *args)).endswith(" 1")

    # --- the forwarder -----------------------------------------------------------------
    async def claim(
        self,
        destination: str,
        limit: int,
        lease_s: float,
        token: uuid.UUID,
        held: Sequence[int] = (),
    ) -> list[Delivery]:
        rows = await self._fetch("delivery_claim", destination, limit, lease_s, token, list(held))
        return sorted((Delivery.from_row(r) for r in rows), key=lambda d: d.id)

    async def renew(self, ids: Sequence[int], lease_s: float, token: uuid.UUID) -> None:
        await self._execute("delivery_renew", list(ids), lease_s, token)

    async def delivered(
        self, delivery_id: int, token: uuid.UUID, rejected: int, status: str
    ) -> bool:
        return await self._mark("delivery_delivered", delivery_id, token, rejected, status)

    async def retry(
        self, delivery_id: int, token: uuid.UUID, delay_s: float, status: str, error: str
    ) -> bool:
        return await self._mark(
            "delivery_retry", delivery_id, token, float(delay_s), status, bounded(error)
        )

    async def dead(self, delivery_id: int, token: uuid.UUID, status: str, error: str) -> bool:
        return await self._mark("delivery_dead", delivery_id, token, status, bounded(error))

    async def release(self, token: uuid.UUID) -> None:
        await self._execute("delivery_release", token)

    async def stats(self) -> list[DestinationStats]:
        rows = await self._fetch("delivery_stats")
        return [
            DestinationStats(r["destination"], int(r["pending"]), float(r["lag_s"]), int(r["dead"]))
            for r in rows
        ]

    async def losses(self) -> dict[str, int]:
        return {r["destination"]: int(r["objects"]) for r in await self._fetch("delivery_losses")}

    # --- the commands ------------------------------------------------------------------
    async def summary(self) -> list[Any]:
        return await self._fetch("delivery_summary")

    async def last_errors(self) -> dict[str, Any]:
        return {r["destination"]: r for r in await self._fetch("delivery_last_errors")}

    async def redeliver(
        self, destination: str, batch_ids: Sequence[uuid.UUID], again: bool, dry_run: bool
    ) -> int:
        """Queue ``destination`` for these manifest rows; how many were (would be) queued."""
        if dry_run:
            rows = await self._fetch("redeliver_count", destination, list(batch_ids), again)
        else:
            rows = await self._fetch(
                "redeliver", destination, list(batch_ids), again, self.default_tenant
            )
        return int(rows[0][0])

    async def requeue_dead(self, destination: str, limit: int) -> int:
        rows = await self._fetch("requeue_dead_deliveries", destination, limit)
        return int(rows[0][0])
