"""The batcher: groups buffered items per tenant and signal (a batch never mixes
tenants); flushes by size or by the flush timer.

A batch is flushed when it holds BATCH_MAX_SIZE items or BATCH_MAX_BYTES of staged
payload bytes (whichever comes first: many small requests make one object of a useful
size, a few large ones do not make a huge one), or when BATCH_FLUSH_INTERVAL_MS has
passed since its first item (the flush timer task's job). At most WORKER_CONCURRENCY
flushes run at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from otelworker.logs import log_event
from otelworker.processing.buffer import Buffer
from otelworker.staging.queue import Claimed
from otelworker.supervisor import wait_event

# A flush takes ownership of the batch's list: it may empty it once the payloads are no
# longer needed, so that they are not kept alive until the flush returns.
Flush = Callable[[str, list[Claimed]], Awaitable[None]]


@dataclass
class _Open:
    opened: float
    items: list[Claimed] = field(default_factory=list)
    bytes: int = 0

    def add(self, item: Claimed) -> None:
        self.items.append(item)
        self.bytes += len(item.payload)


class Batcher:
    def __init__(
        self,
        buffer: Buffer,
        flush: Flush,
        *,
        max_size: int,
        flush_interval_s: float,
        concurrency: int,
        max_bytes: int | None = None,
    ) -> None:
        self.buffer = buffer
        self._flush = flush
        self.max_size = max_size
        self.max_bytes = max_bytes if max_bytes is not None else 1 << 62
        self.flush_interval_s = flush_interval_s
        self._slots = asyncio.Semaphore(concurrency)
        self._open: dict[tuple[str, str], _Open] = {}  # by (tenant, signal)
        self._opened = asyncio.Event()
        self.flushing: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Take items from the buffer into open batches; dispatch full ones."""
        while True:
            item = await self.buffer.get()
            key = (item.tenant, item.signal)
            batch = self._open.get(key)
            if batch is None:
                batch = self._open[key] = _Open(time.monotonic())
                self._opened.set()
            batch.add(item)
            if self._full(batch):
                await self._dispatch(key)

    def _full(self, batch: _Open) -> bool:
        return len(batch.items) >= self.max_size or batch.bytes >= self.max_bytes

    async def run_timer(self) -> None:
        """The flush timer: dispatch batches whose first item is BATCH_FLUSH_INTERVAL_MS old."""
        while True:
            if not self._open:
                self._opened.clear()
                await self._opened.wait()
                continue
            now = time.monotonic()
            key, batch = min(self._open.items(), key=lambda kv: kv[1].opened)
            due = batch.opened + self.flush_interval_s
            if due > now:
                self._opened.clear()
                await wait_event(self._opened, due - now)
                continue
            await self._dispatch(key)

    async def _dispatch(self, key: tuple[str, str]) -> None:
        batch = self._open.pop(key, None)
        if batch is None or not batch.items:
            return
        await self._slots.acquire()
        signal = key[1]
        task = asyncio.create_task(self._run_flush(signal, batch.items), name=f"flush-{signal}")
        self.flushing.add(task)
        task.add_done_callback(self.flushing.discard)

    async def _run_flush(self, signal: str, items: list[Claimed]) -> None:
        ids = [item.id for item in items]
        finished = False
        try:
            await self._flush(signal, items)
            finished = True
        except asyncio.CancelledError:
            # Cancelled mid-flush (shutdown past its grace): the items stay held, so the
            # pipeline releases their claims to pending instead of waiting for the lease.
            raise
        except Exception as exc:  # a bug, not an outage: keep the worker alive, rows come back
            finished = True
            log_event(
                "flush_crashed",
                "unexpected error while flushing; items return after their lease",
                reason=type(exc).__name__,
                level=logging.ERROR,
                exc_info=exc,
                signal=signal,
                items=len(ids),
            )
        finally:
            if finished:
                self.buffer.done(ids)
            self._slots.release()

    async def flush_all(self) -> None:
        """Shutdown: move every queued item into batches and dispatch them all."""
        while True:
            try:
                item = self.buffer.get_nowait()
            except asyncio.QueueEmpty:
                break
            key = (item.tenant, item.signal)
            batch = self._open.setdefault(key, _Open(time.monotonic()))
            batch.add(item)
            if self._full(batch):
                await self._dispatch(key)
        for key in list(self._open):
            await self._dispatch(key)
