"""The forwarder with a fake deliveries table and fake clients: what each outcome does to
a delivery, the backoff and its jitter, the in-process object cache, and lanes that never
wait for one another."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from otelworker.exceptions import ObjectStoreError, StagingUnavailable
from otelworker.forwarding.client import Outcome, SendResult
from otelworker.forwarding.deliveries import Delivery, DestinationStats
from otelworker.forwarding.forwarder import (
    OBJECT_MISSING,
    ObjectCache,
    backoff_s,
    object_encoding,
    retry_delay_s,
)
from otelworker.forwarding.forwarder import Forwarder as _Forwarder
from otelworker.metrics import Metrics
from otelworker.sinks.base import StoredObject
from otelworker.supervisor import Supervisor

KEY = "otel/default/year=2026/month=01/day=01/hour=00/minute=00/traces_{}.binpb.gz"


async def until(predicate: Callable[[], bool], within_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or predicate}")
        await asyncio.sleep(0.001)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@dataclass(frozen=True)
class Dest:
    name: str
    concurrency: int = 2
    signals: frozenset[str] = frozenset({"traces", "metrics", "logs"})
    tenants: frozenset[str] | None = None
    timeout_s: float = 1.0

    def wants(self, signal: str, tenant: str) -> bool:
        return signal in self.signals and (self.tenants is None or tenant in self.tenants)


@dataclass
class Row:
    delivery: Delivery
    status: str = "pending"
    attempts: int = 0
    next_at: float = 0.0
    token: uuid.UUID | None = None
    lease_until: float = 0.0
    last_status: str | None = None
    last_error: str | None = None
    rejected: int = 0
    delay_s: float | None = None


@dataclass
class FakeDeliveries:
    """A behavioural DeliveryPort: the claim takes due rows oldest first (pending whose
    time has come; processing whose lease expired and that the claimer does not hold)."""

    rows: dict[int, Row] = field(default_factory=dict)
    marks: list[tuple[str, int]] = field(default_factory=list)
    claims: int = 0
    unavailable: bool = False

    def add(self, destination: str, n: int, *, records: int = 10, signal: str = "traces") -> None:
        for _ in range(n):
            i = len(self.rows) + 1
            d = Delivery(
                i,
                destination,
                uuid.uuid4(),
                KEY.format(i),
                signal,
                "default",
                records,
                100,
                50,
                0,
            )
            self.rows[i] = Row(d)

    def of(self, destination: str) -> list[Row]:
        return [r for r in self.rows.values() if r.delivery.destination == destination]

    async def claim(
        self,
        destination: str,
        limit: int,
        lease_s: float,
        token: uuid.UUID,
        held: Sequence[int] = (),
    ) -> list[Delivery]:
        if self.unavailable:
            raise StagingUnavailable("delivery_claim: ConnectionRefusedError")
        self.claims += 1
        now = time.monotonic()
        due = [
            r
            for r in self.rows.values()
            if r.delivery.destination == destination
            and (
                (r.status == "pending" and r.next_at <= now)
                or (
                    r.status == "processing"
                    and r.lease_until < now
                    and (r.token != token or r.delivery.id not in held)
                )
            )
        ]
        due.sort(key=lambda r: r.next_at)
        out = []
        for r in due[:limit]:
            r.status, r.token, r.lease_until = "processing", token, now + lease_s
            d = r.delivery
            out.append(
                Delivery(
                    d.id,
                    d.destination,
                    d.batch_id,
                    d.object_key,
                    d.signal,
                    d.tenant,
                    d.record_count,
                    d.raw_bytes,
                    d.compressed_bytes,
                    r.attempts,
                )
            )
        return out

    async def renew(self, ids: Sequence[int], lease_s: float, token: uuid.UUID) -> None:
        for i in ids:
            r = self.rows[i]
            if r.token == token and r.status == "processing":
                r.lease_until = time.monotonic() + lease_s

    def _ours(self, i: int, token: uuid.UUID) -> Row | None:
        r = self.rows.get(i)
        return r if r is not None and r.token == token and r.status == "processing" else None

    async def delivered(self, i: int, token: uuid.UUID, rejected: int, status: str) -> bool:
        self.marks.append(("delivered", i))
        r = self._ours(i, token)
        if r is None:
            return False
        r.status, r.token, r.rejected, r.last_status = "delivered", None, rejected, status
        r.attempts += 1
        return True

    async def retry(
        self, i: int, token: uuid.UUID, delay_s: float, status: str, error: str
    ) -> bool:
        self.marks.append(("retry", i))
        r = self._ours(i, token)
        if r is None:
            return False
        r.status, r.token, r.last_status, r.last_error = "pending", None, status, error
        r.attempts += 1
        r.delay_s = delay_s
        r.next_at = time.monotonic() + delay_s
        return True

    async def dead(self, i: int, token: uuid.UUID, status: str, error: str) -> bool:
        self.marks.append(("dead", i))
        r = self._ours(i, token)
        if r is None:
            return False
        r.status, r.token, r.last_status, r.last_error = "dead", None, status, error
        r.attempts += 1
        return True

    async def release(self, token: uuid.UUID) -> None:
        for r in self.rows.values():
            if r.token == token and r.status == "processing":
                r.status, r.token, r.next_at = "pending", None, 0.0

    async def stats(self) -> list[DestinationStats]:
        names = {r.delivery.destination for r in self.rows.values()}
        return [
            DestinationStats(
                n,
                sum(r.status in ("pending", "processing") for r in self.of(n)),
                0.0,
                sum(r.status == "dead" for r in self.of(n)),
            )
            for n in sorted(names)
        ]

    async def losses(self) -> dict[str, int]:
        return {}


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0
        self.fail_with: ObjectStoreError | None = None

    async def put(self, key: str, body: bytes, content_type: str, enc: str | None) -> None:
        self.objects[key] = body

    async def get(self, key: str) -> bytes:
        self.gets += 1
        if self.fail_with is not None:
            raise self.fail_with
        try:
            return self.objects[key]
        except KeyError:
            err = ObjectStoreError(f"get {key}: NoSuchKey")
            err.reason = "NoSuchKey"  # type: ignore[attr-defined]
            raise err from None

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    async def list(self, prefix: str) -> AsyncIterator[StoredObject]:
        for _ in ():
            yield _

    async def close(self) -> None:
        return None


Answer = Callable[[int], SendResult]  # the n-th call (from 0) -> its result


def delivered(records: int = 10, rejected: int = 0) -> SendResult:
    return SendResult(Outcome.DELIVERED, "200", "", None, records, rejected, 1)


def retry(status: str = "503", retry_after: float | None = None) -> SendResult:
    return SendResult(Outcome.RETRY, status, f"says {status}", retry_after, 0, 0, 1)


def permanent(status: str = "400", message: str = "bad request") -> SendResult:
    return SendResult(Outcome.PERMANENT, status, message, None, 0, 0, 1)


class FakeClient:
    def __init__(self, answer: Answer, delay_s: float = 0.0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.calls: list[tuple[str, str, bytes, str | None, int, int | None]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.closed = False

    async def send(
        self,
        signal: str,
        tenant: str,
        body: bytes,
        encoding: str | None,
        raw_bytes: int,
        *,
        records: int | None = None,
    ) -> SendResult:
        n = len(self.calls)
        self.calls.append((signal, tenant, body, encoding, raw_bytes, records))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return self.answer(n)
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        self.closed = True


def make(
    deliveries: FakeDeliveries,
    clients: dict[str, FakeClient],
    destinations: list[Dest],
    store: MemoryStore | None = None,
    **kwargs: Any,
) -> tuple[_Forwarder, Metrics, MemoryStore]:
    metrics = Metrics()
    store = store or MemoryStore()
    for row in deliveries.rows.values():
        store.objects.setdefault(
            row.delivery.object_key, b"object-" + row.delivery.object_key.encode()
        )
    options: dict[str, Any] = {
        "lease_s": 30.0,
        "backoff_max_s": 300.0,
        "poll_interval_s": 0.05,
        "cache_bytes": 1 << 20,
        "events_window_s": 0.0,
        **kwargs,
    }
    forwarder = _Forwarder(
        deliveries,
        store,
        metrics,
        destinations=lambda: destinations,
        client_factory=lambda d: clients[d.name],
        **options,
    )
    return forwarder, metrics, store


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    sup = Supervisor()
    yield sup
    await sup.cancel_all(grace_s=5)


# --- one delivery, each outcome ------------------------------------------------------------


async def one(
    answer: Answer, supervisor: Supervisor, store: MemoryStore | None = None, **kw: Any
) -> tuple[_Forwarder, FakeDeliveries, FakeClient, Metrics, Row]:
    deliveries = FakeDeliveries()
    deliveries.add("tempo", 1)
    client = FakeClient(answer)
    forwarder, metrics, _ = make(deliveries, {"tempo": client}, [Dest("tempo")], store, **kw)
    forwarder.start(supervisor, None)
    row = deliveries.rows[1]
    await until(lambda: bool(deliveries.marks), what="a mark")
    await forwarder.stop(supervisor, 1.0)
    return forwarder, deliveries, client, metrics, row


async def test_delivered_marks_the_row_and_counts_rejected_records_apart(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, _, client, metrics, row = await one(lambda _: delivered(10, 3), supervisor)
    assert (row.status, row.rejected, row.attempts, row.last_status) == ("delivered", 3, 1, "200")
    signal, tenant, body, encoding, raw, records = client.calls[0]
    assert (signal, tenant, encoding, raw, records) == ("traces", "default", "gzip", 100, 10)
    assert body == b"object-" + row.delivery.object_key.encode()
    labels = {"destination": "tempo", "signal": "traces"}
    assert value(metrics, "otelworker_forward_delivered_records_total", **labels) == 7
    assert value(metrics, "otelworker_forward_rejected_records_total", **labels) == 3
    assert (
        value(
            metrics, "otelworker_forward_attempts_total", destination="tempo", outcome="delivered"
        )
        == 1
    )
    [event] = events(caplog, "forward_rejected_records")
    assert event.reason == "partial_success" and event.rejected == 3  # type: ignore[attr-defined]
    assert event.destination == "tempo"  # type: ignore[attr-defined]


async def test_retry_honours_retry_after_when_longer_than_the_backoff(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, _, metrics, row = await one(lambda _: retry("429", 42.0), supervisor)
    assert (row.status, row.attempts, row.last_status) == ("pending", 1, "429")
    assert row.delay_s == 42.0
    assert (
        value(metrics, "otelworker_forward_attempts_total", destination="tempo", outcome="retry")
        == 1
    )
    [event] = events(caplog, "forward_failed")
    assert event.reason == "429" and event.destination == "tempo"  # type: ignore[attr-defined]


async def test_retry_without_retry_after_waits_the_jittered_backoff(
    supervisor: Supervisor,
) -> None:
    _, _, _, _, row = await one(lambda _: retry("503"), supervisor)
    assert row.delay_s is not None and 0.5 <= row.delay_s <= 1.0  # first attempt: 1 s base


async def test_permanent_parks_the_delivery_dead_with_its_status_and_message(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, _, metrics, row = await one(
        lambda _: permanent("400", "span has no trace id"), supervisor
    )
    assert (row.status, row.last_status, row.last_error) == (
        "dead",
        "400",
        "span has no trace id",
    )
    assert (
        value(
            metrics, "otelworker_forward_attempts_total", destination="tempo", outcome="permanent"
        )
        == 1
    )
    [event] = events(caplog, "forward_dead")
    assert event.reason == "400" and event.levelno == logging.ERROR


async def test_object_missing_from_the_store_is_dead_with_a_clear_reason(
    supervisor: Supervisor,
) -> None:
    store = MemoryStore()
    deliveries = FakeDeliveries()
    deliveries.add("tempo", 1)
    client = FakeClient(lambda _: delivered())
    forwarder, metrics, _ = make(deliveries, {"tempo": client}, [Dest("tempo")], store)
    store.objects.clear()  # pruned with --force
    forwarder.start(supervisor, None)
    await until(lambda: bool(deliveries.marks))
    await forwarder.stop(supervisor, 1.0)
    row = deliveries.rows[1]
    assert (row.status, row.last_status) == ("dead", OBJECT_MISSING)
    assert "not in the object store" in (row.last_error or "")
    assert not client.calls
    assert (
        value(
            metrics,
            "otelworker_forward_attempts_total",
            destination="tempo",
            outcome=OBJECT_MISSING,
        )
        == 1
    )


async def test_a_store_outage_is_retried_not_dead(supervisor: Supervisor) -> None:
    store = MemoryStore()
    err = ObjectStoreError("get k: SlowDown")
    err.reason = "SlowDown"  # type: ignore[attr-defined]
    store.fail_with = err
    _, _, client, _, row = await one(lambda _: delivered(), supervisor, store)
    assert (row.status, row.last_status) == ("pending", "object_store_error")
    assert not client.calls


async def test_a_client_that_raises_is_retried_and_its_lane_lives_on(
    supervisor: Supervisor,
) -> None:
    def boom(n: int) -> SendResult:
        if n == 0:
            raise RuntimeError("bug")
        return delivered()

    deliveries = FakeDeliveries()
    deliveries.add("tempo", 1)
    client = FakeClient(boom)
    forwarder, _, _ = make(deliveries, {"tempo": client}, [Dest("tempo")], backoff_max_s=1.0)
    forwarder.rng = lambda: 0.0  # 0.5 s
    forwarder.start(supervisor, None)
    await until(lambda: deliveries.rows[1].status == "delivered", what="the second attempt")
    assert [m for m, _ in deliveries.marks] == ["retry", "delivered"]
    assert supervisor.healthy
    await forwarder.stop(supervisor, 1.0)


# --- retryable failures never kill; the backoff ---------------------------------------------


async def test_retryable_failures_never_make_a_delivery_dead(supervisor: Supervisor) -> None:
    deliveries = FakeDeliveries()
    deliveries.add("down", 3)
    client = FakeClient(lambda n: retry("503" if n % 2 else "connection_refused"))
    forwarder, _, _ = make(deliveries, {"down": client}, [Dest("down", concurrency=3)])
    forwarder.backoff_max_s = 0.002  # retried at once, many times
    forwarder.start(supervisor, None)
    await until(lambda: len(client.calls) >= 200, what="200 failed attempts")
    await forwarder.stop(supervisor, 1.0)
    assert all(r.status == "pending" for r in deliveries.rows.values())
    assert "dead" not in {m for m, _ in deliveries.marks}
    assert sum(r.attempts for r in deliveries.rows.values()) >= 200


async def test_a_down_destination_is_probed_one_delivery_at_a_time_not_hammered(
    supervisor: Supervisor,
) -> None:
    """A lane whose destination fails backs off as a whole: one probe per backoff, the
    destination's Retry-After honoured, not one attempt per due row; back at full speed
    once an attempt goes through."""
    deliveries = FakeDeliveries()
    deliveries.add("down", 200)
    up = asyncio.Event()
    client = FakeClient(lambda _: delivered() if up.is_set() else retry("429", 0.2), 0.01)
    forwarder, _, _ = make(
        deliveries, {"down": client}, [Dest("down", concurrency=4)], backoff_max_s=0.2
    )
    forwarder.start(supervisor, None)
    await asyncio.sleep(1.0)
    # 4 at first (all slots), then one probe per 0.2 s Retry-After: ~8, never ~hundreds.
    assert 4 <= len(client.calls) <= 14, len(client.calls)
    assert client.most_in_flight == 4
    up.set()
    client.most_in_flight = 0
    await until(lambda: all(r.status == "delivered" for r in deliveries.rows.values()), 10)
    await forwarder.stop(supervisor, 1.0)
    assert client.most_in_flight == 4  # full concurrency again once it answered


def test_backoff_is_exponential_with_jitter_in_its_upper_half_and_capped() -> None:
    low, high = (lambda: 0.0), (lambda: 1.0)
    assert [backoff_s(a, 300, low) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff_s(a, 300, high) for a in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(30, 300, high) == 300 and backoff_s(30, 300, low) == 150
    assert backoff_s(10_000, 300, high) == 300  # no overflow
    import random

    rng = random.Random(7)
    spread = {round(backoff_s(5, 300, rng.random), 3) for _ in range(100)}
    assert len(spread) > 90 and all(16 <= d <= 32 for d in spread)


def test_retry_after_wins_only_when_longer_and_is_bounded() -> None:
    high = lambda: 1.0  # noqa: E731
    assert retry_delay_s(0, 30.0, 300, high) == 30.0
    assert retry_delay_s(8, 1.0, 300, high) == 256.0  # the backoff is longer: it wins
    assert retry_delay_s(0, 10 * 86400.0, 300, high) == 3600.0
    assert retry_delay_s(0, None, 300, high) == 1.0
    assert retry_delay_s(0, 0.0, 300, high) == 1.0


def test_object_encoding_from_the_key() -> None:
    assert object_encoding("a/traces_x.binpb.gz") == "gzip"
    assert object_encoding("a/traces_x.binpb.zst") == "zstd"
    assert object_encoding("a/traces_x.binpb") is None


# --- the in-process cache ---------------------------------------------------------------------


def test_cache_keeps_an_object_until_each_reader_took_it() -> None:
    cache = ObjectCache(100)
    cache.put("a", b"x" * 10, 2)
    assert cache.take("a") == b"x" * 10 and cache.bytes == 10
    assert cache.take("a") == b"x" * 10 and cache.bytes == 0
    assert cache.take("a") is None


def test_cache_is_bounded_dropping_the_oldest_first() -> None:
    cache = ObjectCache(100)
    for i in range(10):
        cache.put(str(i), bytes(30), 1)
        assert cache.bytes <= 100
    assert len(cache) == 3 and cache.take("9") is not None and cache.take("0") is None
    cache.put("big", bytes(101), 1)  # larger than the whole cache: not kept
    assert cache.take("big") is None
    off = ObjectCache(0)
    off.put("a", b"x", 1)
    assert off.take("a") is None and off.bytes == 0


async def test_the_exporter_hand_off_skips_the_store(supervisor: Supervisor) -> None:
    deliveries = FakeDeliveries()
    deliveries.add("a", 1)
    deliveries.add("b", 1)
    key_b = deliveries.rows[2].delivery.object_key
    # Both destinations want the same object.
    deliveries.rows[2].delivery = Delivery(
        2,
        "b",
        uuid.uuid4(),
        deliveries.rows[1].delivery.object_key,
        "traces",
        "default",
        10,
        100,
        50,
        0,
    )
    assert key_b
    clients = {"a": FakeClient(lambda _: delivered()), "b": FakeClient(lambda _: delivered())}
    forwarder, _, store = make(deliveries, clients, [Dest("a"), Dest("b")])
    key = deliveries.rows[1].delivery.object_key
    assert forwarder.route("traces", "default") == ["a", "b"]
    forwarder.offer(key, b"from memory", 2)
    forwarder.start(supervisor, None)
    forwarder.wake(["a", "b"])
    await until(lambda: all(r.status == "delivered" for r in deliveries.rows.values()))
    await forwarder.stop(supervisor, 1.0)
    assert store.gets == 0
    assert clients["a"].calls[0][2] == clients["b"].calls[0][2] == b"from memory"
    assert len(forwarder.cache) == 0


def test_route_names_only_the_destinations_that_want_it() -> None:
    forwarder, _, _ = make(
        FakeDeliveries(),
        {},
        [
            Dest("tempo", signals=frozenset({"traces"})),
            Dest("loki", signals=frozenset({"logs"}), tenants=frozenset({"team-a"})),
            Dest("all"),
        ],
    )
    assert forwarder.route("traces", "team-a") == ["tempo", "all"]
    assert forwarder.route("logs", "team-a") == ["loki", "all"]
    assert forwarder.route("logs", "team-b") == ["all"]


# --- lanes ----------------------------------------------------------------------------------------


async def test_a_lane_sends_at_most_concurrency_at_once_and_delivers_everything(
    supervisor: Supervisor,
) -> None:
    deliveries = FakeDeliveries()
    deliveries.add("tempo", 40)
    client = FakeClient(lambda _: delivered(), delay_s=0.01)
    forwarder, metrics, _ = make(deliveries, {"tempo": client}, [Dest("tempo", concurrency=4)])
    forwarder.start(supervisor, None)
    await until(lambda: all(r.status == "delivered" for r in deliveries.rows.values()))
    await forwarder.stop(supervisor, 1.0)
    assert len(client.calls) == 40 and client.most_in_flight == 4
    assert (
        value(
            metrics,
            "otelworker_forward_delivered_records_total",
            destination="tempo",
            signal="traces",
        )
        == 400
    )


async def test_a_stuck_destination_delays_no_other(supervisor: Supervisor) -> None:
    deliveries = FakeDeliveries()
    deliveries.add("stuck", 10)
    deliveries.add("fine", 30)
    stuck = FakeClient(lambda _: delivered(), delay_s=3600)
    fine = FakeClient(lambda _: delivered())
    forwarder, _, _ = make(
        deliveries, {"stuck": stuck, "fine": fine}, [Dest("stuck", 2), Dest("fine", 2)]
    )
    forwarder.start(supervisor, None)
    started = time.monotonic()
    await until(lambda: all(r.status == "delivered" for r in deliveries.of("fine")), 10)
    assert time.monotonic() - started < 5
    assert stuck.in_flight == 2  # its two senders hang; nothing else waits for them
    # Shutdown gives the stuck lane's deliveries back, pending again.
    await forwarder.stop(supervisor, 0.2)
    assert {r.status for r in deliveries.of("stuck")} == {"pending"}


async def test_a_wake_up_starts_the_claim_at_once_not_at_the_poll_interval(
    supervisor: Supervisor,
) -> None:
    deliveries = FakeDeliveries()
    client = FakeClient(lambda _: delivered())
    forwarder, _, _ = make(deliveries, {"tempo": client}, [Dest("tempo")], poll_interval_s=3600.0)
    forwarder.start(supervisor, None)
    await asyncio.sleep(0.05)  # idle now, for an hour
    deliveries.add("tempo", 1)
    forwarder.store.objects[deliveries.rows[1].delivery.object_key] = b"x"  # type: ignore[attr-defined]
    started = time.monotonic()
    forwarder.on_notify("other,tempo")
    await until(lambda: deliveries.rows[1].status == "delivered", 2)
    assert time.monotonic() - started < 1
    await forwarder.stop(supervisor, 1.0)


async def test_claim_failures_do_not_kill_the_lane(supervisor: Supervisor) -> None:
    deliveries = FakeDeliveries()
    deliveries.add("tempo", 2)
    deliveries.unavailable = True
    client = FakeClient(lambda _: delivered())
    forwarder, _, _ = make(deliveries, {"tempo": client}, [Dest("tempo")])
    forwarder.start(supervisor, None)
    await asyncio.sleep(0.2)
    deliveries.unavailable = False
    await until(lambda: all(r.status == "delivered" for r in deliveries.rows.values()))
    assert supervisor.healthy
    await forwarder.stop(supervisor, 1.0)


async def test_a_removed_destination_stops_its_lane_and_keeps_its_rows(
    supervisor: Supervisor,
) -> None:
    deliveries = FakeDeliveries()
    configured = [Dest("a"), Dest("b")]
    clients = {"a": FakeClient(lambda _: delivered()), "b": FakeClient(lambda _: retry())}
    forwarder, metrics, _ = make(deliveries, clients, configured)
    forwarder.destinations = lambda: configured
    forwarder.start(supervisor, None)
    assert sorted(forwarder.lanes) == ["a", "b"]
    configured.pop()  # b removed from the file
    await until(lambda: sorted(forwarder.lanes) == ["a"] and clients["b"].closed, 5)
    deliveries.add("b", 2)
    await forwarder.refresh_stats()
    assert value(metrics, "otelworker_forward_pending_objects", destination="b") == 2
    assert supervisor.healthy
    await forwarder.stop(supervisor, 1.0)
