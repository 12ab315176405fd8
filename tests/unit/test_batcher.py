"""The batcher: per-signal batches, flushed by size or by the flush timer, bounded concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from otelworker.processing.batcher import Batcher
from otelworker.processing.buffer import Buffer
from otelworker.staging.queue import Claimed

HOUR = 3600.0


async def until(predicate: Callable[[], bool], within_s: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` (letting the loop run) until it holds; fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or predicate}")
        await asyncio.sleep(0.001)


async def settle(rounds: int = 50) -> None:
    """Let every ready task run (no I/O involved: the fakes are in-loop)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def item(n: int, signal: str = "traces") -> Claimed:
    return Claimed(id=n, signal=signal, payload=b"", record_count=1, attempts=0)


@dataclass
class FlushRecorder:
    """A flush callable that records batches; optionally blocks until released."""

    block: bool = False
    batches: list[tuple[str, list[int], float]] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    started: int = 0
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    fail_with: BaseException | None = None

    async def __call__(self, signal: str, items: Sequence[Claimed]) -> None:
        self.started += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.block:
                await self.gate.acquire()
            if self.fail_with is not None:
                raise self.fail_with
            self.batches.append((signal, [i.id for i in items], time.monotonic()))
        finally:
            self.running -= 1

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()


@contextlib.asynccontextmanager
async def running(batcher: Batcher) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(batcher.run_timer())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in list(batcher.flushing):
            task.cancel()
        if batcher.flushing:
            await asyncio.wait(set(batcher.flushing))


def make(
    flush: FlushRecorder,
    *,
    capacity: int = 100,
    max_size: int = 3,
    interval_s: float = HOUR,
    concurrency: int = 4,
) -> tuple[Buffer, Batcher]:
    buffer = Buffer(capacity)
    batcher = Batcher(
        buffer, flush, max_size=max_size, flush_interval_s=interval_s, concurrency=concurrency
    )
    return buffer, batcher


async def test_flushes_by_size_and_keeps_the_remainder_open() -> None:
    flush = FlushRecorder()
    buffer, batcher = make(flush, max_size=3, interval_s=HOUR)
    async with running(batcher):
        for n in range(1, 8):
            buffer.put(item(n))
        await until(lambda: len(flush.batches) == 2, what="two full batches")
        await until(lambda: buffer.queued() == 0, what="the buffer to be taken")
        await settle()
        # Exactly BATCH_MAX_SIZE per batch, in claim order; the seventh waits for more
        # items or the timer (an hour away here), and still counts against the buffer.
        assert [ids for _, ids, _ in flush.batches] == [[1, 2, 3], [4, 5, 6]]
        assert len(flush.batches) == 2
        assert buffer.depth == 1
        assert buffer.held_ids() == [7]


async def test_flushes_by_bytes_before_the_item_count() -> None:
    # BATCH_MAX_BYTES: a batch of large payloads goes once its staged bytes reach the cap,
    # however few its items; small ones still fill up to BATCH_MAX_SIZE.
    flush = FlushRecorder()
    buffer = Buffer(100)
    batcher = Batcher(
        buffer, flush, max_size=100, flush_interval_s=HOUR, concurrency=4, max_bytes=3000
    )
    async with running(batcher):
        for n in range(1, 6):
            buffer.put(Claimed(n, "traces", b"x" * 1000, 1, 0))
        await until(lambda: len(flush.batches) == 1, what="a batch full by bytes")
        await until(lambda: buffer.queued() == 0, what="the buffer to be taken")
        await settle()
        assert [ids for _, ids, _ in flush.batches] == [[1, 2, 3]]
        assert buffer.held_ids() == [4, 5]


async def test_batches_are_per_signal() -> None:
    flush = FlushRecorder()
    buffer, batcher = make(flush, max_size=2, interval_s=HOUR)
    async with running(batcher):
        for n, signal in enumerate(["traces", "logs", "metrics", "logs", "traces", "metrics"]):
            buffer.put(item(n, signal))
        await until(lambda: len(flush.batches) == 3, what="one batch per signal")
    assert sorted((s, ids) for s, ids, _ in flush.batches) == [
        ("logs", [1, 3]),
        ("metrics", [2, 5]),
        ("traces", [0, 4]),
    ]


async def test_flush_timer_sends_a_partial_batch_after_the_interval() -> None:
    interval = 0.15
    flush = FlushRecorder()
    buffer, batcher = make(flush, max_size=100, interval_s=interval)
    async with running(batcher):
        put_at = time.monotonic()
        for n in range(1, 4):
            buffer.put(item(n))
        await until(lambda: len(flush.batches) == 1, what="the timer flush")
        signal, ids, flushed_at = flush.batches[0]
    assert (signal, ids) == ("traces", [1, 2, 3])
    # Not before the interval since the batch's first item (the batch opened after the put).
    assert flushed_at - put_at >= interval
    assert buffer.depth == 0


async def test_flush_timer_counts_from_each_batchs_first_item() -> None:
    interval = 0.2
    flush = FlushRecorder()
    buffer, batcher = make(flush, max_size=100, interval_s=interval)
    async with running(batcher):
        first = time.monotonic()
        buffer.put(item(1, "traces"))
        await until(lambda: buffer.queued() == 0)
        await asyncio.sleep(interval / 2)  # a later batch of another signal
        second = time.monotonic()
        buffer.put(item(2, "logs"))
        buffer.put(item(3, "traces"))  # joins the open traces batch; does not restart its clock
        await until(lambda: len(flush.batches) == 2, what="both timer flushes")
    by_signal = {signal: (ids, at) for signal, ids, at in flush.batches}
    assert by_signal["traces"][0] == [1, 3]
    assert by_signal["logs"][0] == [2]
    assert by_signal["traces"][1] - first >= interval
    assert by_signal["logs"][1] - second >= interval
    # The traces batch went first: its clock started first.
    assert [s for s, _, _ in flush.batches] == ["traces", "logs"]


async def test_timer_restarts_for_a_new_batch_after_a_size_flush() -> None:
    interval = 0.1
    flush = FlushRecorder()
    buffer, batcher = make(flush, max_size=2, interval_s=interval)
    async with running(batcher):
        buffer.put(item(1))
        buffer.put(item(2))
        await until(lambda: len(flush.batches) == 1, what="the size flush")
        opened = time.monotonic()
        buffer.put(item(3))
        await until(lambda: len(flush.batches) == 2, what="the timer flush of the next batch")
    assert [ids for _, ids, _ in flush.batches] == [[1, 2], [3]]
    assert flush.batches[1][2] - opened >= interval


async def test_worker_concurrency_bounds_flushes_in_flight() -> None:
    flush = FlushRecorder(block=True)
    buffer, batcher = make(flush, max_size=1, interval_s=HOUR, concurrency=2)
    async with running(batcher):
        for n in range(1, 6):
            buffer.put(item(n))
        await until(lambda: flush.started == 2, what="two flushes to start")
        await settle()
        assert flush.started == 2
        assert flush.running == 2
        # The rest stay in memory and count against the buffer.
        assert buffer.depth == 5

        flush.release()  # one slot frees: exactly one more flush starts
        await until(lambda: flush.started == 3, what="a third flush after a slot frees")
        await settle()
        assert flush.started == 3
        assert flush.running == 2

        flush.release(4)
        await until(lambda: len(flush.batches) == 5, what="every flush")
    assert flush.max_running == 2
    assert sorted(ids[0] for _, ids, _ in flush.batches) == [1, 2, 3, 4, 5]
    assert buffer.depth == 0


async def test_finished_flush_frees_buffer_room() -> None:
    flush = FlushRecorder(block=True)
    buffer, batcher = make(flush, capacity=4, max_size=2, interval_s=HOUR, concurrency=4)
    async with running(batcher):
        for n in range(1, 5):
            buffer.put(item(n))
        await until(lambda: flush.started == 2)
        # Items being uploaded are still in memory: the buffer stays full.
        assert buffer.room == 0
        room = asyncio.create_task(buffer.wait_for_room())
        await settle()
        assert not room.done()
        flush.release()
        await asyncio.wait_for(room, 20)
        await until(lambda: buffer.room == 2)
        flush.release()
        await until(lambda: buffer.room == 4)


async def test_crashing_flush_is_logged_and_frees_its_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    flush = FlushRecorder(fail_with=ValueError("boom"))
    buffer, batcher = make(flush, max_size=1, interval_s=HOUR, concurrency=1)
    async with running(batcher):
        buffer.put(item(1))
        buffer.put(item(2))
        # With one slot, the second flush runs only if the crash released it.
        await until(lambda: flush.started == 2, what="the second flush after a crash")
        await until(lambda: buffer.depth == 0, what="crashed items to leave memory")
        await until(
            lambda: (
                len([r for r in caplog.records if getattr(r, "event", None) == "flush_crashed"])
                == 2
            )
        )
    crashed = [r for r in caplog.records if getattr(r, "event", None) == "flush_crashed"]
    assert {r.reason for r in crashed} == {"ValueError"}
    assert all(r.signal == "traces" and r.items == 1 for r in crashed)


async def test_flush_all_dispatches_queued_and_open_batches() -> None:
    flush = FlushRecorder()
    buffer, batcher = make(flush, max_size=3, interval_s=HOUR)
    run = asyncio.create_task(batcher.run())
    buffer.put(item(1, "traces"))
    buffer.put(item(2, "logs"))
    await until(lambda: buffer.queued() == 0)
    run.cancel()  # shutdown: stop taking items, then flush everything held
    with contextlib.suppress(asyncio.CancelledError):
        await run
    for n in range(3, 8):
        buffer.put(item(n, "traces"))
    await batcher.flush_all()
    while batcher.flushing:
        await asyncio.wait(set(batcher.flushing))
    got = sorted((s, ids) for s, ids, _ in flush.batches)
    assert got == [("logs", [2]), ("traces", [1, 3, 4]), ("traces", [5, 6, 7])]
    assert buffer.depth == 0


async def test_cancelled_flush_keeps_its_items_for_release() -> None:
    # Shutdown past its grace cancels flushes in flight; their items must stay held so
    # the pipeline releases their claims (instead of leaving them to the lease).
    flush = FlushRecorder(block=True)
    buffer, batcher = make(flush, max_size=2, interval_s=HOUR, concurrency=2)
    async with running(batcher):
        for n in range(1, 5):
            buffer.put(item(n))
        await until(lambda: flush.started == 2)
        flush.release()  # the first batch finishes normally
        await until(lambda: len(flush.batches) == 1)
        (in_flight,) = batcher.flushing
        in_flight.cancel()
        await asyncio.wait({in_flight})
    assert sorted(buffer.held_ids()) == [3, 4]
    # ... and the slot came back: a new flush can run.
    flush.block = False
    batcher._open.clear()
    run = asyncio.create_task(batcher.run())
    buffer.done([3, 4])
    buffer.put(item(5))
    buffer.put(item(6))
    await until(lambda: len(flush.batches) == 2)
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run
    assert flush.batches[-1][1] == [5, 6]
