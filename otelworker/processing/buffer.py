"""The bounded in-memory processing buffer.

An ``asyncio.Queue`` of maxsize PROCESSING_QUEUE_MAX_DEPTH hands claimed items to the
batcher. Capacity counts every item held in memory, from its claim until its batch is
finished (uploaded, failed or released), not just the items still queued, so batches
being assembled or uploaded count against the limit too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from otelworker.staging.queue import Claimed


class Buffer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue: asyncio.Queue[Claimed] = asyncio.Queue(maxsize=capacity)
        self._held: dict[int, Claimed] = {}
        self._room = asyncio.Event()
        self._room.set()

    @property
    def depth(self) -> int:
        """Items in memory: queued, in an open batch, or being flushed."""
        return len(self._held)

    @property
    def room(self) -> int:
        return self.capacity - len(self._held)

    def put(self, item: Claimed) -> None:
        if self.room <= 0:
            raise RuntimeError("buffer is full; the poller claims only its free room")
        self._held[item.id] = item
        self._queue.put_nowait(item)
        if self.room <= 0:
            self._room.clear()

    async def get(self) -> Claimed:
        return await self._queue.get()

    def get_nowait(self) -> Claimed:
        return self._queue.get_nowait()

    def queued(self) -> int:
        return self._queue.qsize()

    def done(self, ids: Iterable[int]) -> None:
        for item_id in ids:
            self._held.pop(item_id, None)
        if self.room > 0:
            self._room.set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def held_ids(self) -> list[int]:
        return list(self._held)
