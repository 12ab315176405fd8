"""The buffer's room accounting and the poller: claims only free room, pauses once per pause."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from otelworker.exceptions import StagingUnavailable
from otelworker.logs import AggregatedEvents
from otelworker.metrics import Metrics
from otelworker.processing.buffer import Buffer
from otelworker.processing.poller import Poller
from otelworker.staging.queue import Claimed, Manifest, RetryPolicy

HOUR = 3600.0


async def until(predicate: Callable[[], bool], within_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or predicate}")
        await asyncio.sleep(0.001)


async def settle(rounds: int = 50) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def item(n: int, signal: str = "traces") -> Claimed:
    return Claimed(id=n, signal=signal, payload=b"", record_count=1, attempts=0)


def finish(buffer: Buffer, n: int) -> list[int]:
    """Play the batcher: take ``n`` items out of the queue and finish their batch."""
    ids = [buffer.get_nowait().id for _ in range(n)]
    buffer.done(ids)
    return ids


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


class FakeQueue:
    """A behavioural QueuePort fake: rows are claimed in id order, at most ``limit``."""

    def __init__(self, rows: int = 0) -> None:
        self.pending: list[Claimed] = [item(n) for n in range(1, rows + 1)]
        self.claims: list[tuple[int, int]] = []  # (limit asked, rows returned)
        self.leases: list[float] = []
        self.tokens: set[uuid.UUID] = set()
        self.unavailable = False
        self._next = rows + 1
        self.buffer: Buffer | None = None
        self.over_claims: list[tuple[int, int]] = []
        self.held: list[list[int]] = []  # the ids each claim was told this worker holds
        self.again: list[Claimed] = []  # rows a claim returns although the worker holds them

    def add(self, n: int) -> None:
        for _ in range(n):
            self.pending.append(item(self._next))
            self._next += 1

    async def claim(
        self,
        limit: int,
        lease_s: float,
        token: uuid.UUID,
        max_bytes: int = 1 << 62,
        held: Sequence[int] = (),
    ) -> list[Claimed]:
        self.held.append(list(held))
        if self.again:
            # As the claim did before it excluded held rows: this worker's own rows back.
            return [self.again.pop()]
        if self.buffer is not None and limit > self.buffer.room:
            self.over_claims.append((limit, self.buffer.room))
        if self.unavailable:
            self.claims.append((limit, -1))
            raise StagingUnavailable("claim: ConnectionRefusedError")
        got, self.pending = self.pending[:limit], self.pending[limit:]
        self.claims.append((limit, len(got)))
        self.leases.append(lease_s)
        self.tokens.add(token)
        return got

    async def renew(self, ids: Sequence[int], lease_s: float, token: uuid.UUID) -> None:
        return None

    async def complete(self, manifest: Manifest, ids: Sequence[int], token: uuid.UUID) -> bool:
        return True

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
        return [(i, "failed") for i in ids]

    async def kill(self, ids: Sequence[int], token: uuid.UUID, error: str) -> None:
        return None

    async def release(self, ids: Sequence[int], token: uuid.UUID) -> None:
        return None


@contextlib.asynccontextmanager
async def polling(poller: Poller) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(poller.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make(queue: FakeQueue, capacity: int, interval_s: float = HOUR) -> tuple[Buffer, Poller]:
    buffer = Buffer(capacity)
    queue.buffer = buffer
    poller = Poller(
        queue, buffer, Metrics(), token=uuid.uuid4(), lease_s=7.0, poll_interval_s=interval_s
    )
    return buffer, poller


# --- the buffer ------------------------------------------------------------------------


async def test_buffer_counts_items_until_their_batch_is_done() -> None:
    buffer = Buffer(3)
    assert (buffer.depth, buffer.room) == (0, 3)
    for n in (1, 2, 3):
        buffer.put(item(n))
    assert (buffer.depth, buffer.room, buffer.queued()) == (3, 0, 3)
    with pytest.raises(RuntimeError):
        buffer.put(item(4))

    # Taking an item into a batch does not free room: it is still in memory.
    assert (await buffer.get()).id == 1
    assert buffer.get_nowait().id == 2
    assert (buffer.depth, buffer.room, buffer.queued()) == (3, 0, 1)
    with pytest.raises(RuntimeError):
        buffer.put(item(4))

    buffer.done([1])
    assert (buffer.depth, buffer.room) == (2, 1)
    assert sorted(buffer.held_ids()) == [2, 3]
    buffer.put(item(4))
    assert buffer.room == 0

    buffer.done([2, 3, 4, 99])  # unknown ids are ignored
    assert (buffer.depth, buffer.room) == (0, 3)


async def test_room_is_counted_in_bytes_too() -> None:
    buffer = Buffer(10, max_bytes=1000)
    assert (buffer.room, buffer.room_bytes) == (10, 1000)
    big = Claimed(id=1, signal="logs", payload=bytes(600), record_count=1, attempts=0)
    buffer.put(big)
    assert (buffer.room, buffer.room_bytes, buffer.bytes) == (9, 400, 600)
    bigger = Claimed(id=2, signal="logs", payload=bytes(700), record_count=1, attempts=0)
    buffer.put(bigger)  # started within the budget: held, past it now
    assert (buffer.room, buffer.room_bytes) == (0, 0)
    waiter = asyncio.create_task(buffer.wait_for_room())
    await settle()
    assert not waiter.done()
    buffer.get_nowait()
    buffer.uploaded([1])  # its payload is gone: 700 bytes held
    await asyncio.wait_for(waiter, 20)
    assert (buffer.room, buffer.room_bytes, buffer.bytes) == (9, 300, 700)
    buffer.done([1, 2])
    assert (buffer.room, buffer.bytes) == (10, 0)


async def test_an_id_held_already_is_one_item_its_bytes_counted_once() -> None:
    buffer = Buffer(10, max_bytes=1000)
    row = Claimed(id=1, signal="logs", payload=bytes(600), record_count=1, attempts=0)
    assert buffer.put(row)
    # Claimed again (its lease ran out during a stall): neither a second copy nor its bytes.
    assert not buffer.put(row)
    assert (buffer.depth, buffer.bytes, buffer.queued()) == (1, 600, 1)
    buffer.get_nowait()
    buffer.uploaded([1])
    assert not buffer.put(row)  # awaiting its index commit: still held
    assert (buffer.depth, buffer.bytes, buffer.queued()) == (0, 0, 0)
    buffer.done([1])
    assert (buffer.room, buffer.room_bytes, buffer.held_ids()) == (10, 1000, [])


async def test_claims_exclude_held_rows_and_one_returned_anyway_never_fills_the_buffer() -> None:
    """After a stall past the lease, a claim that returned this worker's own rows added
    their bytes twice and subtracted them once: "full" forever, or QueueFull killed the
    poller. The poller tells the claim what it holds; the buffer counts a row once."""
    queue = FakeQueue(rows=3)
    buffer, poller = make(queue, capacity=3, interval_s=0.01)
    async with polling(poller) as task:
        await until(lambda: buffer.depth == 3, what="three rows held")
        held = [buffer.get_nowait() for _ in range(3)]  # in a batch, being uploaded
        queue.again.extend(held)  # the claim hands back rows the worker holds
        buffer.uploaded([held[0].id])  # room for one: the poller claims again
        await until(lambda: not queue.again, what="the stale claims to be answered")
        await settle()
        assert not task.done()
        assert sorted(buffer.held_ids()) == [1, 2, 3] and buffer.depth == 2
        assert buffer.queued() == 0  # no second copy to flush
        buffer.done([1, 2, 3])
        queue.add(2)
        await until(lambda: buffer.depth == 2, what="the worker to keep claiming")
    assert [1, 2, 3] in [sorted(h) for h in queue.held if h]


async def test_uploaded_items_free_room_but_stay_claimed_until_done() -> None:
    buffer = Buffer(2)
    buffer.put(item(1))
    buffer.put(item(2))
    assert [buffer.get_nowait().id, buffer.get_nowait().id] == [1, 2]  # into a batch
    waiter = asyncio.create_task(buffer.wait_for_room())
    await settle()
    assert not waiter.done()

    # The object holding item 1 is stored: its payload is gone, its claim is not.
    buffer.uploaded([1, 99])  # unknown ids are ignored
    await asyncio.wait_for(waiter, 20)
    assert (buffer.depth, buffer.room) == (1, 1)
    assert sorted(buffer.held_ids()) == [1, 2]  # still renewed, still released at shutdown
    buffer.put(item(3))
    assert buffer.room == 0

    buffer.done([1])  # the index committed
    assert sorted(buffer.held_ids()) == [2, 3]
    assert (buffer.depth, buffer.room) == (2, 0)
    buffer.uploaded([2])
    buffer.done([2, 3])
    assert (buffer.depth, buffer.room, buffer.held_ids()) == (0, 2, [])


async def test_wait_for_room_blocks_while_full_and_wakes_on_done() -> None:
    buffer = Buffer(2)
    await asyncio.wait_for(buffer.wait_for_room(), 20)  # empty: room at once
    buffer.put(item(1))
    buffer.put(item(2))
    waiter = asyncio.create_task(buffer.wait_for_room())
    await settle()
    assert not waiter.done()
    buffer.done([])  # nothing finished: still full
    await settle()
    assert not waiter.done()
    buffer.done([2])
    await asyncio.wait_for(waiter, 20)
    assert buffer.room == 1


# --- the poller ------------------------------------------------------------------------


async def test_poller_claims_only_the_free_room(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    queue = FakeQueue(rows=12)
    buffer, poller = make(queue, capacity=5)
    async with polling(poller):
        await until(lambda: poller.paused, what="the first pause")
        await settle()
        assert queue.claims == [(5, 5)]
        assert buffer.depth == 5
        assert queue.leases == [7.0]

        # Two items finish: the next claim asks for exactly two.
        assert finish(buffer, 2) == [1, 2]
        await until(lambda: len(queue.claims) == 2 and poller.paused, what="the second pause")
        assert queue.claims[1] == (2, 2)
        assert buffer.depth == 5

        # Everything finishes; the remaining five rows fit; the next poll finds nothing
        # left and claims no more than the room.
        finish(buffer, buffer.queued())
        await until(lambda: not queue.pending and buffer.depth == 5)
    assert queue.claims[2] == (5, 5)
    assert queue.over_claims == []
    assert len(queue.tokens) == 1


async def test_pause_is_logged_once_per_pause_with_its_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    queue = FakeQueue(rows=100)
    # A short poll interval: a poller that kept polling while full would log every 10 ms.
    buffer, poller = make(queue, capacity=4, interval_s=0.01)
    started = time.monotonic()
    async with polling(poller):
        await until(lambda: len(events(caplog, "processing_paused")) == 1)
        held = 0.1
        await asyncio.sleep(held)  # the pause lasts at least this long
        assert len(events(caplog, "processing_paused")) == 1
        assert events(caplog, "processing_resumed") == []
        assert len(queue.claims) == 1  # no polling while paused

        finish(buffer, 1)
        await until(lambda: len(events(caplog, "processing_resumed")) == 1)
        upper = time.monotonic() - started
        # Room for one: claimed at once, full again -> a second, separate pause.
        await until(lambda: len(events(caplog, "processing_paused")) == 2)

    paused = events(caplog, "processing_paused")
    resumed = events(caplog, "processing_resumed")
    assert [r.reason for r in paused] == ["buffer_full", "buffer_full"]
    assert paused[0].levelno == logging.WARNING
    assert paused[0].buffer_depth == 4 and paused[0].buffer_capacity == 4
    # The real resume, then (the poller cancelled while paused) the end of the second pause.
    assert [r.reason for r in resumed] == ["buffer_room", "shutdown"]
    assert held - 0.002 <= resumed[0].paused_s <= upper + 0.001
    assert queue.claims[:2] == [(4, 4), (1, 1)]
    # Paused and resumed alternate: never two pauses without a resume between them.
    order = [
        r.event for r in caplog.records if r.event in ("processing_paused", "processing_resumed")
    ]
    assert order == [
        "processing_paused",
        "processing_resumed",
        "processing_paused",
        "processing_resumed",
    ]
    assert poller.metrics.registry.get_sample_value("otelworker_polling_pauses_total") == 2


async def test_pauses_under_steady_backpressure_are_aggregated_metrics_exact(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    queue = FakeQueue(rows=100)
    buffer = Buffer(1)
    queue.buffer = buffer
    clock = [0.0]
    aggregated = AggregatedEvents(60.0, clock=lambda: clock[0])
    poller = Poller(
        queue,
        buffer,
        Metrics(),
        token=uuid.uuid4(),
        lease_s=7.0,
        poll_interval_s=HOUR,
        events=aggregated,
    )
    async with polling(poller):
        for n in range(1, 21):  # each finished item: one pause ends, the next begins
            await until(lambda n=n: len(queue.claims) == n and poller.paused, what=f"pause {n}")
            finish(buffer, 1)
        await until(lambda: len(queue.claims) == 21 and poller.paused)
        # Within one window: the first pause and the first resume are logged, the rest
        # are counted; closing the window logs each pair's count once.
        assert len(events(caplog, "processing_paused")) == 1
        assert len(events(caplog, "processing_resumed")) == 1
        clock[0] = 61.0
        aggregated.flush()
    pauses = poller.metrics.registry.get_sample_value("otelworker_polling_pauses_total")
    assert pauses == 21  # the metric counts every pause
    paused = events(caplog, "processing_paused")
    assert sum(r.count for r in paused) == 21
    resumed = [r for r in events(caplog, "processing_resumed") if r.reason == "buffer_room"]
    assert sum(r.count for r in resumed) == 20
    assert len(paused) == 2 and resumed[0].levelno == logging.INFO


async def test_no_pause_log_while_the_buffer_has_room(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    queue = FakeQueue(rows=3)
    buffer, poller = make(queue, capacity=10, interval_s=0.005)
    async with polling(poller):
        # Many idle polls: the room is never exhausted, so no pause is logged.
        await until(lambda: len(queue.claims) >= 20, what="idle polls")
    assert queue.claims[0] == (10, 3)
    assert all(limit == 7 for limit, _ in queue.claims[1:])
    assert events(caplog, "processing_paused") == []
    assert buffer.depth == 3


async def test_idle_poller_wakes_on_notify() -> None:
    queue = FakeQueue(rows=0)
    buffer, poller = make(queue, capacity=10, interval_s=HOUR)
    async with polling(poller):
        await until(lambda: len(queue.claims) == 1)
        queue.add(2)
        await settle()
        assert len(queue.claims) == 1  # idle for an hour unless woken
        poller.wake.set()
        await until(lambda: buffer.depth == 2, what="the claim after a wake-up")
    assert queue.claims == [(10, 0), (10, 2)]


async def test_once_caught_up_wake_ups_are_coalesced_into_a_claim_per_gap() -> None:
    # Every group commit wakes the poller; once the queue is caught up, the wake-ups
    # within CLAIM_GAP of the last claim become one claim at the gap's end, not one each.
    gap_s = 0.3
    queue = FakeQueue(rows=0)
    buffer, poller = make(queue, capacity=100)
    poller.claim_gap_s = gap_s
    began: list[float] = []
    claim = queue.claim

    async def timed(*args: object, **kwargs: object) -> list[Claimed]:
        began.append(time.monotonic())
        return await claim(*args, **kwargs)  # type: ignore[arg-type]

    queue.claim = timed  # type: ignore[method-assign]
    async with polling(poller):
        await until(lambda: len(queue.claims) == 1)  # the first claim: nothing there
        for _ in range(20):  # twenty commits, each with its wake-up
            queue.add(1)
            poller.wake.set()
            await asyncio.sleep(0)
        await until(lambda: buffer.depth == 20, what="the coalesced claim")
    assert queue.claims[:2] == [(100, 0), (100, 20)]  # one claim for the twenty
    assert began[1] - began[0] >= gap_s


async def test_a_wake_up_and_a_cancel_in_the_same_pass_still_cancel() -> None:
    # asyncio.wait_for on Python 3.11 returns the result of an event set in the same loop
    # pass as the cancel and swallows the CancelledError: the poller would then idle for
    # an hour with its cancellation lost (and a shutdown waiting for it).
    queue = FakeQueue(rows=0)
    _, poller = make(queue, capacity=10)
    task = asyncio.create_task(poller.run())
    await until(lambda: len(queue.claims) == 1)
    poller.wake.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done and task.cancelled()


async def test_a_full_claim_is_followed_at_once_whatever_the_gap() -> None:
    # A backlog (claims that fill the room) is drained as fast as room frees: the gap
    # applies only once the queue is caught up.
    queue = FakeQueue(rows=30)
    buffer, poller = make(queue, capacity=10)
    poller.claim_gap_s = HOUR
    async with polling(poller):
        for done in (10, 20, 30):
            await until(lambda d=done: sum(n for _, n in queue.claims) == d)
            finish(buffer, 10)
        await until(lambda: len(queue.claims) == 4, what="the short claim at the end")
    assert queue.claims == [(10, 10), (10, 10), (10, 10), (10, 0)]


async def test_idle_poller_polls_every_interval() -> None:
    queue = FakeQueue(rows=0)
    buffer, poller = make(queue, capacity=10, interval_s=0.02)
    async with polling(poller):
        await until(lambda: len(queue.claims) >= 1)
        queue.add(3)
        await until(lambda: buffer.depth == 3, what="the next interval's claim")


async def test_claim_failure_is_logged_and_polling_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    queue = FakeQueue(rows=2)
    queue.unavailable = True
    buffer, poller = make(queue, capacity=10, interval_s=0.01)
    async with polling(poller):
        await until(lambda: len(events(caplog, "claim_failed")) >= 2)
        assert buffer.depth == 0
        queue.unavailable = False
        await until(lambda: buffer.depth == 2, what="claims after the database is back")
    failed = events(caplog, "claim_failed")
    assert failed[0].reason == "ConnectionRefusedError"
