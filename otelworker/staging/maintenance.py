"""Keeping the staging queue small under churn: a VACUUM every QUEUE_VACUUM_INTERVAL_S.

Every acknowledged payload is a row (and its TOAST chunks) that lives for a moment: it is
inserted, claimed, deleted. Autovacuum looks at a database at most once per
``autovacuum_naptime`` (a server setting, 60 s by default), so under a steady load the
table and its TOAST grow by a minute of payloads, or more, before their space is reused;
the dead tuples also slow the claim's scan. The worker, which does the deleting, vacuums
the queue itself, often: a plain VACUUM (not FULL) takes no lock that blocks staging,
claiming or deleting, and on a queue of few live rows it is a few milliseconds. One
process at a time (an advisory lock; others skip their turn), on a connection of its own
that is closed after each run, so the lock can never outlive it (not even when a run is
cancelled at shutdown); rows locked by a claim are skipped (``SKIP_LOCKED``) rather than
waited for.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from otelworker.logs import log_event
from otelworker.metrics import Metrics
from otelworker.staging.database import DB_ERRORS
from otelworker.staging.sql import query


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class QueueVacuum:
    def __init__(
        self, dsn: str, interval_s: float, metrics: Metrics, connect_timeout_s: float = 5.0
    ) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.metrics = metrics
        self.connect_timeout_s = connect_timeout_s

    async def vacuum_once(self) -> bool:
        """One VACUUM, unless another process holds the turn; True if this one ran it."""
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        try:
            if not await conn.fetchval(query("vacuum_lock")):
                return False
            await conn.execute(query("vacuum_queue"))
            return True
        finally:
            # Closing ends the session, and with it the lock (no unlock to forget).
            if _cancelling():
                conn.terminate()
            else:
                await conn.close()

    async def run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval_s)
            started = asyncio.get_running_loop().time()
            try:
                ran = await self.vacuum_once()
            except asyncpg.InsufficientPrivilegeError:
                log_event(
                    "queue_vacuum_disabled",
                    "the database user may not VACUUM ingestion_queue; autovacuum alone"
                    " keeps it (set QUEUE_VACUUM_INTERVAL_S=0 to silence this)",
                    reason="insufficient_privilege",
                    level=logging.WARNING,
                )
                return
            except DB_ERRORS as exc:
                if not failing:
                    log_event(
                        "queue_vacuum_failed",
                        "could not vacuum the staging queue; retrying at the next interval",
                        reason=type(exc).__name__,
                        level=logging.WARNING,
                    )
                failing = True
                continue
            failing = False
            if ran:
                self.metrics.queue_vacuums.inc()
                self.metrics.queue_vacuum_seconds.inc(asyncio.get_running_loop().time() - started)
