"""Admission control: the token bucket, the backlog figure and the overflow gate.

Every clock and random source is injected, so these tests are exact, not timed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random

import pytest

from otelworker.exceptions import StagingUnavailable
from otelworker.ingress.admission import (
    BacklogTracker,
    ByteBucket,
    OverflowGate,
    Snapshot,
    TokenBucket,
    Verdict,
)
from otelworker.settings import OverflowPolicy
from otelworker.staging.queue import BacklogCount


class _NoJitter(random.Random):
    def random(self) -> float:
        return 0.0


NO_JITTER = _NoJitter()


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- TokenBucket ----------------------------------------------------------------------


def test_bucket_is_full_at_start_and_allows_exactly_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    assert bucket.tokens == 5.0
    assert [bucket.try_acquire() for _ in range(7)] == [True] * 5 + [False] * 2


def test_bucket_refills_continuously_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4.0, burst=8, clock=clock)
    for _ in range(8):
        assert bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.advance(0.125)  # half a token: not enough
    assert bucket.tokens == pytest.approx(0.5)
    assert not bucket.try_acquire()
    clock.advance(0.125)  # now exactly one
    assert bucket.tokens == pytest.approx(1.0)
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.advance(1.0)  # 4 tokens per second, continuously
    assert bucket.tokens == pytest.approx(4.0)
    assert sum(bucket.try_acquire() for _ in range(10)) == 4


def test_bucket_never_holds_more_than_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=3, clock=clock)
    clock.advance(3600)
    assert bucket.tokens == 3.0
    assert sum(bucket.try_acquire() for _ in range(10)) == 3


def test_refused_request_takes_no_token() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.try_acquire()
    clock.advance(0.5)
    # Many refusals while half a token has accumulated...
    for _ in range(100):
        assert not bucket.try_acquire()
    assert bucket.tokens == pytest.approx(0.5)
    # ...do not delay the next token: it is there exactly one second after the last grant.
    clock.advance(0.5)
    assert bucket.try_acquire()


def test_retry_after_is_never_below_one_second_when_a_token_is_there() -> None:
    bucket = TokenBucket(rate=1000.0, burst=10, clock=FakeClock(), rng=random.Random(1))
    for _ in range(50):
        value = bucket.retry_after()
        assert isinstance(value, int)
        assert 1 <= value <= 2


@pytest.mark.parametrize(
    ("rate", "burst", "elapsed"),
    [
        (1.0, 1, 0.0),  # next token in 1 s
        (0.25, 2, 0.0),  # next token in 4 s
        (0.25, 2, 1.5),  # 2.5 s left
        (3.0, 5, 0.1),  # a fraction of a second left
        (0.1, 1, 9.99),  # 0.01 s left
        (0.5, 1, 0.0),  # exactly 2 s: ceil must not add a second by itself
    ],
)
def test_retry_after_is_the_rounded_up_wait_plus_at_most_one_second_of_jitter(
    rate: float, burst: int, elapsed: float
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock, rng=random.Random(42))
    while bucket.try_acquire():
        pass
    clock.advance(elapsed)
    wait = (1.0 - bucket.tokens) / rate
    low = max(1, math.ceil(wait - 1e-9))
    seen = set()
    for _ in range(500):
        value = bucket.retry_after()
        assert isinstance(value, int)
        assert low <= value <= low + 1, (value, wait)
        seen.add(value)
    # The jitter is real: with a fractional wait, refused clients are spread over two
    # consecutive seconds rather than all told the same one.
    if 0.1 < wait % 1.0 < 0.9:
        assert seen == {low, low + 1}


def test_retry_after_does_not_take_a_token() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    for _ in range(20):
        bucket.retry_after()
    assert bucket.tokens == 2.0


# --- BacklogTracker -------------------------------------------------------------------


class Counter:
    """An async count source standing in for the COUNT(*) query."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None

    async def __call__(self) -> int:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        observed = self.value
        if self.gate is not None:
            await self.gate.wait()
        return observed


async def test_backlog_value_is_counted_plus_local_adds_and_refresh_resets() -> None:
    counter = Counter(7)
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    assert not tracker.known
    assert tracker.value == 0
    await tracker.refresh()
    assert tracker.known
    assert tracker.value == 7
    tracker.add(1)
    tracker.add(2)
    assert tracker.value == 10
    assert counter.calls == 1  # value does not query
    counter.value = 4  # the worker exported some rows meanwhile
    await tracker.refresh()
    assert tracker.value == 4  # the local adds are folded into the count
    tracker.add(1)
    assert tracker.value == 5


async def test_backlog_keeps_adds_made_while_the_count_runs() -> None:
    counter = Counter(10)
    counter.gate = asyncio.Event()
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    tracker.add(3)
    refreshing = asyncio.create_task(tracker.refresh())
    await asyncio.sleep(0)
    assert counter.calls == 1
    tracker.add(2)  # staged while the count is in flight: maybe not in it
    counter.gate.set()
    await refreshing
    # Never undercount: the 2 staged during the count are kept on top of it.
    assert tracker.value == 12


class SnapshotCounter:
    """A count source that also reports the snapshot it saw, as the real query does."""

    def __init__(self, value: int, snapshot: str) -> None:
        self.value = value
        self.snapshot = snapshot
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> tuple[int, str]:
        observed = (self.value, self.snapshot)
        if self.gate is not None:
            await self.gate.wait()
        return observed


async def test_backlog_counts_a_commit_landing_during_the_count_exactly_once() -> None:
    # xid 100 committed before the count; 105 committed during it and the count saw it
    # (snapshot 101:107 with 106 in progress); 106 committed during it, not seen.
    counter = SnapshotCounter(10, "101:107:106")
    counter.gate = asyncio.Event()
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    tracker.add(1, xid=100)
    refreshing = asyncio.create_task(tracker.refresh())
    await asyncio.sleep(0)
    tracker.add(1, xid=105)
    tracker.add(1, xid=106)
    counter.gate.set()
    await refreshing
    assert tracker.value == 11  # 10 counted (100 and 105 in it) + 106
    # A commit acknowledged after the count was processed but seen by it: not twice.
    tracker.add(1, xid=104)
    assert tracker.value == 11
    tracker.add(1, xid=107)  # after the snapshot: counts at once
    assert tracker.value == 12


def test_snapshot_visibility() -> None:
    snap = Snapshot.parse("10:20:12,15")
    assert snap.sees(9) and snap.sees(11) and snap.sees(19)
    assert not snap.sees(12) and not snap.sees(15) and not snap.sees(20) and not snap.sees(25)


async def test_backlog_run_recounts_periodically_and_survives_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    counter = Counter(3)
    counter.fail = StagingUnavailable("count failed: ConnectionDoesNotExistError")
    tracker = BacklogTracker(counter, refresh_interval_s=0.01)
    task = asyncio.create_task(tracker.run())
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while counter.calls < 3:
            assert asyncio.get_running_loop().time() < deadline, "refresh loop stalled"
            await asyncio.sleep(0.005)
        failures = [
            r for r in caplog.records if getattr(r, "event", None) == "backlog_refresh_failed"
        ]
        assert failures
        assert failures[0].reason == "ConnectionDoesNotExistError"
        assert not tracker.known
        counter.fail = None
        while not tracker.known:
            assert asyncio.get_running_loop().time() < deadline, "refresh never succeeded"
            await asyncio.sleep(0.005)
        assert tracker.value == 3
        counter.value = 9
        while tracker.value != 9:
            assert asyncio.get_running_loop().time() < deadline, "no periodic recount"
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- OverflowGate ---------------------------------------------------------------------


async def gate_at(
    backlog: int, cap: int, policy: OverflowPolicy, rate: float = 0.5, seed: int | None = 1
) -> OverflowGate:
    tracker = BacklogTracker(Counter(backlog), refresh_interval_s=60)
    await tracker.refresh()
    return OverflowGate(tracker, cap, policy, rate, seed)


@pytest.mark.parametrize("policy", list(OverflowPolicy))
async def test_gate_accepts_everything_below_the_cap(policy: OverflowPolicy) -> None:
    gate = await gate_at(9, 10, policy, rate=0.0)
    assert not gate.saturated
    assert {gate.decide() for _ in range(200)} == {Verdict.ACCEPT}


@pytest.mark.parametrize(
    ("policy", "verdict"),
    [(OverflowPolicy.REJECT, Verdict.REJECT), (OverflowPolicy.DROP, Verdict.DROP)],
)
async def test_gate_at_and_above_the_cap(policy: OverflowPolicy, verdict: Verdict) -> None:
    gate = await gate_at(10, 10, policy)  # reaching the cap is enough
    assert gate.saturated
    assert {gate.decide() for _ in range(200)} == {verdict}
    gate.backlog.add(5)
    assert gate.decide() is verdict


async def test_gate_reopens_when_the_backlog_drains() -> None:
    counter = Counter(10)
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    await tracker.refresh()
    gate = OverflowGate(tracker, 10, OverflowPolicy.REJECT, 0.0)
    assert gate.decide() is Verdict.REJECT
    counter.value = 9
    await tracker.refresh()
    assert gate.decide() is Verdict.ACCEPT
    tracker.add(1)  # a local stage counts at once, without waiting for a refresh
    assert gate.decide() is Verdict.REJECT


async def test_gate_sample_edges() -> None:
    never = await gate_at(10, 10, OverflowPolicy.SAMPLE, rate=0.0)
    assert {never.decide() for _ in range(500)} == {Verdict.SAMPLE_DROP}
    always = await gate_at(10, 10, OverflowPolicy.SAMPLE, rate=1.0)
    assert {always.decide() for _ in range(500)} == {Verdict.ACCEPT}


@pytest.mark.parametrize("rate", [0.3, 0.05, 0.9])
async def test_gate_sample_rate_is_statistically_right(rate: float) -> None:
    n = 10_000
    gate = await gate_at(10, 10, OverflowPolicy.SAMPLE, rate=rate, seed=20240601)
    accepted = sum(gate.decide() is Verdict.ACCEPT for _ in range(n))
    # Binomial(n, rate): allow 4 standard deviations (a false failure ~6e-5 for a random
    # seed; with the fixed seed the outcome is deterministic).
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(accepted - n * rate) <= 4 * sd, (accepted, n * rate, sd)


async def test_gate_sample_seed_makes_decisions_reproducible() -> None:
    a = await gate_at(10, 10, OverflowPolicy.SAMPLE, rate=0.5, seed=7)
    b = await gate_at(10, 10, OverflowPolicy.SAMPLE, rate=0.5, seed=7)
    c = await gate_at(10, 10, OverflowPolicy.SAMPLE, rate=0.5, seed=8)
    seq_a = [a.decide() for _ in range(200)]
    assert seq_a == [b.decide() for _ in range(200)]
    assert seq_a != [c.decide() for _ in range(200)]
    assert set(seq_a) == {Verdict.ACCEPT, Verdict.SAMPLE_DROP}


def test_verdict_values_are_the_metric_reasons() -> None:
    assert {v.value for v in Verdict if v is not Verdict.ACCEPT} == {
        "queue_full_reject",
        "queue_full_drop",
        "queue_full_sample",
    }


# --- TokenBucket.reconfigure ----------------------------------------------------------


def test_reconfigure_keeps_the_level_and_caps_it() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=10, clock=clock)
    for _ in range(7):
        assert bucket.try_acquire()
    bucket.reconfigure(2.0, 20)  # larger: not refilled by the change
    assert (bucket.rate, bucket.burst) == (2.0, 20.0)
    assert bucket.tokens == pytest.approx(3.0)
    clock.advance(1.0)  # the new rate from now on
    assert bucket.tokens == pytest.approx(5.0)
    clock.advance(100.0)  # and the new burst
    assert bucket.tokens == pytest.approx(20.0)
    bucket.reconfigure(2.0, 4)  # smaller: capped at once
    assert bucket.tokens == pytest.approx(4.0)
    assert sum(bucket.try_acquire() for _ in range(10)) == 4


def test_reconfigure_refills_at_the_old_rate_up_to_the_change() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=100, clock=clock)
    for _ in range(100):
        assert bucket.try_acquire()
    clock.advance(1.0)  # 10 tokens earned at the old rate...
    bucket.reconfigure(1.0, 100)
    assert bucket.tokens == pytest.approx(10.0)  # ...kept, not recomputed at the new one
    clock.advance(1.0)
    assert bucket.tokens == pytest.approx(11.0)


def test_reconfigure_then_retry_after_uses_the_new_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=1, clock=clock, rng=random.Random(3))
    assert bucket.try_acquire()
    bucket.reconfigure(0.1, 1)  # one token every 10 s
    assert all(10 <= bucket.retry_after() <= 11 for _ in range(100))


# --- ByteBucket -----------------------------------------------------------------------


def test_byte_bucket_full_at_start_takes_within_burst() -> None:
    clock = FakeClock()
    bucket = ByteBucket(rate=100.0, burst=1000, clock=clock, rng=NO_JITTER)
    assert bucket.try_take(400)
    assert bucket.try_take(600)  # exactly what is left
    assert not bucket.try_take(1)
    clock.advance(0.5)  # 50 bytes back
    assert not bucket.try_take(51)
    assert bucket.try_take(50)


def test_byte_bucket_refused_when_not_enough_and_not_full_takes_nothing() -> None:
    clock = FakeClock()
    bucket = ByteBucket(rate=10.0, burst=100, clock=clock, rng=NO_JITTER)
    assert bucket.try_take(60)  # 40 left
    for _ in range(50):
        assert not bucket.try_take(41)
    assert bucket.try_take(40)  # the refusals took nothing
    clock.advance(10.0)  # full again
    assert bucket.try_take(100)


def test_byte_bucket_never_holds_more_than_burst() -> None:
    clock = FakeClock()
    bucket = ByteBucket(rate=1000.0, burst=10, clock=clock, rng=NO_JITTER)
    assert bucket.try_take(4)
    clock.advance(3600)  # an hour at 1000 B/s: still only 10 held
    assert bucket.try_take(6)
    assert bucket.try_take(4)
    assert not bucket.try_take(1)


def test_byte_bucket_oversized_request_passes_only_when_full_then_debt() -> None:
    clock = FakeClock()
    bucket = ByteBucket(rate=1.0, burst=10, clock=clock, rng=NO_JITTER)
    assert bucket.try_take(1)  # not full any more
    assert not bucket.try_take(50)  # larger than the burst, bucket not full: refused
    clock.advance(1.0)  # full again
    assert bucket.try_take(50)  # full: passes, into debt (-40)
    assert not bucket.try_take(1)  # in debt: even a small one is refused
    assert bucket.retry_after(1) == 41
    clock.advance(40.0)  # back to 0
    assert not bucket.try_take(1)
    clock.advance(1.0)  # one byte
    assert bucket.try_take(1)
    clock.advance(10.0)  # full again
    assert bucket.try_take(50)  # an oversized request is slowed, never refused forever


def test_byte_bucket_a_refused_oversized_request_passes_once_full() -> None:
    clock = FakeClock()
    bucket = ByteBucket(rate=10.0, burst=100, clock=clock, rng=NO_JITTER)
    assert bucket.try_take(100)
    assert not bucket.try_take(150)
    wait = bucket.retry_after(150)
    assert wait == 10  # until full, not until 150 bytes (it never holds 150)
    clock.advance(wait - 1)
    assert not bucket.try_take(150)
    clock.advance(1)
    assert bucket.try_take(150)


@pytest.mark.parametrize(
    ("rate", "burst", "taken", "elapsed", "size", "expected"),
    [
        (100.0, 1000, 0, 0.0, 10, 1),  # it would pass now: still at least 1 s
        (100.0, 1000, 1000, 0.0, 100, 1),  # exactly 1 s
        (100.0, 1000, 1000, 0.0, 101, 2),  # a little over 1 s: rounded up
        (100.0, 1000, 1000, 0.0, 1000, 10),
        (100.0, 1000, 1000, 0.0, 50_000, 10),  # larger than the burst: until full
        (100.0, 1000, 1000, 2.5, 1000, 8),  # 750 needed
        (1.0, 10, 10, 0.0, 3, 3),
        (0.5, 10, 10, 0.0, 3, 6),
        (1000.0, 500, 3000, 0.0, 100, 3),  # in debt (-2500): 2600 needed
        (1000.0, 500, 3000, 0.0, 10_000, 3),  # in debt, oversized: until full (3000)
    ],
)
def test_byte_bucket_retry_after(
    rate: float, burst: int, taken: int, elapsed: float, size: int, expected: int
) -> None:
    clock = FakeClock()
    bucket = ByteBucket(rate, burst, clock=clock, rng=NO_JITTER)
    if taken:
        assert bucket.try_take(taken)
    clock.advance(elapsed)
    value = bucket.retry_after(size)
    assert isinstance(value, int)
    assert value == expected
    assert bucket.retry_after(size) == expected  # no jitter, and it takes nothing


def test_byte_bucket_waiting_retry_after_is_enough() -> None:
    rng = random.Random(11)
    for _ in range(500):
        clock = FakeClock(0.0)
        rate = rng.choice([1.0, 3.0, 7.5, 100.0, 1024.0])
        burst = rng.randint(1, 5000)
        bucket = ByteBucket(rate, burst, clock=clock, rng=NO_JITTER)
        bucket.try_take(rng.randint(0, 3 * burst))  # may go into debt (it is full)
        clock.advance(rng.random() * 3)
        size = rng.randint(0, 2 * burst)
        if bucket.try_take(size):
            continue
        wait = bucket.retry_after(size)
        clock.advance(wait - 1)
        if wait > 1:
            assert not bucket.try_take(size), (rate, burst, size, wait)
        clock.advance(1 + 1e-9)
        assert bucket.try_take(size), (rate, burst, size, wait)


# --- BacklogTracker, per tenant -------------------------------------------------------


class TenantCounter:
    """A count source returning the queue's BacklogCount, with a per-tenant breakdown."""

    def __init__(self, tenants: dict[str, int], snapshot: str = "100:100:") -> None:
        self.tenants = tenants
        self.snapshot = snapshot
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> BacklogCount:
        observed = BacklogCount(
            sum(self.tenants.values()), self.snapshot, 0, 0.0, dict(self.tenants)
        )
        if self.gate is not None:
            await self.gate.wait()
        return observed


async def test_backlog_of_is_counted_tenants_plus_recent_local_adds() -> None:
    counter = TenantCounter({"a": 5, "b": 2})
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    assert tracker.of("a") == 0  # nothing counted yet
    tracker.add(1, tenant="a")  # local adds count before the first count
    assert tracker.of("a") == 1
    await tracker.refresh()
    assert (tracker.of("a"), tracker.of("b"), tracker.of("c")) == (5, 2, 0)
    assert tracker.value == 7
    tracker.add(1, xid=100, tenant="a")  # after the snapshot: not in the count
    tracker.add(3, xid=101, tenant="c")
    tracker.add(2, xid=102)  # no tenant: in the total only
    assert (tracker.of("a"), tracker.of("b"), tracker.of("c")) == (6, 2, 3)
    assert tracker.value == 13
    counter.tenants = {"a": 1, "c": 3}  # b exported; 100 and 101 now in the count
    counter.snapshot = "103:103:"
    await tracker.refresh()
    assert (tracker.of("a"), tracker.of("b"), tracker.of("c")) == (1, 0, 3)
    assert tracker.value == 4


async def test_backlog_of_a_commit_seen_by_the_snapshot_is_not_double_counted() -> None:
    # As the instance test above: 105 committed during the count and seen by it, 106
    # committed during it and not seen; per tenant the same must hold.
    counter = TenantCounter({"a": 4, "b": 6}, "101:107:106")
    counter.gate = asyncio.Event()
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    tracker.add(1, xid=100, tenant="a")
    refreshing = asyncio.create_task(tracker.refresh())
    await asyncio.sleep(0)
    tracker.add(1, xid=105, tenant="a")  # in the count's 4
    tracker.add(1, xid=106, tenant="b")  # not in the count's 6
    counter.gate.set()
    await refreshing
    assert (tracker.of("a"), tracker.of("b")) == (4, 7)
    assert tracker.value == 11
    tracker.add(1, xid=104, tenant="a")  # acknowledged late, but the count saw it
    assert tracker.of("a") == 4
    tracker.add(1, xid=107, tenant="a")  # after the snapshot
    assert tracker.of("a") == 5
    assert tracker.value == 12
    assert tracker.of("a") + tracker.of("b") == tracker.value


async def test_backlog_of_keeps_untagged_adds_made_while_the_count_runs() -> None:
    counter = TenantCounter({"a": 3})
    counter.gate = asyncio.Event()
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    tracker.add(2, tenant="a")  # before the count: folded into it
    refreshing = asyncio.create_task(tracker.refresh())
    await asyncio.sleep(0)
    tracker.add(1, tenant="a")  # during it, no xid: kept (overcount, never under)
    counter.gate.set()
    await refreshing
    assert tracker.of("a") == 4
    assert tracker.value == 4


async def test_backlog_of_with_a_count_that_has_no_tenants() -> None:
    tracker = BacklogTracker(Counter(10), refresh_interval_s=60)
    await tracker.refresh()
    assert tracker.of("a") == 0
    tracker.add(2, tenant="a")
    assert tracker.of("a") == 2
    assert tracker.value == 12
    await tracker.refresh()
    assert tracker.of("a") == 0  # folded into the count, which has no breakdown


# --- OverflowGate, per tenant -----------------------------------------------------------


async def tenant_gate_at(
    tenants: dict[str, int], cap: int, policy: OverflowPolicy = OverflowPolicy.REJECT
) -> OverflowGate:
    tracker = BacklogTracker(TenantCounter(tenants), refresh_interval_s=60)
    await tracker.refresh()
    return OverflowGate(tracker, cap, policy, 0.0, seed=1)


async def test_gate_tenant_accepted_under_both() -> None:
    gate = await tenant_gate_at({"a": 2, "b": 3}, cap=10)
    assert gate.decide("a", 3) is Verdict.ACCEPT
    assert gate.decide("b", 4) is Verdict.ACCEPT
    assert gate.decide("new", 1) is Verdict.ACCEPT


async def test_gate_tenant_share_full_while_instance_is_not() -> None:
    gate = await tenant_gate_at({"a": 3, "b": 1}, cap=10)
    assert not gate.saturated
    assert gate.decide("a", 3) is Verdict.REJECT  # reaching the share is enough
    assert gate.decide("a", 2) is Verdict.REJECT
    assert gate.decide("a", 4) is Verdict.ACCEPT
    assert gate.decide("b", 3) is Verdict.ACCEPT  # the others are not affected
    assert gate.decide() is Verdict.ACCEPT
    gate.backlog.add(2, xid=100, tenant="b")  # a local stage counts at once
    assert gate.decide("b", 3) is Verdict.REJECT
    assert gate.decide("a", 4) is Verdict.ACCEPT


@pytest.mark.parametrize(
    ("policy", "verdict"),
    [
        (OverflowPolicy.REJECT, Verdict.REJECT),
        (OverflowPolicy.DROP, Verdict.DROP),
        (OverflowPolicy.SAMPLE, Verdict.SAMPLE_DROP),  # sample rate 0
    ],
)
async def test_gate_tenant_share_full_follows_the_policy(
    policy: OverflowPolicy, verdict: Verdict
) -> None:
    gate = await tenant_gate_at({"a": 5}, cap=100, policy=policy)
    assert {gate.decide("a", 5) for _ in range(50)} == {verdict}
    assert gate.decide("b", 5) is Verdict.ACCEPT


async def test_gate_tenant_max_at_or_above_the_cap_is_instance_only() -> None:
    gate = await tenant_gate_at({"a": 9}, cap=10)
    for share in (10, 11, 1000):
        assert gate.decide("a", share) is Verdict.ACCEPT
    assert gate.decide("a", None) is Verdict.ACCEPT
    assert gate.decide("a", 9) is Verdict.REJECT  # below the cap it is a share
    gate.backlog.add(1, xid=100, tenant="a")  # now the instance is at its cap
    assert gate.saturated
    for share in (10, 11, 1000, None):
        assert gate.decide("a", share) is Verdict.REJECT


async def test_gate_saturated_instance_rejects_every_tenant() -> None:
    gate = await tenant_gate_at({"a": 9, "b": 1}, cap=10)
    assert gate.saturated
    assert gate.decide("b", 5) is Verdict.REJECT  # b is well under its share
    assert gate.decide("c", 5) is Verdict.REJECT


async def test_backlog_own_exports_leave_the_figure_at_once_and_once_only() -> None:
    """ROLE=all: a batch deleted by this process (negative items, with its commit's xid)
    lowers the figure before the next recount, and a recount that saw it gone does not
    subtract it again."""
    counter = TenantCounter({"a": 10}, "200:200:")
    tracker = BacklogTracker(counter, refresh_interval_s=60)
    await tracker.refresh()
    assert tracker.value == 10
    tracker.add(-4, xid=201, tenant="a")  # exported after the count
    assert (tracker.value, tracker.of("a")) == (6, 6)
    tracker.add(-1, xid=150, tenant="a")  # a delete the count already saw gone
    assert tracker.value == 6
    counter.tenants = {"a": 6}
    counter.snapshot = "202:202:"
    await tracker.refresh()
    assert (tracker.value, tracker.of("a")) == (6, 6)
    tracker.add(-50, xid=203, tenant="a")  # another process's rows: never below zero
    assert (tracker.value, tracker.of("a")) == (0, 0)


def test_byte_bucket_retry_after_has_up_to_a_second_of_jitter() -> None:
    clock = FakeClock(0.0)
    waits = set()
    for seed in range(50):
        bucket = ByteBucket(100.0, 1000, clock=clock, rng=random.Random(seed))
        assert bucket.try_take(1000)
        waits.add(bucket.retry_after(450))  # 4.5 s to refill 450 bytes, + [0, 1) s
    assert waits == {5, 6}
