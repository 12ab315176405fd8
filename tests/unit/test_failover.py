"""Issue 24 without a server: the durability scope's classification, and the loops that
a failover's driver errors (asyncpg's InternalClientError and friends) must never end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from otelworker.exceptions import StagingUnavailable
from otelworker.forwarding.deliveries import DeliveryQueue
from otelworker.metrics import Metrics
from otelworker.processing.buffer import Buffer
from otelworker.processing.poller import Poller
from otelworker.staging.database import (
    DB_ERRORS,
    SINGLE_NODE,
    SYNCHRONOUS_REPLICA,
    UNKNOWN,
    classify_durability,
    primary_lost,
)
from otelworker.staging.group_commit import GroupCommitter
from otelworker.staging.queue import StagingQueue

# --- the durability scope ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("commit", "names", "kwargs", "scope", "reason"),
    [
        ("on", "", {}, SINGLE_NODE, "no_synchronous_standby_names"),
        ("on", "  ", {}, SINGLE_NODE, "no_synchronous_standby_names"),
        ("on", "*", {}, SYNCHRONOUS_REPLICA, "synchronous_commit_on"),
        (
            "remote_apply",
            "ANY 1 (a, b)",
            {},
            SYNCHRONOUS_REPLICA,
            "synchronous_commit_remote_apply",
        ),
        ("remote_write", "FIRST 1 (a)", {}, SYNCHRONOUS_REPLICA, "synchronous_commit_remote_write"),
        ("local", "*", {}, SINGLE_NODE, "synchronous_commit_local"),
        ("off", "*", {}, SINGLE_NODE, "synchronous_commit_off"),
        ("OFF", "", {}, SINGLE_NODE, "synchronous_commit_off"),
        ("on", "*", {"in_recovery": True}, UNKNOWN, "in_recovery"),
        ("on", "", {"aurora": True}, SYNCHRONOUS_REPLICA, "aurora_storage_quorum"),
        ("on", "", {"managed": True}, UNKNOWN, "managed_replication_not_visible"),
        ("on", "*", {"managed": True}, SYNCHRONOUS_REPLICA, "synchronous_commit_on"),
        (None, None, {}, UNKNOWN, "settings_unreadable"),
        ("something_new", "*", {}, UNKNOWN, "synchronous_commit_something_new"),
    ],
)
def test_durability_scope_classification(
    commit: str | None, names: str | None, kwargs: dict[str, bool], scope: str, reason: str
) -> None:
    assert classify_durability(commit, names, **kwargs) == (scope, reason)


def test_db_errors_cover_the_driver_errors_of_a_failover() -> None:
    for exc in (
        asyncpg.InternalClientError("unexpected state"),
        asyncpg.exceptions.TargetServerAttributeNotMatched("no primary"),
        asyncpg.exceptions.ProtocolError("bad message"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        asyncpg.ReadOnlySQLTransactionError("read-only"),
        ConnectionResetError(),
        TimeoutError(),
    ):
        assert isinstance(exc, DB_ERRORS), exc


def test_primary_lost_tells_connection_errors_from_statement_errors() -> None:
    assert primary_lost(ConnectionRefusedError())
    assert primary_lost(asyncpg.exceptions.ConnectionDoesNotExistError("gone"))
    assert primary_lost(asyncpg.exceptions.TargetServerAttributeNotMatched("no primary"))
    assert primary_lost(asyncpg.ReadOnlySQLTransactionError("read-only"))
    assert primary_lost(asyncpg.exceptions.AdminShutdownError("shutdown"))
    assert primary_lost(asyncpg.exceptions.CannotConnectNowError("starting"))
    assert not primary_lost(asyncpg.UniqueViolationError("dup"))
    assert not primary_lost(asyncpg.exceptions.SerializationError("retry"))
    assert not primary_lost(TimeoutError())


# --- the adapter: driver errors become StagingUnavailable; the pool forgets the primary ---


class FailingPool:
    """A pool whose every acquire fails with ``exc``; counts expire_connections()."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.expired = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        raise self.exc
        yield  # pragma: no cover

    async def expire_connections(self) -> None:
        self.expired += 1


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.InternalClientError("unexpected state"),
        asyncpg.exceptions.TargetServerAttributeNotMatched("no primary"),
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        asyncpg.InterfaceError("pool is closing"),
        ConnectionRefusedError(),
    ],
)
async def test_every_driver_error_is_staging_unavailable_and_expires_the_pool(
    exc: BaseException,
) -> None:
    pool = FailingPool(exc)
    queue = StagingQueue(pool)  # type: ignore[arg-type]
    with pytest.raises(StagingUnavailable):
        await queue.stage_many(["traces"], [b"x"], [1])
    with pytest.raises(StagingUnavailable):
        await queue.claim(10, 5.0, uuid.uuid4())
    with pytest.raises(StagingUnavailable):
        await queue.release([1], uuid.uuid4())
    with pytest.raises(StagingUnavailable):
        await DeliveryQueue(pool).renew([1], 5.0, uuid.uuid4())  # type: ignore[arg-type]
    assert pool.expired == 4


# --- the loops live on ---------------------------------------------------------------------


async def test_group_commit_survives_internal_client_errors_and_answers_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    pool = FailingPool(asyncpg.InternalClientError("unexpected state"))
    queue = StagingQueue(pool)  # type: ignore[arg-type]
    committer = GroupCommitter(queue.stage_many, max_items=10, max_bytes=1 << 20, timeout_s=2)
    task = asyncio.create_task(committer.run(), name="group-commit-0")
    try:
        for _ in range(3):
            with pytest.raises(StagingUnavailable):
                await committer.stage("traces", b"x", 1)
        assert not task.done()
        # Told as the database being away, not as a bug.
        assert not [r for r in caplog.records if getattr(r, "event", None) == "internal_error"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_poller_claims_through_internal_client_errors() -> None:
    pool = FailingPool(asyncpg.exceptions.TargetServerAttributeNotMatched("no primary"))
    queue = StagingQueue(pool)  # type: ignore[arg-type]
    poller = Poller(
        queue, Buffer(10), Metrics(), token=uuid.uuid4(), lease_s=5.0, poll_interval_s=0.001
    )
    task = asyncio.create_task(poller.run(), name="poller")
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        assert pool.expired >= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_listen_loops_reconnect_through_internal_client_errors(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    attempts = 0

    async def connect(*_: Any, **__: Any) -> Any:
        nonlocal attempts
        attempts += 1
        raise (
            asyncpg.exceptions.TargetServerAttributeNotMatched("no primary")
            if attempts % 2
            else asyncpg.InternalClientError("unexpected state")
        )

    monkeypatch.setattr(asyncpg, "connect", connect)
    poller = Poller(
        StagingQueue(FailingPool(OSError())),  # type: ignore[arg-type]
        Buffer(1),
        Metrics(),
        token=uuid.uuid4(),
        lease_s=5.0,
        poll_interval_s=0.001,
    )
    task = asyncio.create_task(poller.listen("postgresql://a,b/db"), name="poller-listen")
    try:
        await asyncio.sleep(0.2)
        assert not task.done()
        assert attempts >= 4
        lost = [r for r in caplog.records if getattr(r, "event", None) == "listen_lost"]
        assert {r.reason for r in lost} >= {  # type: ignore[attr-defined]
            "TargetServerAttributeNotMatched",
            "InternalClientError",
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_error_around_a_commit_answers_its_requests_and_the_committer_lives_on() -> None:
    async def stage_many(*_: Any) -> int:
        return 1

    committer = GroupCommitter(stage_many, max_items=10, max_bytes=1 << 20, timeout_s=5)

    async def broken(_batch: Any) -> None:
        raise asyncpg.InternalClientError("unexpected state")

    committer._insert = broken  # type: ignore[method-assign]
    task = asyncio.create_task(committer.run(), name="group-commit-0")
    try:
        async with asyncio.timeout(2):  # answered at once, never left waiting
            with pytest.raises(StagingUnavailable, match="InternalClientError"):
                await committer.stage("traces", b"x", 1)
            with pytest.raises(StagingUnavailable):
                await committer.stage("traces", b"y", 1)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class SilentConnection:
    """A LISTEN connection whose server went silent: no termination, no answers."""

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.checks = 0
        self.on_close: list[Any] = []

    def add_termination_listener(self, callback: Any) -> None:
        self.on_close.append(callback)

    async def execute(self, _sql: str) -> str:
        self.checks += 1
        if not self.answers:
            await asyncio.Event().wait()
        return "SELECT 1"


async def test_a_listen_connection_that_stops_answering_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from otelworker.staging import database

    monkeypatch.setattr(database, "LISTEN_CHECK_S", 0.02)
    monkeypatch.setattr(database, "LISTEN_CHECK_TIMEOUT_S", 0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(database.hold_listening(SilentConnection(answers=False)), 2)

    # One that answers is held until the server or the network closes it.
    conn = SilentConnection(answers=True)
    task = asyncio.create_task(database.hold_listening(conn))
    await asyncio.sleep(0.2)
    assert not task.done() and conn.checks >= 3
    conn.on_close[0](conn)
    await asyncio.wait_for(task, 1)


class ListenConnection(SilentConnection):
    """A LISTEN connection that hands every listener one notification at once."""

    def __init__(self, answers: bool) -> None:
        super().__init__(answers)
        self.closed = False

    async def add_listener(self, channel: str, callback: Any) -> None:
        callback(self, 1, channel, "a,b")

    def is_closed(self) -> bool:
        return self.closed

    async def close(self, **_: Any) -> None:
        self.closed = True

    def terminate(self) -> None:
        self.closed = True


class ExpiringPool:
    def __init__(self) -> None:
        self.expired = 0

    async def expire_connections(self) -> None:
        self.expired += 1


async def test_listen_forever_reports_each_loss_and_listens_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one LISTEN loop (poller and forwarder): notifications, a catch-up on each
    connection, each loss's reason, the pool expired when the server went silent."""
    from otelworker.staging import database

    monkeypatch.setattr(database, "LISTEN_CHECK_S", 0.01)
    monkeypatch.setattr(database, "LISTEN_CHECK_TIMEOUT_S", 0.01)
    conns: list[ListenConnection] = []

    async def connect(*_: Any, **__: Any) -> Any:
        if len(conns) % 2:
            conns.append(ListenConnection(answers=True))
            raise asyncpg.InternalClientError("unexpected state")
        conns.append(ListenConnection(answers=False))
        return conns[-1]

    monkeypatch.setattr(asyncpg, "connect", connect)
    payloads: list[str] = []
    lost: list[str] = []
    connected = 0

    def on_connected() -> None:
        nonlocal connected
        connected += 1

    pool = ExpiringPool()
    task = asyncio.create_task(
        database.listen_forever(
            "postgresql://a,b/db",
            "otelworker_test",
            payloads.append,
            on_connected,
            retry_s=0.001,
            pool=pool,
            on_lost=lost.append,
        )
    )
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        assert lost[:4] == ["TimeoutError", "InternalClientError"] * 2
        assert connected >= 2 and payloads[:2] == ["a,b", "a,b"]
        assert pool.expired >= 2  # once per silent connection left
        assert all(c.closed for c in conns[::2][:-1])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
