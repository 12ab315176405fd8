"""Admission control: the token bucket and the staging-capacity (overflow) policy.

Both are decided before the expensive work: the rate limit before the body is read,
the saturation check before it is decompressed and decoded.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from otelworker.exceptions import StagingUnavailable
from otelworker.logs import log_event
from otelworker.settings import OverflowPolicy


class TokenBucket:
    """A token bucket with continuous refill, full at start: ``rate`` tokens a second, at
    most ``burst`` of them.

    A take larger than what is left is refused and takes nothing, except when the bucket
    is full: then it passes and the bucket goes into debt, so that a take larger than the
    burst is slowed, never refused forever. ``retry_after(size)`` is the whole number of
    seconds, rounded up, until ``size`` tokens (at most the burst) will be there, plus up
    to one second of jitter so that refused clients do not all come back at once.

    The request limit takes one token per request (:meth:`try_acquire`); the ingest
    bytes limit (:class:`ByteBucket`) one per byte of the decompressed body.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._level = float(burst)
        self._stamp = clock()
        self._rng = rng or random.Random()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self, size: int) -> bool:
        self._refill()
        if size <= self._level or self._level >= self.burst:
            self._level -= size
            return True
        return False

    def try_acquire(self) -> bool:
        return self.try_take(1)

    def retry_after(self, size: int = 1) -> int:
        self._refill()
        need = min(float(size), self.burst) - self._level
        return max(1, math.ceil(max(0.0, need) / self.rate + self._rng.random()))

    @property
    def tokens(self) -> float:
        self._refill()
        return self._level

    def reconfigure(self, rate: float, burst: int) -> None:
        """New rate and capacity (a limits file re-read): the level (or debt) kept, capped."""
        self._refill()
        self.rate = rate
        self.burst = float(burst)
        self._level = min(self._level, self.burst)


class ByteBucket(TokenBucket):
    """Ingest bytes per second with a burst, as Loki and Tempo limit a tenant: a token
    bucket whose tokens are bytes of the decompressed body (:meth:`try_take`)."""


class InflightBytes:
    """Request bytes at the door (read or declared, not yet answered), within a limit.

    A request reserves its declared Content-Length before its body is read (or each
    chunk as it arrives when no length is declared) and releases it when answered; one
    that would pass MAX_INFLIGHT_BYTES is refused with 429 before it is read whole, so
    memory at the door stays bounded whatever the number of connections.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.value = 0

    def reserve(self, size: int, own: int = 0) -> bool:
        """``size`` more bytes for a request that holds ``own`` already. A lone request
        (nothing in flight but its own) always fits: MAX_REQUEST_BODY_BYTES bounds it."""
        if self.value + size > self.limit and self.value > own:
            return False
        self.value += size
        return True

    def release(self, size: int) -> None:
        self.value -= size


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A PostgreSQL snapshot (``pg_current_snapshot()``): which transactions it sees."""

    xmin: int
    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, xid: int) -> bool:
        if xid < self.xmin:
            return True
        return xid < self.xmax and xid not in self.in_progress


# A count: the items, or (items, snapshot text, ...) such as the queue's BacklogCount.
Count = Callable[[], Awaitable[int | tuple[Any, ...]]]


class BacklogTracker:
    """The staged-not-exported item count without a COUNT(*) per request.

    ``value`` is the last counted figure plus the items this process staged that the count
    did not see. A refresh task recounts every ``refresh_interval_s``. Each local commit is
    recorded with its transaction id and compared with the snapshot of the count, so a
    commit that lands while a count runs is counted exactly once, never twice and never
    not at all.

    How far the cap can be overshot: by the requests already past the check and waiting on
    their group commit (at most the concurrent requests less one), plus what other ingress
    replicas stage within one refresh interval.
    """

    def __init__(self, count: Count, refresh_interval_s: float) -> None:
        self._count = count
        self.refresh_interval_s = refresh_interval_s
        self._counted = 0
        self._recent: list[tuple[int | None, int, str | None]] = []  # not in the count
        self._recent_total = 0  # the sum of their items: value is read by every request
        # Per tenant, from counts that carry it (the queue's): counted, and recent local.
        self._counted_by: dict[str, int] = {}
        self._recent_by: dict[str, int] = {}
        self._snapshot: Snapshot | None = None
        self.known = False
        # From counts that carry them (the queue's): dead rows, the oldest item's age.
        self.dead = 0
        self._oldest_age_s = 0.0
        self._counted_at = time.monotonic()

    @property
    def oldest_age_s(self) -> float:
        """Age of the oldest item not yet exported, as of the last count, aged since."""
        if not self._oldest_age_s:
            return 0.0
        return self._oldest_age_s + time.monotonic() - self._counted_at

    @property
    def value(self) -> int:
        return max(0, self._counted + self._recent_total)

    def of(self, tenant: str) -> int:
        """The tenant's share of :attr:`value`."""
        return max(0, self._counted_by.get(tenant, 0) + self._recent_by.get(tenant, 0))

    def add(self, items: int, xid: int | None = None, tenant: str | None = None) -> None:
        """Items this process staged (or, negative, exported) in transaction ``xid``."""
        if xid is not None and self._snapshot is not None and self._snapshot.sees(xid):
            return  # the last count already saw this commit
        self._recent.append((xid, items, tenant))
        self._recent_total += items
        if tenant is not None:
            self._recent_by[tenant] = self._recent_by.get(tenant, 0) + items

    async def refresh(self) -> None:
        before = len(self._recent)
        result = await self._count()
        counted, snapshot = (
            (result[0], Snapshot.parse(result[1])) if isinstance(result, tuple) else (result, None)
        )
        kept: list[tuple[int | None, int, str | None]] = []
        for index, entry in enumerate(self._recent):
            xid = entry[0]
            if xid is not None and snapshot is not None:
                if not snapshot.sees(xid):
                    kept.append(entry)
            elif index >= before:
                # No transaction id to compare: staged while the count ran, maybe not in
                # it; keep it (overcount rather than undercount).
                kept.append(entry)
        self._counted = counted
        self._recent = kept
        self._recent_total = sum(entry[1] for entry in kept)
        recent_by: dict[str, int] = {}
        for _, items, tenant in kept:
            if tenant is not None:
                recent_by[tenant] = recent_by.get(tenant, 0) + items
        self._recent_by = recent_by
        self._counted_by = dict(getattr(result, "tenants", None) or {})
        self._snapshot = snapshot
        self.known = True
        self.dead = int(getattr(result, "dead", 0))
        self._oldest_age_s = float(getattr(result, "oldest_age_s", 0.0))
        self._counted_at = time.monotonic()

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except StagingUnavailable as exc:
                log_event(
                    "backlog_refresh_failed",
                    "could not count the staging backlog",
                    reason=str(exc).split(":")[-1].strip(),
                    level=logging.WARNING,
                )
            await asyncio.sleep(self.refresh_interval_s)


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "queue_full_reject"
    DROP = "queue_full_drop"
    SAMPLE_DROP = "queue_full_sample"


class OverflowGate:
    """Decides what happens to a request when the staging backlog is at its cap."""

    def __init__(
        self,
        backlog: BacklogTracker,
        max_backlog: int,
        policy: OverflowPolicy,
        sample_rate: float,
        seed: int | None = None,
    ) -> None:
        self.backlog = backlog
        self.max_backlog = max_backlog
        self.policy = policy
        self.sample_rate = sample_rate
        self._rng = random.Random(seed)

    @property
    def saturated(self) -> bool:
        return self.backlog.value >= self.max_backlog

    def decide(self, tenant: str | None = None, tenant_max: int | None = None) -> Verdict:
        """The verdict for a request of ``tenant``, whose share is ``tenant_max`` items."""
        if not self.saturated and (
            tenant_max is None
            or tenant_max >= self.max_backlog
            or self.backlog.of(tenant or "") < tenant_max
        ):
            return Verdict.ACCEPT
        if self.policy is OverflowPolicy.REJECT:
            return Verdict.REJECT
        if self.policy is OverflowPolicy.DROP:
            return Verdict.DROP
        if self._rng.random() < self.sample_rate:
            return Verdict.ACCEPT
        return Verdict.SAMPLE_DROP
