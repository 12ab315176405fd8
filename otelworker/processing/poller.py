"""The poller: claims available rows into the buffer's free room; pauses while it is full."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from otelworker.exceptions import StagingUnavailable
from otelworker.logs import AggregatedEvents
from otelworker.metrics import Metrics
from otelworker.processing.buffer import Buffer
from otelworker.staging.database import listen_forever
from otelworker.staging.queue import QueuePort
from otelworker.supervisor import wait_event

CHANNEL = "otelworker_staged"


class Poller:
    def __init__(
        self,
        queue: QueuePort,
        buffer: Buffer,
        metrics: Metrics,
        *,
        token: uuid.UUID,
        lease_s: float,
        poll_interval_s: float,
        claim_gap_s: float = 0.0,
        events: AggregatedEvents | None = None,
    ) -> None:
        self.queue = queue
        # Under steady backpressure a pause and its end come once per finished batch:
        # aggregated like the per-request events (the metrics keep the exact counts).
        self.events = events or AggregatedEvents(0)
        self.buffer = buffer
        self.metrics = metrics
        self.token = token
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        # Once the queue is caught up (a claim found fewer rows than the buffer's room),
        # the next claim waits for a wake-up and for this long after the last one began:
        # every group commit wakes the poller, and a claim per commit costs a statement
        # (and its commit) for a handful of rows that the next batch would not flush
        # before its size or its timer anyway (docs/design.md, "Claims").
        self.claim_gap_s = claim_gap_s
        self.wake = asyncio.Event()
        self.paused = False

    async def _pause_until_room(self) -> None:
        self.paused = True
        started = time.monotonic()
        self.metrics.pauses.inc()
        self.events.emit(
            "processing_paused",
            "buffer_full",
            "processing buffer full; polling paused",
            buffer_depth=self.buffer.depth,
            buffer_capacity=self.buffer.capacity,
        )
        reason = "shutdown"  # cancelled while paused: the pause ends, polling does not resume
        try:
            await self.buffer.wait_for_room()
            reason = "buffer_room"
        finally:
            paused_s = time.monotonic() - started
            self.paused = False
            self.metrics.paused_seconds.inc(paused_s)
            self.events.emit(
                "processing_resumed",
                reason,
                "processing buffer has room; polling resumed"
                if reason == "buffer_room"
                else "polling stopped while paused",
                level=logging.INFO,
                paused_s=round(paused_s, 3),
                buffer_depth=self.buffer.depth,
            )

    async def _idle(self, within_s: float | None = None) -> None:
        await wait_event(self.wake, within_s or self.poll_interval_s)
        self.wake.clear()

    async def run(self) -> None:
        failures = 0
        caught_up_at: float | None = None  # when the last short claim began
        while True:
            if self.buffer.room <= 0:
                await self._pause_until_room()
            if caught_up_at is not None:
                gap = caught_up_at + self.claim_gap_s - time.monotonic()
                if gap > 0:
                    await asyncio.sleep(gap)
                caught_up_at = None
            room = self.buffer.room
            began = time.monotonic()
            try:
                claimed = await self.queue.claim(
                    room,
                    self.lease_s,
                    self.token,
                    max_bytes=self.buffer.room_bytes,
                    held=self.buffer.held_ids(),
                )
            except StagingUnavailable as exc:
                # The database away (a failover, a restart, a standby): retried with a
                # backoff, logged aggregated. Every driver error arrives here as
                # StagingUnavailable (DB_ERRORS), never as the poller's end.
                self.events.emit(
                    "claim_failed",
                    str(exc).split(":")[-1].strip(),
                    "could not claim staged items; retrying",
                )
                failures += 1
                await self._idle(min(self.poll_interval_s * 2 ** min(failures, 6), 5.0))
                continue
            failures = 0
            taken: dict[str, int] = {}
            for item in claimed:
                if self.buffer.put(item):
                    taken[item.signal] = taken.get(item.signal, 0) + 1
            for signal, n in taken.items():  # one counter update per signal, not per item
                self.metrics.items_claimed.labels(signal).inc(n)
            self.metrics.buffer_depth.set(self.buffer.depth)
            if len(claimed) < room and self.buffer.room > 0:
                caught_up_at = began
                await self._idle()

    async def listen(self, dsn: str) -> None:
        """Wake the poller on the insert notification (one per group commit)."""

        def on_notify(_payload: str) -> None:
            self.wake.set()

        def on_lost(reason: str) -> None:
            self.events.emit(
                "listen_lost",
                reason,
                "insert notifications lost; reconnecting (polling meanwhile)",
                channel=CHANNEL,
            )

        # On (re)connecting, a wake-up catches up on what was staged while not listening;
        # a server gone silent has the queue's pool expired too.
        await listen_forever(
            dsn,
            CHANNEL,
            on_notify,
            self.wake.set,
            retry_s=self.poll_interval_s,
            pool=getattr(self.queue, "pool", None),
            on_lost=on_lost,
        )
