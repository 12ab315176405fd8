"""Named, supervised background tasks.

Every long-running task is created here with a name. A task that ends while the service
runs (a crash, or an unexpected return) is logged and makes ``healthy`` false, so the
liveness probe fails and the orchestrator restarts the process. ``CancelledError`` is
never swallowed: cancellation is how tasks are stopped, in the order the owner chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from otelworker.logs import log_event

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s`` seconds; True if it is set. With
    ``asyncio.timeout``, never ``wait_for``: on Python 3.11 ``wait_for`` drops a cancel
    that comes in the same pass of the loop as the event (docs/design.md, Supervision)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


class Supervisor:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.failed: list[str] = []
        self._stopping: set[asyncio.Task[Any]] = set()

    @property
    def healthy(self) -> bool:
        return not self.failed

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task in self._stopping:
            self._stopping.discard(task)
            return
        if task.cancelled():
            reason = "cancelled"
            exc: BaseException | None = None
        else:
            exc = task.exception()
            reason = type(exc).__name__ if exc is not None else "returned"
        self.failed.append(task.get_name())
        log_event(
            "task_died",
            "supervised task ended unexpectedly; liveness now fails",
            reason=reason,
            level=logging.CRITICAL,
            exc_info=exc,
            task=task.get_name(),
        )

    async def cancel(self, task: asyncio.Task[Any], grace_s: float = 10.0) -> None:
        """Stop one task on purpose and wait (bounded) for it to finish."""
        if task.done():
            return
        self._stopping.add(task)
        task.cancel()
        await asyncio.wait({task}, timeout=grace_s)

    async def cancel_all(self, grace_s: float = 10.0) -> None:
        tasks = [t for t in self.tasks if not t.done()]
        for task in tasks:
            self._stopping.add(task)
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
