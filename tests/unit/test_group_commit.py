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

from otelworker.exceptions import StagingUnavailable
from otelworker.staging.group_commit import GroupCommitter


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


async def running(committer: GroupCommitter, workers: int = 1) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(committer.run(), name=f"committer-{n}") for n in range(workers)]


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_waiting_entry_is_withdrawn_at_the_timeout_and_never_inserted() -> None:
    store = HeldStore()
    committer = GroupCommitter(
        store.stage_many, max_items=10, max_bytes=1 << 20, timeout_s=0.05, commit_timeout_s=5
    )
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
    store = HeldStore()  # never released
    committer = GroupCommitter(
        store.stage_many, max_items=10, max_bytes=1 << 20, timeout_s=0.05, commit_timeout_s=0.2
    )
    tasks = await running(committer)
    try:
        with pytest.raises(StagingUnavailable, match="did not answer"):
            await committer.stage("logs", b"x", 1)
    finally:
        await stop(tasks)
    assert store.committed == []


async def test_drain_ends_when_only_withdrawn_entries_were_left() -> None:
    store = HeldStore()
    committer = GroupCommitter(
        store.stage_many, max_items=10, max_bytes=1 << 20, timeout_s=0.05, commit_timeout_s=5
    )
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
    store = HeldStore()
    committer = GroupCommitter(
        store.stage_many, max_items=10, max_bytes=1 << 20, timeout_s=0.05, commit_timeout_s=5
    )
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
