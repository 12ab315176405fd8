"""The asyncpg pool, migrations and readiness checks."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from otelworker.exceptions import StagingUnavailable
from otelworker.logs import log_event
from otelworker.staging.sql import migrations, query

# What asyncpg raises when the server is away, restarting or refusing: these turn
# into StagingUnavailable (503) and never into a 500.
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)
# The errors that the data of a statement causes, not the database's state: SQLSTATE class
# 22 (data exception: a character not in the encoding's repertoire, a value out of range)
# and 23 (a constraint), and a value the driver cannot encode. Retrying the same data can
# never succeed. Subclasses of DB_ERRORS' classes: test for them first.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,
)


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
