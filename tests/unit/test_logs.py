"""JSON log lines and the aggregation of per-request events under overload."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest

from otelworker.logs import AggregatedEvents, JSONFormatter, log_event


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    return caplog


def lines(caplog: pytest.LogCaptureFixture, event: str, reason: str | None = None) -> list:
    return [
        r
        for r in caplog.records
        if getattr(r, "event", None) == event
        and (reason is None or getattr(r, "reason", None) == reason)
    ]


def total(caplog: pytest.LogCaptureFixture, event: str, reason: str | None = None) -> int:
    return sum(r.count for r in lines(caplog, event, reason))


# --- JSON lines -----------------------------------------------------------------------


def test_json_formatter_renders_event_reason_and_context(records: pytest.LogCaptureFixture) -> None:
    log_event("rate_limited", "rate limit exceeded", reason="limit_exceeded", signal="traces")
    (record,) = lines(records, "rate_limited")
    out = orjson.loads(JSONFormatter().format(record))
    assert out["event"] == "rate_limited"
    assert out["reason"] == "limit_exceeded"
    assert out["signal"] == "traces"
    assert out["level"] == "info"
    assert out["logger"] == "otelworker"
    assert out["message"] == "rate limit exceeded"
    assert "time" in out


def test_json_formatter_includes_the_exception_class(records: pytest.LogCaptureFixture) -> None:
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError as exc:
        log_event("batch_persist_failed", "failed", reason="ObjectStoreError", exc_info=exc)
    (record,) = lines(records, "batch_persist_failed")
    out = orjson.loads(JSONFormatter().format(record))
    assert out["exc_type"] == "ConnectionResetError"
    assert "peer went away" in out["exc"]


def test_log_event_without_reason_has_no_reason_field(records: pytest.LogCaptureFixture) -> None:
    log_event("service_started", "started")
    (record,) = lines(records, "service_started")
    assert "reason" not in orjson.loads(JSONFormatter().format(record))


# --- AggregatedEvents -----------------------------------------------------------------


def test_first_event_is_logged_at_once(records: pytest.LogCaptureFixture) -> None:
    events = AggregatedEvents(1.0, clock=FakeClock())
    events.emit("rate_limited", "limit_exceeded", "refused", signal="traces", status=429)
    (record,) = lines(records, "rate_limited", "limit_exceeded")
    assert record.count == 1
    assert record.signal == "traces"
    assert record.status == 429
    assert record.levelno == logging.WARNING


def test_a_flood_in_one_window_becomes_one_line_with_its_count(
    records: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    events = AggregatedEvents(1.0, clock=clock)
    for _ in range(1000):
        events.emit("queue_saturated", "queue_full_reject", "refused")
        clock.advance(0.0005)  # 1000 emits in half a second
    assert len(lines(records, "queue_saturated")) == 1  # only the first, at once
    clock.advance(0.6)
    events.flush()
    got = lines(records, "queue_saturated", "queue_full_reject")
    assert [r.count for r in got] == [1, 999]
    assert got[1].window_s == pytest.approx(1.1, abs=0.01)


def test_sustained_flood_costs_about_one_line_per_window_and_counts_everything(
    records: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    events = AggregatedEvents(1.0, clock=clock)
    emits = 0
    for _ in range(10_000):  # 10 s at 1000/s
        events.emit("load_shedding", "queue_full_drop_or_sample", "shed", records=3)
        emits += 1
        clock.advance(0.001)
    events.flush_all()
    got = lines(records, "load_shedding", "queue_full_drop_or_sample")
    assert 10 <= len(got) <= 12, len(got)
    assert sum(r.count for r in got) == emits  # nothing uncounted
    assert all(r.records == 3 for r in got)  # the context travels with the line


def test_pairs_are_aggregated_separately(records: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    events = AggregatedEvents(1.0, clock=clock)
    for _ in range(5):
        events.emit("rate_limited", "limit_exceeded", "refused")
        events.emit("queue_saturated", "queue_full_reject", "refused")
        events.emit("request_refused", "too_large", "refused")
        events.emit("request_refused", "bad_request", "refused")
    # Each pair's first occurrence is logged at once, whatever the others do.
    assert len(lines(records, "rate_limited")) == 1
    assert len(lines(records, "queue_saturated")) == 1
    assert len(lines(records, "request_refused", "too_large")) == 1
    assert len(lines(records, "request_refused", "bad_request")) == 1
    events.flush_all()
    for event, reason in [
        ("rate_limited", "limit_exceeded"),
        ("queue_saturated", "queue_full_reject"),
        ("request_refused", "too_large"),
        ("request_refused", "bad_request"),
    ]:
        assert total(records, event, reason) == 5


def test_a_quiet_window_closes_without_a_line_and_the_next_event_is_prompt(
    records: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    events = AggregatedEvents(1.0, clock=clock)
    events.emit("rate_limited", "limit_exceeded", "refused")
    clock.advance(1.5)
    events.flush()
    assert len(lines(records, "rate_limited")) == 1  # no empty "repeated 0 times" line
    events.emit("rate_limited", "limit_exceeded", "refused")
    assert [r.count for r in lines(records, "rate_limited")] == [1, 1]


def test_an_event_after_the_window_closes_it_without_waiting_for_a_flush(
    records: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    events = AggregatedEvents(1.0, clock=clock)
    for _ in range(3):
        events.emit("rate_limited", "limit_exceeded", "refused")
    clock.advance(1.0)
    events.emit("rate_limited", "limit_exceeded", "refused")  # closes the window
    assert [r.count for r in lines(records, "rate_limited")] == [1, 3]


def test_window_zero_logs_each_event(records: pytest.LogCaptureFixture) -> None:
    events = AggregatedEvents(0.0, clock=FakeClock())
    for _ in range(50):
        events.emit("rate_limited", "limit_exceeded", "refused")
    got = lines(records, "rate_limited", "limit_exceeded")
    assert len(got) == 50
    assert all(r.count == 1 for r in got)
    events.flush_all()
    assert len(lines(records, "rate_limited")) == 50


async def test_run_logs_a_bursts_count_promptly_and_flushes_on_cancel(
    records: pytest.LogCaptureFixture,
) -> None:
    events = AggregatedEvents(0.05)  # the real clock: run() closes windows on its own
    task = asyncio.create_task(events.run())
    try:
        for _ in range(20):
            events.emit("queue_saturated", "queue_full_reject", "refused")
        deadline = time.monotonic() + 5
        while total(records, "queue_saturated") < 20:
            assert time.monotonic() < deadline, "the burst's count was never logged"
            await asyncio.sleep(0.01)
        assert len(lines(records, "queue_saturated")) == 2
        # A second burst still open when the task is cancelled is not lost.
        for _ in range(7):
            events.emit("load_shedding", "queue_full_drop_or_sample", "shed")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert total(records, "load_shedding", "queue_full_drop_or_sample") == 7
    assert total(records, "queue_saturated") == 20
