"""Group commit: concurrent requests share one multi-row insert and one commit.

Each request appends its payload and awaits a future; a few committer tasks take
everything waiting (up to GROUP_COMMIT_MAX_ITEMS / _MAX_BYTES), insert it in one
transaction and resolve the futures after the commit. While one commit is in flight
the next batch gathers, so the batch size follows the load with no added delay.
A failed commit fails every request in it: none of them is acknowledged. A commit the
database refuses for the data of some of its entries (a data error) is retried in halves,
so that only the refused entries fail (as invalid) and the others are committed.

A 503 means "not stored": a request whose entry no committer has taken within
``timeout_s`` is withdrawn (it will never be inserted) and fails at once; one already in
a commit is answered by that commit's outcome, which is bounded by the commit's own
timeout. Only a commit that times out itself leaves the outcome unknown (as a lost
connection would), and its requests are answered 503 too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from otelworker.exceptions import StagingRefused, StagingUnavailable
from otelworker.logs import log_event
from otelworker.staging.queue import Facts

StageMany = Callable[
    [list[str], list[bytes], list[int], list[Facts | None], list[str]], Awaitable[int | None]
]


UNSETTLED: Any = object()


@dataclass(slots=True, eq=False)
class _Entry:
    signal: str
    payload: bytes
    records: int
    done: asyncio.Future[int | None]
    facts: Facts | None = None
    tenant: str = "default"
    taken: bool = False  # in a commit: only the commit's outcome answers it now
    withdrawn: bool = False  # timed out before any commit took it: never inserted
    # The outcome (the xid, or the exception) kept apart from ``done``, which a cancelled
    # request cancels: what answers a request the server cancelled mid-wait (see PENDING).
    outcome: Any = UNSETTLED
    settled: asyncio.Future[None] | None = None

    def settle(self, outcome: Any) -> None:
        self.outcome = outcome
        if self.settled is not None and not self.settled.done():
            self.settled.set_result(None)


# The entry whose commit the current request awaits: set for the wait, left set when the
# wait is cancelled, so that the app's AnswerInFlight can answer a request the server
# cancelled (hypercorn, at the end of its graceful timeout) by its commit's outcome.
PENDING: ContextVar[_Entry | None] = ContextVar("otelworker_pending_commit", default=None)


def _withdraw(entry: _Entry, why: str) -> bool:
    """Withdraw an entry no commit has taken (``_take`` skips it: it is never inserted)
    and settle it as not stored; False if a commit has it, or it is settled already."""
    if entry.taken or entry.outcome is not UNSETTLED:
        return False
    entry.withdrawn = True
    exc = StagingUnavailable(why)
    entry.settle(exc)
    if not entry.done.done():  # cancelled with its request: the outcome is what answers
        entry.done.set_exception(exc)
    return True


async def outcome_of(entry: _Entry, within_s: float) -> Any:
    """The outcome (xid or exception) of the entry of a request the server cancelled,
    waiting at most ``within_s``, and never one that could still change after it: an
    entry no commit has taken by then is withdrawn (its outcome: not stored), and one in
    a commit is waited for up to ``within_s`` more (the commit has its own bound, shorter).
    UNSETTLED only if even that commit never ended."""
    for _ in range(2):
        if entry.outcome is not UNSETTLED:
            break
        if entry.settled is None:
            entry.settled = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(within_s):
                await asyncio.shield(entry.settled)
        except TimeoutError:
            _withdraw(entry, "shutting down: withdrawn before any commit took it")
    return entry.outcome


def _retrieve(future: asyncio.Future[int | None]) -> None:
    # The request may be gone (client disconnect); its outcome is still observed here.
    if not future.cancelled():
        future.exception()


class GroupCommitter:
    def __init__(
        self,
        stage_many: StageMany,
        *,
        max_items: int,
        max_bytes: int,
        timeout_s: float = 10.0,
        commit_timeout_s: float | None = None,
        on_unknown: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._stage_many = stage_many
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.commit_timeout_s = commit_timeout_s if commit_timeout_s is not None else timeout_s
        self._waiting: deque[_Entry] = deque()
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        # When each commit in flight began: a commit that takes long (waiting for a
        # synchronous standby, a failover) fails readiness before it times out.
        self._began: dict[int, float] = {}
        # Called (after the requests are answered) with the number of requests whose
        # commit timed out, to count and explain the unknown outcome.
        self.on_unknown = on_unknown

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def oldest_commit_s(self) -> float:
        """How long the oldest commit in flight has run (0 when none runs)."""
        if not self._began:
            return 0.0
        return time.monotonic() - min(self._began.values())

    async def stage(
        self,
        signal: str,
        payload: bytes,
        records: int,
        facts: Facts | None = None,
        tenant: str = "default",
    ) -> int | None:
        """Return once the payload is committed (with the commit's transaction id, where the
        store gives one); raise StagingUnavailable if it was not."""
        if self._closed:
            raise StagingUnavailable("shutting down")
        loop = asyncio.get_running_loop()
        entry = _Entry(signal, payload, records, loop.create_future(), facts, tenant)
        entry.done.add_done_callback(_retrieve)
        self._waiting.append(entry)
        self._idle.clear()
        self._wake.set()
        # The request's one timeout: a timer, not a cancellation, so the entry's fate is
        # decided here (withdrawn, or left to its commit) and never by a cancelled await.
        timer = loop.call_later(self.timeout_s, self._expire, entry)
        pending = PENDING.set(entry)
        try:
            # A client that goes away (or a server that gives up) cancels only this
            # future: the entry stays queued or in its batch, and its timer stays too, so
            # it is committed if a commit takes it in time and withdrawn if not, exactly as
            # if it had been waited for. No shield, which would cost every request one more
            # pass of the event loop.
            result = await entry.done
        except asyncio.CancelledError:
            raise  # PENDING stays set: the request is answered by the entry's outcome
        except BaseException:
            timer.cancel()
            PENDING.reset(pending)
            raise
        timer.cancel()
        PENDING.reset(pending)
        return result

    @staticmethod
    def _expire(entry: _Entry) -> None:
        # Still waiting (its request waiting or cancelled): withdrawn, never inserted. In
        # a commit: its outcome answers (bounded by the commit's timeout).
        _withdraw(entry, "commit timeout: withdrawn before any commit took it")

    def _take(self) -> list[_Entry]:
        batch: list[_Entry] = []
        size = 0
        waiting = self._waiting
        while waiting and len(batch) < self.max_items:
            if waiting[0].withdrawn:
                waiting.popleft()
                continue
            if batch and size + len(waiting[0].payload) > self.max_bytes:
                break
            entry = waiting.popleft()
            entry.taken = True
            batch.append(entry)
            size += len(entry.payload)
        if not self._waiting:
            self._wake.clear()
        return batch

    async def run(self) -> None:
        """One committer; run several for overlapping commits."""
        while True:
            await self._wake.wait()
            batch = self._take()
            if not batch:
                if not self._waiting and not self._in_flight:
                    self._idle.set()
                continue
            self._in_flight += 1
            try:
                await self._commit(batch)
            except Exception as exc:
                # Never expected (_insert answers every error of the statement): a guard,
                # so that no request taken into this batch waits for an answer forever
                # and the committer lives on (a dead committer failed liveness, issue 24).
                log_event(
                    "internal_error",
                    "unexpected error around a group commit",
                    reason=type(exc).__name__,
                    level=logging.ERROR,
                    exc_info=exc,
                )
                left = [e for e in batch if e.outcome is UNSETTLED]
                self._fail(left, StagingUnavailable(f"commit failed: {type(exc).__name__}"))
            finally:
                self._in_flight -= 1
                if not self._waiting and not self._in_flight:
                    self._idle.set()

    async def _commit(self, batch: list[_Entry]) -> None:
        key = id(batch)
        self._began[key] = time.monotonic()
        try:
            async with asyncio.timeout(self.commit_timeout_s):
                await self._insert(batch)
        except TimeoutError:
            # The outcome is unknown (as with a lost connection): answered 503. Entries
            # already answered (a part committed while the rest was retried) keep theirs.
            # A commit waiting for a synchronous standby is one of these: committed on
            # the primary, not acknowledged by the standby; answered the same way.
            left = [e for e in batch if e.outcome is UNSETTLED]
            self._fail(left, StagingUnavailable("commit timeout: the commit did not answer"))
            if left and self.on_unknown is not None:
                try:
                    await self.on_unknown(len(left))
                except Exception as error:  # counting only: never the committer's end
                    log_event(
                        "internal_error",
                        "could not count an unknown commit outcome",
                        reason=type(error).__name__,
                        level=logging.ERROR,
                        exc_info=error,
                    )
        except asyncio.CancelledError:
            for entry in batch:
                if entry.outcome is not UNSETTLED:
                    continue
                exc = StagingUnavailable("shutting down")
                entry.settle(exc)
                if not entry.done.done():
                    entry.done.set_exception(exc)
            raise
        finally:
            self._began.pop(key, None)

    async def _insert(self, batch: list[_Entry]) -> None:
        """Insert ``batch`` in one statement and answer its entries. If the database refuses
        the data of the statement (StagingRefused: a data error, which retrying the same
        rows can never cure), each half is inserted again on its own, down to the entries
        it refuses alone: only those fail, as invalid; the others are committed. One
        client's payload never fails another's commit. All within the commit's one bound."""
        try:
            xid = await self._stage_many(
                [e.signal for e in batch],
                [e.payload for e in batch],
                [e.records for e in batch],
                [e.facts for e in batch],
                [e.tenant for e in batch],
            )
        except StagingRefused as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                await self._insert(batch[:half])
                await self._insert(batch[half:])
                return
            self._refuse(batch[0], exc)
            return
        except StagingUnavailable as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            # A bug (an error the adapter did not translate): the statement did not
            # complete; its requests are answered 503 and the committer lives on.
            log_event(
                "internal_error",
                "unexpected error in a group commit",
                reason=type(exc).__name__,
                level=logging.ERROR,
                exc_info=exc,
            )
            self._fail(batch, StagingUnavailable(f"commit failed: {type(exc).__name__}"))
            return
        for entry in batch:
            entry.settle(xid)
            if not entry.done.done():
                entry.done.set_result(xid)

    @staticmethod
    def _refuse(entry: _Entry, exc: StagingRefused) -> None:
        log_event(
            "stage_refused",
            "the database refused a payload's data; its request answered as invalid",
            reason=str(exc).split(":")[-1].strip(),
            level=logging.WARNING,
            signal=entry.signal,
            tenant=entry.tenant,
        )
        entry.settle(exc)
        if not entry.done.done():
            entry.done.set_exception(exc)

    @staticmethod
    def _fail(batch: list[_Entry], exc: StagingUnavailable) -> None:
        if not batch:
            return
        log_event(
            "stage_failed",
            "group commit failed; requests answered 503",
            reason=str(exc).split(":")[-1].strip(),
            level=logging.WARNING,
            requests=len(batch),
        )
        for entry in batch:
            entry.settle(exc)
            if not entry.done.done():
                entry.done.set_exception(exc)

    async def drain(self) -> None:
        """Refuse new payloads and wait until every waiting one is committed or failed."""
        self._closed = True
        await self._idle.wait()
