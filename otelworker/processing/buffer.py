"""The bounded in-memory processing buffer.

An ``asyncio.Queue`` of maxsize PROCESSING_QUEUE_MAX_DEPTH hands claimed items to the
batcher. Capacity counts every payload held in memory, from its claim until its batch's
object is uploaded (or the batch failed or was released), not just the items still
queued, so batches being assembled, compressed or uploaded count against the limit too.
Once its object is uploaded an item holds no payload, only its claim: it frees its room
then, and stays listed (for lease renewal and release) until its index commit is done.

Room is counted in payload bytes too (PROCESSING_QUEUE_MAX_BYTES): the poller claims only
as many rows as start within the free bytes, the first always (so one payload larger
than the budget still moves); the buffer holds at most the limit plus one payload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from otelworker.staging.queue import Claimed


class Buffer:
    def __init__(self, capacity: int, max_bytes: int = 1 << 62) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
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
        """Items that may be claimed now: none while the bytes are used up."""
        if self.bytes >= self.max_bytes:
            return 0
        return self.capacity - len(self._held)

    @property
    def room_bytes(self) -> int:
        return max(0, self.max_bytes - self.bytes)

    def put(self, item: Claimed) -> bool:
        """Hold a claimed item; False (nothing changes) for an id held already: a claim
        excludes the rows this worker holds, and should one come back all the same, it is
        one item, counted once, never a second copy of its payload or its bytes."""
        if item.id in self._held or item.id in self._settling:
            return False
        if len(self._held) >= self.capacity:
            raise RuntimeError("buffer is full; the poller claims only its free room")
        self._held[item.id] = item
        self.bytes += len(item.payload)
        self._queue.put_nowait(item)
        if self.room <= 0:
            self._room.clear()
        return True

    def _drop(self, item_id: int) -> bool:
        item = self._held.pop(item_id, None)
        if item is None:
            return False
        self.bytes -= len(item.payload)
        return True

    async def get(self) -> Claimed:
        return await self._queue.get()

    def get_nowait(self) -> Claimed:
        return self._queue.get_nowait()

    def queued(self) -> int:
        return self._queue.qsize()

    def uploaded(self, ids: Iterable[int]) -> None:
        """Their object is stored: the payloads are dropped, the claims remain until done."""
        for item_id in ids:
            if self._drop(item_id):
                self._settling.add(item_id)
        if self.room > 0:
            self._room.set()

    def done(self, ids: Iterable[int]) -> None:
        for item_id in ids:
            self._drop(item_id)
            self._settling.discard(item_id)
        if self.room > 0:
            self._room.set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def held_ids(self) -> list[int]:
        """Every item this worker still has claimed: payload held or awaiting its index."""
        return [*self._held, *self._settling]
