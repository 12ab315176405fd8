"""A primary and a streaming standby, for the failover tests.

Both from the binaries :class:`otelworker.devdb.EmbeddedPostgres` uses (the pgserver
wheel's, which include ``pg_basebackup``): the primary is an embedded cluster; the standby
is a ``pg_basebackup -R`` copy of it (``standby.signal`` and ``primary_conninfo`` written),
started on a port of its own. ``synchronous=True`` then names it in the primary's
``synchronous_standby_names`` (set after the copy, so the standby does not inherit it:
a promoted standby that kept it would block every commit, waiting for a standby of its
own). :meth:`failover` SIGKILLs the primary and promotes the standby.

The data directories live under ``tempfile.mkdtemp`` (not pytest's basetemp, whose mode
another pytest session may reset to 0700: as root, the servers run as the unprivileged
``pgserver`` user and must reach them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from otelworker.devdb import EmbeddedPostgres
from tests.support.provision import run_async, with_database

DATABASE = "otelworker"


class ReplicaPair:
    def __init__(self, root: Path, *, synchronous: bool) -> None:
        self.root = root
        self.synchronous = synchronous
        self.primary = EmbeddedPostgres(root / "primary")
        self.standby = EmbeddedPostgres(root / "standby")
        self.primary_port = 0
        self.standby_port = 0

    # --- addresses ------------------------------------------------------------------------
    @property
    def primary_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.primary_port}/{DATABASE}"

    @property
    def standby_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.standby_port}/{DATABASE}"

    @property
    def multi_host_dsn(self) -> str:
        """Both servers, the primary first; asyncpg connects to the first that is
        writable (``target_session_attrs=read-write``)."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
            f"/{DATABASE}?target_session_attrs=read-write"
        )

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        admin = self.primary.start()
        self.primary_port = int(admin.rsplit(":", 1)[1].split("/")[0])
        run_async(lambda: _execute(admin, f"CREATE DATABASE {DATABASE}"))
        self._base_backup()
        standby_admin = self.standby.start()
        self.standby_port = int(standby_admin.rsplit(":", 1)[1].split("/")[0])
        run_async(lambda: self._await_streaming(admin))
        if self.synchronous:
            run_async(lambda: self._make_synchronous(admin))

    def _base_backup(self) -> None:
        target = self.standby.data_dir
        target.mkdir(parents=True)
        user = self.standby._user
        if user is not None:
            os.chown(target, user.pw_uid, user.pw_gid)
        target.chmod(0o700)
        self.standby._run(
            [
                self.standby._bin("pg_basebackup"),
                "-D",
                str(target),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary_port),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--checkpoint=fast",
                "-w",
            ],
            "pg_basebackup",
        )
        # The copy holds the primary's pid-less files only; the port is rewritten at start.

    async def _await_streaming(self, admin: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            conn = await asyncpg.connect(admin, timeout=10)
            try:
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                )
            finally:
                await conn.close()
            if n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the standby never streamed from the primary")
            await asyncio.sleep(0.1)

    async def _make_synchronous(self, admin: str) -> None:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            await conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 60
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the standby never became synchronous")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def kill_primary(self) -> None:
        """SIGKILL the primary and its backends (a host crash)."""
        self.primary.kill()

    def promote(self) -> None:
        """Promote the standby and wait until it takes writes.

        By ``pg_promote()`` over SQL, not ``pg_ctl promote -w``: the wheel's pg_ctl was
        seen to die of SIGSEGV now and then while waiting, right after the primary's kill.
        """
        admin = f"postgresql://postgres@127.0.0.1:{self.standby_port}/postgres"

        async def promote() -> None:
            conn = await asyncpg.connect(admin, timeout=10)
            try:
                if not await conn.fetchval("SELECT pg_promote(true, 60)"):
                    raise RuntimeError("the standby did not promote within 60 s")
            finally:
                await conn.close()

        run_async(promote)

    def stop(self) -> None:
        for server in (self.standby, self.primary):
            with contextlib.suppress(Exception):
                server.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(with_database(dsn, "postgres"), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def replica_pair(*, synchronous: bool) -> Iterator[ReplicaPair]:
    """A started primary and standby (synchronous or not), stopped and removed after."""
    pair = ReplicaPair(
        Path(tempfile.mkdtemp(prefix="otelworker-replica-")), synchronous=synchronous
    )
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()
