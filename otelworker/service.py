"""The service: builds components from settings, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import asyncpg

from otelworker.exceptions import ConfigError, StagingUnavailable
from otelworker.forwarding.deliveries import DeliveryQueue
from otelworker.forwarding.destinations import DestinationsFile
from otelworker.forwarding.forwarder import Forwarder
from otelworker.ingress.admission import (
    BacklogTracker,
    InflightBytes,
    OverflowGate,
)
from otelworker.ingress.grpc_server import OtlpGrpc
from otelworker.ingress.intake import Intake
from otelworker.ingress.tenants import Tenants
from otelworker.logs import AggregatedEvents, log_event
from otelworker.metrics import Metrics
from otelworker.processes import CHILD_ENV
from otelworker.processing.pipeline import Pipeline
from otelworker.settings import Role, Settings
from otelworker.sinks.base import ObjectStore
from otelworker.sinks.factory import open_store
from otelworker.staging.database import (
    DB_ERRORS,
    SCOPES,
    SYNCHRONOUS_REPLICA,
    Durability,
    create_pool,
    expire_pool,
    forget_connections,
    log_durability,
    migrate,
    read_durability,
    schema_is_current,
)
from otelworker.staging.group_commit import GroupCommitter
from otelworker.staging.maintenance import QueueVacuum
from otelworker.staging.queue import Facts, StagingQueue
from otelworker.staging.sql import query
from otelworker.supervisor import Supervisor

# How often readiness re-reads the replication settings (a failover may land on a server
# configured otherwise; a change is logged as a new durability_scope event).
DURABILITY_REREAD_S = 30.0


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.supervisor = Supervisor()
        self.events = AggregatedEvents(settings.log_aggregation_window_s)
        # Tokens, tenants and their limits: read at start (a bad file is a ConfigError).
        self.tenants: Tenants | None = None
        self.inflight: InflightBytes | None = (
            InflightBytes(settings.max_inflight_bytes) if settings.max_inflight_bytes else None
        )
        self.pool: asyncpg.Pool | None = None
        self.queue: StagingQueue | None = None
        self.committer: GroupCommitter | None = None
        self.backlog: BacklogTracker | None = None
        self.gate: OverflowGate | None = None
        self.store: ObjectStore | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.embedded: Any = None
        self.dsn: str | None = None
        self.accepting = False
        self.stopping = False
        self.intake = Intake(self)
        self.grpc: OtlpGrpc | None = None
        self._last_ready = False
        # What the database's replication settings say of the 2xx promise (read at start,
        # re-read by readiness now and then: a failover may land on other settings).
        self.durability: Durability | None = None
        self._durability_read_at = 0.0
        # The last reason readiness gave for the database's state, to log changes once.
        self._db_state = "ok"
        self.metrics.ready.set_function(self._ready)
        self.metrics.process_index.set(int(os.environ.get(CHILD_ENV, "0")))

    async def _stage_many(
        self,
        signals: list[str],
        payloads: list[bytes],
        record_counts: list[int],
        facts: list[Facts | None],
        tenants: list[str],
    ) -> int:
        assert self.queue is not None
        xid = await self.queue.stage_many(signals, payloads, record_counts, facts, tenants)
        self.metrics.group_commit_size.observe(len(signals))
        return xid

    def _exported(self, items: int, xid: int | None, tenant: str) -> None:
        if self.backlog is not None:
            self.backlog.add(-items, xid, tenant)

    def _backlog_value(self) -> float:
        return float(self.backlog.value) if self.backlog is not None else 0.0

    def _oldest_age(self) -> float:
        return self.backlog.oldest_age_s if self.backlog is not None else 0.0

    def _dead_items(self) -> float:
        return float(self.backlog.dead) if self.backlog is not None else 0.0

    def _ready(self) -> float:
        ok = self.accepting and not self.stopping and self.supervisor.healthy
        return 1.0 if ok and self._last_ready else 0.0

    def _buffer_depth(self) -> float:
        return float(self.pipeline.buffer.depth) if self.pipeline is not None else 0.0

    async def _resolve_dsn(self) -> str:
        if self.settings.dsn is not None:
            return self.settings.dsn
        try:
            from otelworker.devdb import EmbeddedPostgres
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "DATABASE_URL is not set and no embedded PostgreSQL is available "
                "(install otelworker[embedded] or set DATABASE_URL)"
            ) from exc
        self.embedded = EmbeddedPostgres(self.settings.embedded_db_dir)
        dsn: str = await asyncio.to_thread(self.embedded.attach)
        if self.embedded.started_here:
            log_event(
                "embedded_database_started",
                "DATABASE_URL unset; started a private PostgreSQL",
                reason="database_url_unset",
                data_dir=self.settings.embedded_db_dir,
            )
        else:
            log_event(
                "embedded_database_attached",
                "DATABASE_URL unset; using the private PostgreSQL already running",
                reason="already_running",
                data_dir=self.settings.embedded_db_dir,
            )
        return dsn

    async def release_embedded(self) -> None:
        """Detach from the embedded cluster; the last user out stops it."""
        if self.embedded is None or not self.embedded.attached:
            return
        stopped = await asyncio.to_thread(self.embedded.detach)
        if stopped:
            log_event(
                "embedded_database_stopped",
                "stopped the private PostgreSQL (no other otelworker process uses it)",
                reason="last_user",
                data_dir=self.settings.embedded_db_dir,
            )
        else:
            log_event(
                "embedded_database_left_running",
                "left the private PostgreSQL running: another process uses it, or it "
                "was not started by otelworker",
                reason="in_use_or_not_ours",
                data_dir=self.settings.embedded_db_dir,
            )

    async def start(self) -> None:
        s = self.settings
        if s.runs_ingress:
            self.tenants = Tenants(s)
        # DESTINATIONS_FILE: read at start (a bad file is a ConfigError), re-read on change.
        destinations = None
        if s.runs_forwarder and s.destinations_file is not None:
            destinations = DestinationsFile(s.destinations_file)
        self.dsn = await self._resolve_dsn()
        self.pool = await create_pool(
            self.dsn,
            min_size=s.db_pool_min_size,
            max_size=s.db_pool_max_size,
            connect_timeout_s=s.db_connect_timeout_s,
            startup_timeout_s=s.db_startup_timeout_s,
        )
        await self._prepare_schema()
        self.queue = StagingQueue(self.pool, s.default_tenant)
        self.supervisor.spawn(self.events.run(), "log-aggregator")

        if s.runs_ingress:
            self.committer = GroupCommitter(
                self._stage_many,
                max_items=s.group_commit_max_items,
                max_bytes=s.group_commit_max_bytes,
                timeout_s=s.staging_commit_timeout_s,
                on_unknown=self._commit_outcome_unknown,
            )
            for n in range(s.group_commit_workers):
                self.supervisor.spawn(self.committer.run(), f"group-commit-{n}")
            self.backlog = BacklogTracker(self.queue.backlog, s.backlog_refresh_interval_ms / 1000)
            try:
                await self.backlog.refresh()
            except Exception as exc:
                log_event(
                    "backlog_refresh_failed",
                    "could not count the staging backlog",
                    reason=type(exc).__name__,
                    level=logging.WARNING,
                )
            self.supervisor.spawn(self.backlog.run(), "backlog-refresh")
            self.gate = OverflowGate(
                self.backlog,
                s.staging_max_backlog,
                s.overflow_policy,
                s.overflow_sample_rate,
                s.overflow_sample_seed,
            )
            self.metrics.staging_backlog.set_function(self._backlog_value)
            self.metrics.staging_oldest_age.set_function(self._oldest_age)
            self.metrics.staging_dead.set_function(self._dead_items)
            self.metrics.staging_backlog_limit.set(s.staging_max_backlog)
            if s.grpc_enabled:
                self.grpc = OtlpGrpc(self)
                port = await self.grpc.start(s.host, s.grpc_port)
                log_event(
                    "grpc_listening",
                    "OTLP/gRPC listening",
                    reason="startup",
                    host=s.host,
                    port=port,
                )

        if destinations is not None or s.runs_worker or s.role is Role.COMPACTOR:
            self.store = await open_store(s)
        if destinations is not None:
            assert self.store is not None
            self.forwarder = Forwarder(
                DeliveryQueue(self.pool, s.default_tenant),
                self.store,
                self.metrics,
                destinations=destinations.current,
                lease_s=s.forward_lease_s,
                backoff_max_s=s.forward_backoff_max_s,
                poll_interval_s=s.forward_poll_interval_s,
                cache_bytes=s.forward_cache_bytes,
                events_window_s=s.log_aggregation_window_s,
            )

        if s.runs_worker:
            assert self.store is not None
            self.pipeline = Pipeline(s, self.queue, self.store, self.metrics, self.events)
            self.metrics.buffer_depth.set_function(self._buffer_depth)
            if self.backlog is not None:
                # ROLE=all: this process's own exports leave the backlog figure at once,
                # not only at the next recount (no early shedding while the drain keeps up).
                self.pipeline.exporter.on_completed = self._exported
            if self.forwarder is not None:
                # Deliveries committed with each manifest row; the object handed over.
                exporter = self.pipeline.exporter
                exporter.route = self.forwarder.route
                exporter.on_stored = self.forwarder.offer
                exporter.on_handed = self.forwarder.wake
            self.pipeline.start(self.supervisor, self.dsn)
            if s.queue_vacuum_interval_s > 0 and self.dsn is not None:
                vacuum = QueueVacuum(
                    self.dsn, s.queue_vacuum_interval_s, self.metrics, s.db_connect_timeout_s
                )
                self.supervisor.spawn(vacuum.run(), "queue-vacuum")

        if self.forwarder is not None:
            self.forwarder.start(self.supervisor, self.dsn)

        if s.role is Role.COMPACTOR:
            # The archive's Parquet copy (docs/query.md); pyarrow checked by the settings.
            from otelworker.columnar.compact import CompactLoop, Compactor

            assert self.store is not None
            compactor = Compactor(
                self.pool,
                self.store,
                prefix=s.s3_prefix,
                grace_s=s.compact_grace_s,
                target_bytes=s.compact_target_bytes,
                default_tenant=s.default_tenant,
                metrics=self.metrics,
            )
            loop = CompactLoop(compactor, s.compact_interval_s)
            self.supervisor.spawn(loop.run(), "compactor")

        self.intake.tenants = self.tenants
        self.accepting = True
        self._last_ready = True  # started: the database answered, the schema is current
        log_event(
            "service_started",
            "otelworker started",
            reason="startup",
            role=s.role.value,
            object_store="s3" if s.s3_bucket else "local",
        )

    async def stop(self) -> None:
        """Readiness fails first; in-flight commits finish; the worker drains; the pool closes."""
        self.stopping = True
        self.accepting = False
        grace = self.settings.shutdown_grace_s
        if self.grpc is not None:
            # New RPCs are refused; those in flight finish with their commits.
            await self.grpc.stop(grace)
        if self.committer is not None:
            try:
                async with asyncio.timeout(grace):
                    await self.committer.drain()
            except TimeoutError:
                log_event(
                    "commit_drain_timeout",
                    "group commits still running at shutdown",
                    reason="shutdown_grace",
                    level=logging.WARNING,
                )
        if self.pipeline is not None:
            await self.pipeline.stop(self.supervisor)
        if self.forwarder is not None:
            # After the pipeline's last commits: sends in flight finish within the grace,
            # the rest are given back (pending again) for another forwarder.
            await self.forwarder.stop(self.supervisor, grace)
        await self.supervisor.cancel_all()
        if self.store is not None:
            await self.store.close()
        if self.pool is not None:
            try:
                async with asyncio.timeout(max(grace, 1.0)):
                    await self.pool.close()
            except TimeoutError:
                self.pool.terminate()
        await self.release_embedded()
        log_event("service_stopped", "otelworker stopped", reason="shutdown")

    # --- the database's state: replication, read-only servers -----------------------------

    def _set_durability(self, durability: Durability) -> None:
        previous = self.durability
        self.durability = durability
        self._durability_read_at = time.monotonic()
        for scope in SCOPES:
            self.metrics.durability_scope.labels(scope).set(
                1.0 if scope == durability.scope else 0.0
            )
        if previous is None or previous.scope != durability.scope:
            log_durability(durability)

    async def _prepare_schema(self) -> None:
        """Read the durability scope and migrate. A server that takes no writes (a standby
        reached by mistake, a demoted primary) cannot be migrated: if the schema there is
        current already, start anyway, not ready (readiness says why) and retrying like
        any outage, so that the pod stays up and turns ready when the server does; if it
        is not, retry for DB_STARTUP_TIMEOUT_S and then give up with a clear error."""
        assert self.pool is not None
        deadline = time.monotonic() + self.settings.db_startup_timeout_s
        delay = 0.5
        while True:
            try:
                async with self.pool.acquire() as conn:
                    durability = await read_durability(conn)
                    self._set_durability(durability)
                    if not durability.read_only and not durability.in_recovery:
                        await migrate(conn)
                        return
                    if await schema_is_current(conn):
                        self._note_db_state("read_only")
                        return
                    reason = "read_only_schema_not_current"
            except DB_ERRORS as exc:
                # Also a primary demoted between the check and the migration.
                await forget_connections(self.pool, exc)
                reason = type(exc).__name__
            if time.monotonic() + delay > deadline:
                raise StagingUnavailable(
                    "the database takes no writes (a standby, or a read-only primary) and"
                    " the schema is not migrated: point DATABASE_URL at the primary (a"
                    " multi-host URL with target_session_attrs=read-write finds it)"
                    if reason == "read_only_schema_not_current"
                    else f"cannot migrate the database: {reason}"
                )
            log_event(
                "database_unavailable",
                "cannot migrate the database yet (read-only or unreachable); retrying",
                reason=reason,
                level=logging.WARNING,
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _note_db_state(self, state: str, detail: str = "") -> None:
        """Log the database's state once per change (ok, read_only, sync_replication_wait)."""
        if state == self._db_state:
            return
        previous, self._db_state = self._db_state, state
        if state == "read_only":
            log_event(
                "database_read_only",
                "the database takes no writes (a standby or a demoted primary): not ready,"
                " requests answered 503, retrying",
                reason="in_recovery_or_read_only",
                level=logging.ERROR,
            )
        elif state == "sync_replication_wait":
            log_event(
                "commits_waiting_on_replication",
                "commits wait for a synchronous standby that does not answer: not ready"
                " until they pass (they are committed on the primary)",
                reason="sync_rep_wait",
                level=logging.ERROR,
                detail=detail,
            )
        else:
            log_event(
                "database_recovered",
                "the database takes and acknowledges writes again",
                reason=f"after_{previous}",
            )

    async def _commit_outcome_unknown(self, requests: int) -> None:
        """Count the requests of a timed-out commit: apart when this role's commits are
        waiting for a synchronous standby (each committed locally already)."""
        reason = "commit_timeout"
        if self.pool is not None:
            acquired = False
            try:
                async with asyncio.timeout(1.0):
                    async with self.pool.acquire() as conn:
                        acquired = True
                        row = await conn.fetchrow(query("server_state"))
                if row["sync_rep_waits"] or row["sync_standby_missing"]:
                    reason = "sync_replication_wait"
                    self._note_db_state("sync_replication_wait", "a commit timed out")
            except DB_ERRORS as exc:
                if acquired and isinstance(exc, TimeoutError):
                    # A connection at hand and no answer to a trivial query: the server
                    # went silent (a host crash, a partition); the pool's connections to
                    # it would hang each request they serve. New ones find the primary.
                    await expire_pool(self.pool)
                    log_event(
                        "database_unresponsive",
                        "the database does not answer; the pool's connections are replaced",
                        reason="query_timeout",
                        level=logging.WARNING,
                    )
                else:
                    await forget_connections(self.pool, exc)
        self.metrics.commit_outcome_unknown.labels(reason).inc(requests)

    async def readiness(self) -> tuple[bool, str]:
        ok, reason = await self._readiness()
        self._last_ready = ok
        return ok, reason

    async def _readiness(self) -> tuple[bool, str]:
        if self.stopping or not self.accepting:
            return False, "shutting down" if self.stopping else "starting"
        if not self.supervisor.healthy:
            return False, f"task died: {', '.join(self.supervisor.failed)}"
        if self.grpc is not None and self.grpc.server is None:
            return False, "gRPC server not serving"
        if self.pool is None:
            return False, "no database pool"
        try:
            async with asyncio.timeout(2.0):
                async with self.pool.acquire() as conn:
                    if not await schema_is_current(conn):
                        return False, "schema not current"
                    state = await conn.fetchrow(query("server_state"))
                    if time.monotonic() - self._durability_read_at > DURABILITY_REREAD_S:
                        self._set_durability(await read_durability(conn))
        except DB_ERRORS as exc:
            await forget_connections(self.pool, exc)
            return False, f"database unreachable: {type(exc).__name__}"
        if state["read_only"]:
            self._note_db_state("read_only")
            return False, "database read-only: a standby or a demoted primary"
        if state["sync_rep_waits"] or state["sync_standby_missing"]:
            detail = f"{state['sync_rep_waits']} waiting"
            if state["sync_standby_missing"]:
                detail += "; no synchronous standby in sync"
            self._note_db_state("sync_replication_wait", detail)
            return False, f"commits waiting for a synchronous standby ({detail})"
        committer = self.committer
        slow_s = self.settings.staging_commit_timeout_s / 2
        if committer is not None and committer.oldest_commit_s > slow_s:
            return False, f"a commit in flight for over {slow_s:g} s"
        self._note_db_state("ok")
        durability = self.durability
        if self.settings.require_synchronous_replica and (
            durability is None or durability.scope != SYNCHRONOUS_REPLICA
        ):
            scope = durability.scope if durability is not None else "unknown"
            return False, f"durability scope {scope}: REQUIRE_SYNCHRONOUS_REPLICA is set"
        return True, "ready"
