"""The group committer's timeout: a 503 means "not stored".

An entry that no commit has taken when STAGING_COMMIT_TIMEOUT_S passes is withdrawn and
never inserted; one already in a commit is answered by that commit; a commit that does
not answer within its own timeout fails its requests. A behavioural fake stands in for
the database: it records what each commit inserted and can be held.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from otelworker.exceptions import StagingRefused, StagingUnavailable
from otelworker.staging.group_commit import PENDING, UNSETTLED, GroupCommitter, outcome_of


class HeldStore:
    """stage_many that waits for ``release`` before it "commits"."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.committed: list[list[bytes]] = []

    async def stage_many(
        self,
        signals: list[str],
        payloads: list[bytes],
        counts: list[int],
        facts: list[Any],
        tenants: list[str],
    ) -> int:
        self.started.set()
        await self.release.wait()
        self.committed.append(list(payloads))
        return len(self.committed)


def held(timeout_s: float, commit_timeout_s: float) -> tuple[HeldStore, GroupCommitter]:
    """A committer (10 items, 1 MiB a commit) whose commits wait for ``store.release``."""
    store = HeldStore()
    committer = GroupCommitter(
        store.stage_many,
        max_items=10,
        max_bytes=1 << 20,
        timeout_s=timeout_s,
        commit_timeout_s=commit_timeout_s,
    )
    return store, committer


async def running(committer: GroupCommitter, workers: int = 1) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(committer.run(), name=f"committer-{n}") for n in range(workers)]


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_waiting_entry_is_withdrawn_at_the_timeout_and_never_inserted() -> None:
    store, committer = held(timeout_s=0.05, commit_timeout_s=5)
    tasks = await running(committer)
    try:
        first = asyncio.create_task(committer.stage("traces", b"in-the-commit", 1))
        await store.started.wait()  # the only committer is busy with `first`
        second = asyncio.create_task(committer.stage("traces", b"still-waiting", 1))
        with pytest.raises(StagingUnavailable, match="withdrawn"):
            await second
        assert not first.done()  # past its timeout too, but in a commit: it waits for it
        store.release.set()
        assert await first == 1
        third = await committer.stage("traces", b"after", 1)
        assert third == 2
    finally:
        await stop(tasks)
    assert store.committed == [[b"in-the-commit"], [b"after"]]  # never b"still-waiting"


async def test_a_commit_that_does_not_answer_fails_its_requests() -> None:
    store, committer = held(timeout_s=0.05, commit_timeout_s=0.2)  # never released
    tasks = await running(committer)
    try:
        with pytest.raises(StagingUnavailable, match="did not answer"):
            await committer.stage("logs", b"x", 1)
    finally:
        await stop(tasks)
    assert store.committed == []


async def test_drain_ends_when_only_withdrawn_entries_were_left() -> None:
    store, committer = held(timeout_s=0.05, commit_timeout_s=5)
    tasks = await running(committer)
    try:
        first = asyncio.create_task(committer.stage("traces", b"a", 1))
        await store.started.wait()
        late = [asyncio.create_task(committer.stage("traces", b"late", 1)) for _ in range(3)]
        results = await asyncio.gather(*late, return_exceptions=True)
        assert all(isinstance(r, StagingUnavailable) for r in results)
        store.release.set()
        await first
        await asyncio.wait_for(committer.drain(), 2)
    finally:
        await stop(tasks)
    assert store.committed == [[b"a"]]


async def test_a_cancelled_request_is_still_committed_not_withdrawn() -> None:
    store, committer = held(timeout_s=5, commit_timeout_s=5)
    tasks = await running(committer)
    try:
        first = asyncio.create_task(committer.stage("traces", b"first", 1))
        await store.started.wait()
        gone = asyncio.create_task(committer.stage("traces", b"client-gone", 1))
        await asyncio.sleep(0)  # let it queue its entry
        gone.cancel()  # the client went away: its payload is committed all the same
        store.release.set()
        await first
        await asyncio.wait_for(committer.drain(), 2)
    finally:
        await stop(tasks)
    assert store.committed == [[b"first"], [b"client-gone"]]


class RefusingStore:
    """stage_many that refuses (a data error) any statement holding a payload b"bad"."""

    def __init__(self) -> None:
        self.statements: list[list[bytes]] = []
        self.committed: list[bytes] = []

    async def stage_many(
        self,
        signals: list[str],
        payloads: list[bytes],
        counts: list[int],
        facts: list[Any],
        tenants: list[str],
    ) -> int:
        self.statements.append(list(payloads))
        await asyncio.sleep(0)
        if b"bad" in payloads:
            raise StagingRefused("stage: CharacterNotInRepertoireError")
        self.committed.extend(payloads)
        return len(self.statements)


async def test_a_refused_entry_fails_alone_and_its_commit_mates_are_committed() -> None:
    store = RefusingStore()
    committer = GroupCommitter(store.stage_many, max_items=100, max_bytes=1 << 20, timeout_s=5)
    payloads = [b"a", b"b", b"bad", b"c", b"d", b"e", b"bad", b"f"]
    # Queued before any committer runs: they all share the first statement.
    staged = [asyncio.create_task(committer.stage("traces", p, 1)) for p in payloads]
    await asyncio.sleep(0)
    tasks = await running(committer)
    try:
        outcomes = await asyncio.gather(*staged, return_exceptions=True)
    finally:
        await stop(tasks)
    assert store.statements[0] == payloads
    for payload, outcome in zip(payloads, outcomes, strict=True):
        if payload == b"bad":
            assert isinstance(outcome, StagingRefused)
        else:
            assert isinstance(outcome, int)
    assert sorted(store.committed) == sorted(p for p in payloads if p != b"bad")


async def test_an_unexpected_error_fails_its_commit_503_and_the_committer_lives_on() -> None:
    calls: list[list[bytes]] = []

    async def stage_many(*args: Any) -> int:
        calls.append(list(args[1]))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return 7

    committer = GroupCommitter(stage_many, max_items=10, max_bytes=1 << 20, timeout_s=5)
    tasks = await running(committer)
    try:
        with pytest.raises(StagingUnavailable) as failed:
            await committer.stage("traces", b"first", 1)
        assert not isinstance(failed.value, StagingRefused)
        assert await asyncio.wait_for(committer.stage("traces", b"second", 1), 5) == 7
        assert not any(t.done() for t in tasks)
    finally:
        await stop(tasks)


async def test_a_request_cancelled_while_the_database_is_slow_is_never_503_and_stored() -> None:
    """The server gives up on a request waiting for its commit (hypercorn's graceful
    timeout) while the database is slow. AnswerInFlight answers it by its entry's outcome:
    503 only if the entry is withdrawn, never to be inserted, else the commit's own answer."""
    store, committer = held(timeout_s=0.2, commit_timeout_s=30)
    answers: dict[bytes, Any] = {}

    async def request(payload: bytes) -> None:
        try:
            await committer.stage("traces", payload, 1)
        except asyncio.CancelledError:
            # What AnswerInFlight does where the cancellation lands.
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            entry = PENDING.get()
            assert entry is not None
            answers[payload] = await outcome_of(entry, 0.05)
            raise

    tasks = await running(committer)
    try:
        first = asyncio.create_task(committer.stage("traces", b"in-the-slow-commit", 1))
        await store.started.wait()  # the database is slow: the only committer is held
        waiting = asyncio.create_task(request(b"cancelled-while-waiting"))
        await until_waiting(committer, 1)
        waiting.cancel()  # the server gives up on it
        with pytest.raises(asyncio.CancelledError):
            await waiting
        answer = answers[b"cancelled-while-waiting"]
        assert answer is not UNSETTLED
        assert isinstance(answer, StagingUnavailable)  # so answered 503: it must not be stored
        store.release.set()  # the database recovers
        await first
        await asyncio.wait_for(committer.drain(), 5)
    finally:
        await stop(tasks)
    assert store.committed == [[b"in-the-slow-commit"]]


async def test_a_request_cancelled_in_a_commit_is_answered_by_that_commit() -> None:
    store, committer = held(timeout_s=0.05, commit_timeout_s=30)
    tasks = await running(committer)
    try:
        entries: list[Any] = []

        async def request() -> None:
            try:
                await committer.stage("traces", b"in-the-commit", 1)
            except asyncio.CancelledError:
                entries.append(PENDING.get())
                raise

        requested = asyncio.create_task(request())
        await store.started.wait()
        requested.cancel()
        with pytest.raises(asyncio.CancelledError):
            await requested
        [entry] = entries
        assert entry is not None
        answer = asyncio.create_task(outcome_of(entry, 0.5))
        # Past the bound given: a commit in flight is not withdrawn but awaited further.
        done, _ = await asyncio.wait({answer}, timeout=0.6)
        assert not done and not entry.withdrawn
        store.release.set()
        assert await asyncio.wait_for(answer, 5) == 1  # the commit's xid: answered 200
    finally:
        await stop(tasks)
    assert store.committed == [[b"in-the-commit"]]


async def until_waiting(committer: GroupCommitter, n: int) -> None:
    for _ in range(10_000):
        if committer.waiting >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{n} entries never waited")
