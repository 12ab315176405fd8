"""The bounded in-memory processing buffer.

An ``asyncio.Queue`` of maxsize PROCESSING_QUEUE_MAX_DEPTH hands claimed items to the
batcher. Capacity counts every payload held in memory, from its claim until its batch's
object is uploaded (or the batch failed or was released), not just the items still
queued, so batches being assembled, compressed or uploaded count against the limit too.
Once its object is uploaded an item holds no payload, only its claim: it frees its room
then, and stays listed (for lease renewal and release) until its index commit is done.
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
        # Uploaded, awaiting the index commit: still claimed, payload no longer held.
        self._settling: set[int] = set()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def depth(self) -> int:
        """Payloads in memory: queued, in an open batch, or being compressed or uploaded."""
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

    def uploaded(self, ids: Iterable[int]) -> None:
        """Their object is stored: the payloads are dropped, the claims remain until done."""
        for item_id in ids:
            if self._held.pop(item_id, None) is not None:
                self._settling.add(item_id)
        if self.room > 0:
            self._room.set()

    def done(self, ids: Iterable[int]) -> None:
        for item_id in ids:
            self._held.pop(item_id, None)
            self._settling.discard(item_id)
        if self.room > 0:
            self._room.set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def held_ids(self) -> list[int]:
        """Every item this worker still has claimed: payload held or awaiting its index."""
        return [*self._held, *self._settling]
