"""The asyncpg pool, migrations and readiness checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from otelworker.exceptions import StagingUnavailable
from otelworker.logs import log_event
from otelworker.staging.sql import migrations, query
from otelworker.supervisor import wait_event

# What asyncpg raises when the server is away, restarting, failing over or refusing:
# these turn into StagingUnavailable (503) and never into a 500 or a dead task. A failover
# shows as all of them: a connection reset (OSError, ConnectionDoesNotExistError), a pool
# acquisition or connect that times out (TimeoutError), a protocol state the driver did
# not expect (InternalClientError, e.g. ProtocolError; also TargetServerAttributeNotMatched
# when a multi-host DATABASE_URL with target_session_attrs=read-write finds no primary
# yet), a closed pool or connection (InterfaceError) and a server that refuses a write
# because it is a standby (ReadOnlySQLTransactionError, a PostgresError).
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)
# SQLSTATE classes that say "this server cannot take writes / this session is gone", not
# "this statement is wrong": 08 connection exception, 25006 read-only transaction, 57P
# operator intervention (admin/crash shutdown, cannot connect now), 53 insufficient
# resources, 40001/40P01 are not among them (a retry on the same server is fine).
_LOST_SQLSTATES = ("08", "25006", "57P", "53")
# The errors that the data of a statement causes, not the database's state: SQLSTATE class
# 22 (data exception: a character not in the encoding's repertoire, a value out of range)
# and 23 (a constraint), and a value the driver cannot encode. Retrying the same data can
# never succeed. Subclasses of DB_ERRORS' classes: test for them first.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,
)


def primary_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection's server is gone or no longer the primary (a
    failover, a restart, a demotion): the pool's other idle connections are likely to
    the same dead or read-only server and are better discarded than tried one by one."""
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state.startswith(_LOST_SQLSTATES)
    if isinstance(exc, TimeoutError):  # a slow server or a busy pool: not a lost primary
        return False
    return isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError))


async def expire_pool(pool: Any) -> None:
    """Expire every connection of ``pool`` (see :func:`forget_connections`)."""
    expire = getattr(pool, "expire_connections", None)
    if expire is not None:
        await expire()


async def forget_connections(pool: Any, exc: BaseException) -> None:
    """After an error that says the primary is gone (:func:`primary_lost`), expire the
    pool's connections: each is closed when next released or acquired and replaced by a
    new one, which a multi-host DATABASE_URL with target_session_attrs=read-write opens
    on whichever server is the primary now. Cheap (a flag per connection)."""
    if primary_lost(exc):
        await expire_pool(pool)


# How often a LISTEN connection, otherwise silent, asks its server a trivial question, and
# how long it waits for the answer: a primary gone silent (a host crash or a partition:
# no reset, only silence) would otherwise hold the wake-ups until the kernel's TCP
# timeout, minutes; after a failover the listener must move to the new primary.
LISTEN_CHECK_S = 10.0
LISTEN_CHECK_TIMEOUT_S = 5.0


async def hold_listening(conn: Any) -> None:
    """Return when the LISTEN connection ``conn`` ends: closed by the server or the
    network (its termination listener), or silent to the periodic check (TimeoutError,
    raised). The caller closes it and listens again on a new one."""
    closed = asyncio.Event()
    conn.add_termination_listener(lambda *_: closed.set())
    while not closed.is_set():
        if await wait_event(closed, LISTEN_CHECK_S):
            return
        async with asyncio.timeout(LISTEN_CHECK_TIMEOUT_S):
            await conn.execute(query("listen_check"))


async def listen_forever(
    dsn: str,
    channel: str,
    on_notify: Callable[[str], None],
    on_connected: Callable[[], None],
    *,
    retry_s: float,
    pool: Any = None,
    on_lost: Callable[[str], None] | None = None,
) -> None:
    """LISTEN on ``channel`` on a connection of its own, for ever: ``on_notify`` gets each
    notification's payload; ``on_connected`` runs once listening (to catch up on what was
    sent while not listening). When the connection ends (closed, or silent to
    :func:`hold_listening`'s check) or cannot be opened, it is closed, ``on_lost`` gets the
    reason (``connection_closed`` or the error's class name) and, ``retry_s`` later, a new
    one listens. A server gone silent (TimeoutError on an open connection: a host crash, a
    partition) has ``pool``'s connections to it expired too (:func:`expire_pool`)."""

    def notified(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        on_notify(payload)

    while True:
        conn = None
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            await conn.add_listener(channel, notified)
            on_connected()
            # Until the connection ends, or goes silent (a primary lost in a failover).
            await hold_listening(conn)
            reason = "connection_closed"
        except DB_ERRORS as exc:
            # Also a multi-host DATABASE_URL finding no primary yet in a failover
            # (TargetServerAttributeNotMatched, an InternalClientError).
            reason = type(exc).__name__
            if isinstance(exc, TimeoutError) and conn is not None:
                # The server went silent: the pool's connections to it are as silent.
                await expire_pool(pool)
        finally:
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(*DB_ERRORS):
                    await asyncio.shield(conn.close(timeout=2))
                if not conn.is_closed():
                    conn.terminate()
        if on_lost is not None:
            on_lost(reason)
        await asyncio.sleep(retry_s)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: skip asyncpg's reset query on release.

    asyncpg still rolls back an open transaction and drops listeners on release; its
    default reset query (unlock advisory locks, close cursors, UNLISTEN, RESET ALL) would
    add a round trip to every group commit, and this code never leaves any of that on a
    pooled connection: advisory locks are transaction-scoped, cursors live inside
    transactions, LISTEN runs on a connection of its own and nothing SETs session state.
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    connect_timeout_s: float,
    startup_timeout_s: float,
) -> asyncpg.Pool:
    """Open the pool, retrying with backoff for up to ``startup_timeout_s``."""
    deadline = time.monotonic() + startup_timeout_s
    delay = 0.2
    while True:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout_s,
                command_timeout=max(connect_timeout_s * 6, 30.0),
                max_inactive_connection_lifetime=300.0,
                reset=_keep_session,
            )
            return pool
        except DB_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise StagingUnavailable(
                    f"cannot reach the database (DATABASE_URL): {type(exc).__name__}"
                ) from exc
            log_event(
                "database_unavailable",
                "database not reachable yet, retrying",
                reason=type(exc).__name__,
                level=logging.WARNING,
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def migrate(conn: Any) -> list[int]:
    """Apply pending migrations in one transaction under an advisory lock.

    Several replicas starting at once serialise on the lock; the later ones find the
    migrations applied and do nothing. Returns the versions applied here.
    """
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute(query("migration_lock"))
        await conn.execute(query("create_migrations_table"))
        done = {row[0] for row in await conn.fetch(query("applied_migrations"))}
        for migration in migrations():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(query("record_migration"), migration.version, migration.name)
            applied_now.append(migration.version)
    if applied_now:
        log_event("migrations_applied", "schema migrated", versions=applied_now)
    return applied_now


def latest_version() -> int:
    return migrations()[-1].version


async def schema_is_current(conn: Any) -> bool:
    """The schema is at least this code's: a newer one (a rolling upgrade's first new
    process migrated it) is compatible, since migrations only add tables, columns with
    defaults and indexes; an older one is not."""
    try:
        version = await conn.fetchval(query("schema_version"))
    except asyncpg.UndefinedTableError:
        return False
    return bool(version is not None and version >= latest_version())


# --- durability across a failover ---------------------------------------------------------

SINGLE_NODE = "single_node"
SYNCHRONOUS_REPLICA = "synchronous_replica"
UNKNOWN = "unknown"
SCOPES = (SINGLE_NODE, SYNCHRONOUS_REPLICA, UNKNOWN)


@dataclass(frozen=True, slots=True)
class Durability:
    """Where a 2xx's data is when it is answered: on the primary's disk alone
    (``single_node``: a failover to a standby can lose it), also on a synchronous standby
    (``synchronous_replica``: a failover to that standby keeps it), or not known here."""

    scope: str
    reason: str
    synchronous_commit: str | None = None
    synchronous_standby_names: str | None = None
    in_recovery: bool | None = None
    read_only: bool | None = None
    sync_standbys: int | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "synchronous_commit": self.synchronous_commit,
            "synchronous_standby_names": self.synchronous_standby_names,
            "in_recovery": self.in_recovery,
            "sync_standbys": self.sync_standbys,
        }


def classify_durability(
    synchronous_commit: str | None,
    synchronous_standby_names: str | None,
    *,
    in_recovery: bool = False,
    aurora: bool = False,
    managed: bool = False,
) -> tuple[str, str]:
    """The scope of the 2xx promise from the server's settings, and why.

    A commit waits for a standby only when ``synchronous_standby_names`` names one and
    ``synchronous_commit`` is ``on``, ``remote_apply`` or ``remote_write`` (the last: in
    the standby's memory, not yet on its disk). ``local`` and ``off`` never wait for one
    (``off`` does not even wait for the primary's own disk). Aurora's storage
    acknowledges a commit on a quorum across zones, whatever these settings say; RDS and
    Cloud SQL may replicate below PostgreSQL (Multi-AZ instance, regional disk), which no
    setting shows: unknown unless PostgreSQL's own replication is synchronous."""
    if in_recovery:
        return UNKNOWN, "in_recovery"
    if aurora:
        return SYNCHRONOUS_REPLICA, "aurora_storage_quorum"
    if synchronous_commit is None or synchronous_standby_names is None:
        return UNKNOWN, "settings_unreadable"
    commit = synchronous_commit.strip().lower()
    if commit in ("off", "local"):
        return SINGLE_NODE, f"synchronous_commit_{commit}"
    names = synchronous_standby_names.strip()
    if commit in ("on", "remote_apply", "remote_write"):
        if names:
            return SYNCHRONOUS_REPLICA, f"synchronous_commit_{commit}"
        if managed:
            return UNKNOWN, "managed_replication_not_visible"
        return SINGLE_NODE, "no_synchronous_standby_names"
    return UNKNOWN, f"synchronous_commit_{commit}"


async def read_durability(conn: Any) -> Durability:
    """Read the server's replication settings and classify them; ``unknown`` (with the
    error as reason) if they cannot be read."""
    try:
        row = await conn.fetchrow(query("replication_settings"))
    except DB_ERRORS as exc:
        return Durability(UNKNOWN, f"unreadable: {type(exc).__name__}")
    scope, reason = classify_durability(
        row["synchronous_commit"],
        row["synchronous_standby_names"],
        in_recovery=bool(row["in_recovery"]),
        aurora=bool(row["aurora"]),
        managed=bool(row["managed"]),
    )
    standbys = row["sync_standbys"]
    return Durability(
        scope,
        reason,
        row["synchronous_commit"],
        row["synchronous_standby_names"],
        bool(row["in_recovery"]),
        bool(row["read_only"]),
        int(standbys) if standbys is not None else None,
    )


def log_durability(durability: Durability) -> None:
    """The one start-up event (and one more whenever the scope changes, e.g. a failover
    to a server configured otherwise)."""
    if durability.scope == SYNCHRONOUS_REPLICA:
        message = "a 2xx survives a failover to a synchronous standby"
        level = logging.INFO
    elif durability.scope == SINGLE_NODE:
        message = (
            "a 2xx is on the primary's disk only: a failover to an asynchronous standby"
            " can lose acknowledged data (docs/deploy.md, high availability)"
        )
        level = logging.WARNING
    else:
        message = "cannot tell whether a 2xx survives a failover (check your provider)"
        level = logging.WARNING
    log_event(
        "durability_scope", message, reason=durability.reason, level=level, **durability.fields()
    )
