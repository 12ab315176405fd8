"""``replay --rate``: a token bucket of records per second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """Holds at most one second's worth of records; a request takes as many tokens as it
    has records. A request larger than the bucket waits for a full bucket and leaves a
    debt that the next ones wait off, so the average never exceeds ``rate``."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._at = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def take(self, n: int) -> None:
        async with self._lock:  # first come, first served
            self._refill()
            need = min(float(n), self.capacity)
            if self._tokens < need:
                await self._sleep((need - self._tokens) / self.rate)
                self._refill()
            self._tokens -= n
