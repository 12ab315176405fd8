"""The forwarder: every delivery row sent to its destination, durably, one lane per
destination.

Per destination a *lane*: one claimer task (``forward-{name}-claim``) claims due deliveries
(``FOR UPDATE SKIP LOCKED``, a lease) for as many of the lane's ``concurrency`` sender
tasks (``forward-{name}-{i}``) as are free; a sender takes the object's bytes (from
:class:`ObjectCache` when this process exported it, else from the object store), sends it
with the destination's client and marks the row:

- delivered (its rejected records counted, not delivered);
- retry: pending again after ``max(Retry-After, backoff)``, the backoff exponential with
  jitter up to ``FORWARD_BACKOFF_MAX_S``; a retryable failure never makes a delivery dead,
  so a destination down for a day keeps everything (one small row per object);
- permanent refusal, or the object gone from the store: dead, with the status and the
  message, until ``requeue-dead --destination``.

Lanes share nothing across a send: no lock, no connection held (the pool is used for the
claim and the mark only), so a slow or dead destination delays no other, nor the exporter
or the ingress. The claimer is woken by the exporter in this process (:meth:`Forwarder.wake`)
and by ``NOTIFY otelworker_deliveries`` from any other; idle, it polls every
``FORWARD_POLL_INTERVAL_S`` as a safety net only. Every ``FORWARD_LEASE_S / 3`` one task
renews the leases of every delivery this process holds, so a long send (many parts, a slow
destination) keeps its row; a crashed process's rows come back when their lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from otelworker.exceptions import ObjectStoreError, StagingUnavailable
from otelworker.forwarding.deliveries import CHANNEL, Delivery, DeliveryPort, bounded
from otelworker.logs import AggregatedEvents, log_event
from otelworker.metrics import Metrics
from otelworker.sinks.base import ObjectStore
from otelworker.staging.database import listen_forever
from otelworker.supervisor import Supervisor, wait_event

INITIAL_BACKOFF_S = 1.0
RETRY_AFTER_MAX_S = 3600.0  # a Retry-After is honoured up to an hour
RECONCILE_INTERVAL_S = 1.0  # how often DESTINATIONS_FILE's changes are looked for
LISTEN_RETRY_S = 1.0
# Outcomes of an attempt as otelworker_forward_attempts_total counts them.
DELIVERED, RETRY, PERMANENT = "delivered", "retry", "permanent"
OBJECT_MISSING, OBJECT_STORE_ERROR = "object_missing", "object_store_error"


# --- what the forwarder needs of a destination and its client ------------------------------


class DestinationLike(Protocol):
    """A DESTINATIONS_FILE entry (:class:`otelworker.forwarding.destinations.Destination`)."""

    @property
    def name(self) -> str: ...

    @property
    def concurrency(self) -> int: ...

    def wants(self, signal: str, tenant: str) -> bool: ...


class SendResultLike(Protocol):
    """:class:`otelworker.forwarding.client.SendResult`: ``outcome`` is a StrEnum."""

    @property
    def outcome(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def message(self) -> str: ...

    @property
    def retry_after_s(self) -> float | None: ...

    @property
    def records(self) -> int: ...

    @property
    def rejected_records(self) -> int: ...

    @property
    def requests(self) -> int: ...


class ClientLike(Protocol):
    """:class:`otelworker.forwarding.client.DestinationClient`."""

    async def send(
        self,
        signal: str,
        tenant: str,
        body: bytes,
        encoding: str | None,
        raw_bytes: int,
        *,
        records: int | None = None,
    ) -> SendResultLike: ...

    async def close(self) -> None: ...


ClientFactory = Callable[[Any], ClientLike]


def default_client_factory(destination: Any) -> ClientLike:
    from otelworker.forwarding.client import make_client

    client: ClientLike = make_client(destination)
    return client


# --- backoff -------------------------------------------------------------------------------


def backoff_s(attempts: int, cap_s: float, rng: Callable[[], float] = random.random) -> float:
    """The wait after a delivery's failed attempt number ``attempts + 1``: exponential
    (1 s, 2 s, 4 s, ... up to ``cap_s``) with jitter over its upper half, so retries of many
    deliveries spread out and never fall to zero against a destination that is down."""
    base = min(cap_s, INITIAL_BACKOFF_S * 2.0 ** min(attempts, 40))
    return base / 2 + rng() * base / 2


def retry_delay_s(
    attempts: int,
    retry_after_s: float | None,
    cap_s: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """The backoff, or the destination's Retry-After / RetryInfo if longer (up to an hour)."""
    delay = backoff_s(attempts, cap_s, rng)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s, RETRY_AFTER_MAX_S))
    return delay


def object_encoding(key: str) -> str | None:
    """How an archived object is compressed, from its key's extension."""
    if key.endswith(".gz"):
        return "gzip"
    if key.endswith(".zst"):
        return "zstd"
    return None


def object_missing(exc: ObjectStoreError) -> bool:
    """Whether a store's error says the object is not there (not a transient failure)."""
    reason = str(getattr(exc, "reason", "") or "")
    if reason in ("NoSuchKey", "404", "NotFound"):
        return True
    return isinstance(exc.__cause__, FileNotFoundError)


# --- the in-process hand-off ---------------------------------------------------------------


class ObjectCache:
    """The bytes of objects this process just exported, for its own forwarder: bounded by
    ``max_bytes`` (oldest dropped first), an entry kept until each of its ``readers`` (the
    destinations that want it) took it. The store is the source of truth: a miss reads it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, list[Any]] = OrderedDict()  # key -> [body, readers]
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, body: bytes, readers: int) -> None:
        if readers <= 0 or not body or len(body) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old[0])
        self._entries[key] = [body, readers]
        self.bytes += len(body)
        while self.bytes > self.max_bytes:
            _, (dropped, _) = self._entries.popitem(last=False)
            self.bytes -= len(dropped)

    def take(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        body: bytes = entry[0]
        entry[1] -= 1
        if entry[1] <= 0:
            del self._entries[key]
            self.bytes -= len(body)
        return body

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


# --- one destination's lane ---------------------------------------------------------------


@dataclass(eq=False)
class Lane:
    """One destination's claimer and senders, and the deliveries they hold."""

    destination: Any  # a DestinationLike
    client: ClientLike
    events: AggregatedEvents
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    held: dict[int, Delivery] = field(default_factory=dict)
    claimer: asyncio.Task[None] | None = None
    senders: list[asyncio.Task[None]] = field(default_factory=list)
    helpers: list[asyncio.Task[None]] = field(default_factory=list)
    sending: int = 0
    # The destination's own backoff: after a retryable failure the lane claims nothing
    # until resume_at, then one delivery at a time (a probe) until one goes through; so a
    # destination down for a day costs a probe per backoff, not an attempt per row.
    failures: int = 0
    resume_at: float = 0.0

    @property
    def name(self) -> str:
        return str(self.destination.name)

    @property
    def concurrency(self) -> int:
        return max(1, int(self.destination.concurrency))


class Forwarder:
    def __init__(
        self,
        deliveries: DeliveryPort,
        store: ObjectStore,
        metrics: Metrics,
        *,
        destinations: Callable[[], Sequence[Any]],
        lease_s: float,
        backoff_max_s: float,
        poll_interval_s: float,
        cache_bytes: int,
        client_factory: ClientFactory = default_client_factory,
        events_window_s: float = 1.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.deliveries = deliveries
        self.store = store
        self.metrics = metrics
        self.destinations = destinations
        self.lease_s = lease_s
        self.backoff_max_s = backoff_max_s
        self.poll_interval_s = poll_interval_s
        self.cache = ObjectCache(cache_bytes)
        self.client_factory = client_factory
        self.events_window_s = events_window_s
        self.rng = rng
        self.token = uuid.uuid4()
        self.lanes: dict[str, Lane] = {}
        self._retiring: set[Lane] = set()  # changed or removed, finishing their sends
        self._supervisor: Supervisor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stats_names: set[str] = set()
        self._unstartable: list[Any] = []  # destinations whose client could not be made
        self.stopping = False

    # --- the exporter's side (same process) --------------------------------------------
    def route(self, signal: str, tenant: str) -> list[str]:
        """The destinations that want an object of ``signal`` and ``tenant``."""
        return [d.name for d in self.destinations() if d.wants(signal, tenant)]

    def offer(self, key: str, body: bytes, readers: int) -> None:
        """An object just stored, wanted by ``readers`` destinations: kept for the senders."""
        self.cache.put(key, body, readers)

    def wake(self, names: Iterable[str]) -> None:
        """Deliveries for these destinations were committed: their claimers look now."""
        for name in names:
            lane = self.lanes.get(name)
            if lane is not None:
                lane.wake.set()

    def wake_all(self) -> None:
        for lane in self.lanes.values():
            lane.wake.set()

    # --- start and stop ------------------------------------------------------------------
    def start(self, supervisor: Supervisor, dsn: str | None) -> None:
        self._supervisor = supervisor
        self._reconcile(startup=True)
        self._tasks = [
            supervisor.spawn(self._watch_destinations(), "forward-destinations"),
            supervisor.spawn(self._renew_leases(), "forward-lease-renewer"),
            supervisor.spawn(self._refresh_stats(), "forward-stats"),
        ]
        if dsn is not None:
            self._tasks.append(supervisor.spawn(self.listen(dsn), "forward-listener"))
        log_event(
            "forwarding_started",
            "forwarding to the configured destinations",
            reason="startup",
            destinations=sorted(self.lanes),
        )

    async def stop(self, supervisor: Supervisor, grace_s: float) -> None:
        """Stop claiming; let the sends in flight finish within ``grace_s``; give back the
        rest (pending again at once: a send cut off may be repeated, at-least-once)."""
        self.stopping = True
        for task in self._tasks:
            await supervisor.cancel(task)
        lanes = [*self.lanes.values(), *self._retiring]
        self.lanes = {}
        for lane in lanes:
            if lane.claimer is not None:
                await supervisor.cancel(lane.claimer)
        deadline = time.monotonic() + grace_s
        for lane in lanes:
            await self._drain_lane(supervisor, lane, max(0.0, deadline - time.monotonic()))
        try:
            await self.deliveries.release(self.token)
        except StagingUnavailable as exc:
            log_event(
                "forward_release_failed",
                "could not give back held deliveries; they return when their lease expires",
                reason=str(exc).split(":")[-1].strip(),
                level=logging.WARNING,
            )
        self.cache.clear()

    async def _drain_lane(self, supervisor: Supervisor, lane: Lane, grace_s: float) -> None:
        """Senders finish what they hold (bounded), then stop; the client closes."""
        deadline = time.monotonic() + grace_s
        while lane.held and time.monotonic() < deadline:
            # Nothing is claimed any more: what is held is in flight or about to be.
            lane.room.clear()
            await wait_event(lane.room, max(0.01, deadline - time.monotonic()))
        if lane.held:
            log_event(
                "forward_drain_timeout",
                "sends still in flight at shutdown; their deliveries are given back",
                reason="shutdown_grace",
                level=logging.WARNING,
                destination=lane.name,
                deliveries=len(lane.held),
            )
        for task in [*lane.senders, *lane.helpers]:
            await supervisor.cancel(task, grace_s=2.0)
        lane.held.clear()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await lane.client.close()

    # --- destinations: started, changed, removed ----------------------------------------
    def _reconcile(self, startup: bool = False) -> list[Lane]:
        """Start lanes for new destinations; return the lanes to stop (changed, removed).
        At start-up a destination whose client cannot be made is an error; on a reload it
        is logged (``forward_destination_failed``) and left out."""
        assert self._supervisor is not None
        wanted = {d.name: d for d in self.destinations()}
        retired: list[Lane] = []
        for name, lane in list(self.lanes.items()):
            if wanted.get(name) != lane.destination:
                retired.append(self.lanes.pop(name))
        for name, destination in wanted.items():
            if name in self.lanes:
                continue
            if not startup and destination in self._unstartable:
                continue  # said once; tried again when the file changes
            try:
                self.lanes[name] = self._start_lane(destination)
            except Exception as exc:
                if startup:
                    raise
                self._unstartable.append(destination)
                log_event(
                    "forward_destination_failed",
                    "a changed destination could not be started; fix DESTINATIONS_FILE",
                    reason=type(exc).__name__,
                    level=logging.ERROR,
                    destination=name,
                    error=str(exc)[:500],
                )
        return retired

    def _start_lane(self, destination: Any) -> Lane:
        assert self._supervisor is not None
        lane = Lane(
            destination, self.client_factory(destination), AggregatedEvents(self.events_window_s)
        )
        spawn = self._supervisor.spawn
        name = destination.name
        lane.claimer = spawn(self._claim_loop(lane), f"forward-{name}-claim")
        lane.senders = [
            spawn(self._send_loop(lane), f"forward-{name}-{i}") for i in range(lane.concurrency)
        ]
        lane.helpers = [spawn(lane.events.run(), f"forward-{name}-events")]
        lane.wake.set()
        return lane

    async def _retire(self, lane: Lane) -> None:
        assert self._supervisor is not None
        self._retiring.add(lane)  # its leases are still renewed while it drains
        try:
            if lane.claimer is not None:
                await self._supervisor.cancel(lane.claimer)
            # In-flight sends finish (bounded by a few of the destination's timeouts);
            # whatever is cut off returns when its lease expires, to this process or another.
            grace = 3 * float(getattr(lane.destination, "timeout_s", 10.0))
            await self._drain_lane(self._supervisor, lane, grace)
        finally:
            self._retiring.discard(lane)

    async def _watch_destinations(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL_S)
            retired = self._reconcile()
            for lane in retired:
                log_event(
                    "forward_destination_changed",
                    "destination changed or removed in DESTINATIONS_FILE; its lane restarts"
                    " or stops (its deliveries stay)",
                    reason="changed" if lane.name in self.lanes else "removed",
                    destination=lane.name,
                )
                await self._retire(lane)

    # --- claim and send -----------------------------------------------------------------
    async def _idle(self, lane: Lane) -> None:
        await wait_event(lane.wake, self.poll_interval_s)

    async def _claim_loop(self, lane: Lane) -> None:
        while True:
            pause = lane.resume_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)  # the destination's backoff: wake-ups wait too
                continue
            free = lane.concurrency - len(lane.held)
            if lane.failures:
                free = 1 - len(lane.held)  # failing: one probe at a time
            if free <= 0:
                lane.room.clear()
                await lane.room.wait()
                continue
            lane.wake.clear()
            try:
                claimed = await self.deliveries.claim(
                    lane.name, free, self.lease_s, self.token, list(lane.held)
                )
            except StagingUnavailable as exc:
                lane.events.emit(
                    "forward_claim_failed",
                    str(exc).split(":")[-1].strip(),
                    "could not claim deliveries",
                    destination=lane.name,
                )
                await self._idle(lane)
                continue
            for delivery in claimed:
                lane.held[delivery.id] = delivery
                lane.ready.put_nowait(delivery)
            if len(claimed) < free:
                await self._idle(lane)

    async def _send_loop(self, lane: Lane) -> None:
        while True:
            delivery = await lane.ready.get()
            lane.sending += 1
            try:
                await self.deliver(lane, delivery)
            finally:
                lane.sending -= 1
                lane.held.pop(delivery.id, None)
                lane.room.set()

    async def deliver(self, lane: Lane, d: Delivery) -> str:
        """Send one claimed delivery and mark it; the outcome as the attempts metric says."""
        body = self.cache.take(d.object_key)
        if body is None:
            try:
                body = await self.store.get(d.object_key)
            except ObjectStoreError as exc:
                if object_missing(exc):
                    await self._dead(
                        lane,
                        d,
                        OBJECT_MISSING,
                        f"object {d.object_key} is not in the object store (pruned with"
                        " --force, or deleted): it cannot be delivered",
                    )
                    return self._count(lane, OBJECT_MISSING)
                reason = str(getattr(exc, "reason", "") or type(exc).__name__)
                self._lane_backoff(lane, True, None)
                await self._retry(lane, d, OBJECT_STORE_ERROR, f"{reason}: {exc}", None)
                return self._count(lane, OBJECT_STORE_ERROR)
        try:
            result = await lane.client.send(
                d.signal,
                d.tenant,
                body,
                object_encoding(d.object_key),
                d.raw_bytes,
                records=d.record_count,
            )
        except Exception as exc:  # a client bug: retried, never lost, never fatal
            del body
            log_event(
                "forward_send_error",
                "the destination's client raised; the delivery is retried",
                reason=type(exc).__name__,
                level=logging.ERROR,
                exc_info=exc,
                destination=lane.name,
                object_key=d.object_key,
            )
            self._lane_backoff(lane, True, None)
            await self._retry(lane, d, type(exc).__name__, str(exc) or type(exc).__name__, None)
            return self._count(lane, RETRY)
        del body
        outcome = str(result.outcome)
        self._lane_backoff(lane, outcome == RETRY, result.retry_after_s)
        if outcome == DELIVERED:
            await self._delivered(lane, d, result)
            return self._count(lane, DELIVERED)
        if outcome == PERMANENT:
            await self._dead(lane, d, result.status, result.message)
            return self._count(lane, PERMANENT)
        await self._retry(lane, d, result.status, result.message, result.retry_after_s)
        return self._count(lane, RETRY)

    def _lane_backoff(self, lane: Lane, failed: bool, retry_after_s: float | None) -> None:
        """A retryable failure pauses the lane's claims (exponential with jitter, or the
        destination's Retry-After if longer); anything else the destination answered ends
        the pause."""
        if not failed:
            lane.failures, lane.resume_at = 0, 0.0
            return
        delay = retry_delay_s(lane.failures, retry_after_s, self.backoff_max_s, self.rng)
        lane.failures += 1
        lane.resume_at = max(lane.resume_at, time.monotonic() + delay)

    def _count(self, lane: Lane, outcome: str) -> str:
        self.metrics.forward_attempts.labels(lane.name, outcome).inc()
        return outcome

    async def _delivered(self, lane: Lane, d: Delivery, result: SendResultLike) -> None:
        rejected = max(0, min(int(result.rejected_records), d.record_count))
        await self._mark(
            lane, d, self.deliveries.delivered(d.id, self.token, rejected, result.status)
        )
        self.metrics.forward_delivered_records.labels(lane.name, d.signal).inc(
            d.record_count - rejected
        )
        if rejected:
            self.metrics.forward_rejected_records.labels(lane.name, d.signal).inc(rejected)
            lane.events.emit(
                "forward_rejected_records",
                "partial_success",
                "the destination rejected some records of a delivered object",
                destination=lane.name,
                signal=d.signal,
                tenant=d.tenant,
                rejected=rejected,
                records=d.record_count,
                object_key=d.object_key,
                detail=bounded(result.message)[:500],
            )

    async def _retry(
        self, lane: Lane, d: Delivery, status: str, message: str, retry_after_s: float | None
    ) -> None:
        delay = retry_delay_s(d.attempts, retry_after_s, self.backoff_max_s, self.rng)
        await self._mark(lane, d, self.deliveries.retry(d.id, self.token, delay, status, message))
        lane.events.emit(
            "forward_failed",
            status,
            "delivery failed; retried later",
            destination=lane.name,
            signal=d.signal,
            tenant=d.tenant,
            attempts=d.attempts + 1,
            retry_in_s=round(delay, 3),
            object_key=d.object_key,
            detail=bounded(message)[:500],
        )

    async def _dead(self, lane: Lane, d: Delivery, status: str, message: str) -> None:
        await self._mark(lane, d, self.deliveries.dead(d.id, self.token, status, message))
        lane.events.emit(
            "forward_dead",
            status,
            "delivery refused for good; parked dead (requeue-dead --destination)",
            level=logging.ERROR,
            destination=lane.name,
            signal=d.signal,
            tenant=d.tenant,
            records=d.record_count,
            object_key=d.object_key,
            detail=bounded(message)[:500],
        )

    async def _mark(self, lane: Lane, d: Delivery, marking: Awaitable[bool]) -> None:
        try:
            ours = await marking
        except StagingUnavailable as exc:
            # Still claimed; its lease expires and it is claimed (and sent) again.
            lane.events.emit(
                "forward_mark_failed",
                str(exc).split(":")[-1].strip(),
                "could not record a delivery's outcome; it returns when its lease expires",
                destination=lane.name,
                object_key=d.object_key,
            )
            return
        if not ours:
            lane.events.emit(
                "forward_lease_lost",
                "lease_expired",
                "a delivery's lease passed to another forwarder (or its object was pruned)"
                " before its outcome was recorded",
                destination=lane.name,
                object_key=d.object_key,
            )

    # --- leases, wake-ups, figures ------------------------------------------------------
    def held_ids(self) -> list[int]:
        return [i for lane in [*self.lanes.values(), *self._retiring] for i in lane.held]

    async def _renew_leases(self) -> None:
        interval = self.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            ids = self.held_ids()
            if not ids:
                continue
            try:
                await self.deliveries.renew(ids, self.lease_s, self.token)
            except StagingUnavailable as exc:
                log_event(
                    "forward_lease_renew_failed",
                    "could not renew delivery leases",
                    reason=str(exc).split(":")[-1].strip(),
                    level=logging.WARNING,
                    deliveries=len(ids),
                )

    def on_notify(self, payload: str) -> None:
        if payload:
            self.wake(payload.split(","))
        else:
            self.wake_all()

    async def listen(self, dsn: str) -> None:
        """Wake the claimers on ``NOTIFY otelworker_deliveries`` (from any process)."""

        # On (re)connecting, wake_all catches up on what was committed while not listening.
        await listen_forever(dsn, CHANNEL, self.on_notify, self.wake_all, retry_s=LISTEN_RETRY_S)

    async def refresh_stats(self) -> None:
        """Count the table: pending, lag and dead per destination; the lost totals."""
        stats = await self.deliveries.stats()
        losses = await self.deliveries.losses()
        seen = {s.destination: s for s in stats}
        names = set(seen) | set(self.lanes) | self._stats_names
        for name in names:
            s = seen.get(name)
            self.metrics.forward_pending_objects.labels(name).set(s.pending if s else 0)
            self.metrics.forward_lag.labels(name).set(s.lag_s if s else 0.0)
            self.metrics.forward_dead_objects.labels(name).set(s.dead if s else 0)
        self._stats_names = names
        self.metrics.forward_lost_objects.totals = {k: float(v) for k, v in losses.items()}

    async def _refresh_stats(self) -> None:
        while True:
            try:
                await self.refresh_stats()
            except StagingUnavailable as exc:
                log_event(
                    "forward_stats_failed",
                    "could not count the deliveries",
                    reason=str(exc).split(":")[-1].strip(),
                    level=logging.WARNING,
                )
            await asyncio.sleep(self.poll_interval_s)
