"""The archive commands' pure parts: times and ages, reading and cutting objects, retry
and rate decisions, the checkpoint, progress, and the order of prune's deletes."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from isal import igzip
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otelworker import otlp
from otelworker.archive.checkpoint import Checkpoint
from otelworker.archive.cli import add_commands
from otelworker.archive.cli import selection as cli_selection
from otelworker.archive.listing import print_batches
from otelworker.archive.manifest import ArchiveIndex, BatchRow, Expired, Totals
from otelworker.archive.progress import Counts, Progress, eta_s, human_bytes, render
from otelworker.archive.prune import (
    ORPHAN_MIN_AGE,
    PruneError,
    gc_orphans,
    prune,
    tenant_prefixes,
)
from otelworker.archive.rate import TokenBucket
from otelworker.archive.reader import decompress, filtered, service_name
from otelworker.archive.replay import Replay, ReplayOptions
from otelworker.archive.selection import Selection, TimeSpec, Window, parse_duration, to_ns
from otelworker.archive.sender import (
    Ack,
    RequestRejected,
    Sender,
    backoff_s,
    parse_retry_after,
    redact,
    rejected_records,
)
from otelworker.archive.split import pieces
from otelworker.exceptions import BadPayload, ObjectStoreError
from otelworker.sinks.base import StoredObject
from otelworker.staging.sql import query

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T0 = to_ns(NOW)
SECOND = 10**9


# --- ages and times ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "3w", "-1h", "h", "1 h 2"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_times_are_rfc3339_or_an_age() -> None:
    assert TimeSpec.parse("2024-05-01T10:00:00Z").resolve(NOW) == datetime(
        2024, 5, 1, 10, tzinfo=UTC
    )
    assert TimeSpec.parse("2024-05-01T12:30:00+02:00").resolve(NOW) == datetime(
        2024, 5, 1, 10, 30, tzinfo=UTC
    )
    assert TimeSpec.parse("2h").resolve(NOW) == NOW - timedelta(hours=2)
    with pytest.raises(ValueError, match="UTC offset"):
        TimeSpec.parse("2024-05-01T10:00:00")
    with pytest.raises(ValueError, match="RFC 3339"):
        TimeSpec.parse("yesterday")


def test_window_is_half_open_and_excludes_unset_times_when_bounded() -> None:
    window = Window(T0, T0 + SECOND)
    assert window.contains(T0) and window.contains(T0 + SECOND - 1)
    assert not window.contains(T0 - 1) and not window.contains(T0 + SECOND)
    assert not Window(until_ns=T0).contains(0)
    assert Window().contains(0)  # unbounded: everything, unset times too


def test_to_ns_is_exact() -> None:
    at = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert to_ns(at) == 1714564800_123456000


# --- objects: decompression, the window, cutting into requests -------------------------------


def test_decompress_by_extension() -> None:
    data = b"\x0a\x00" * 100
    assert decompress("x.binpb.gz", igzip.compress(data)) == data
    assert decompress("x.binpb.zst", zstandard.ZstdCompressor().compress(data)) == data
    assert decompress("x.binpb", data) == data
    # Members and frames one after another: one stream of their joined contents.
    assert decompress("x.binpb.gz", igzip.compress(data) + igzip.compress(b"\x0a\x01z")) == (
        data + b"\x0a\x01z"
    )
    frames = zstandard.ZstdCompressor().compress(data) + zstandard.ZstdCompressor().compress(data)
    assert decompress("x.binpb.zst", frames) == data + data
    with pytest.raises(BadPayload, match=r"x\.binpb\.gz"):
        decompress("x.binpb.gz", b"not gzip")
    with pytest.raises(BadPayload, match="truncated"):
        decompress("x.binpb.zst", zstandard.ZstdCompressor().compress(data)[:-4])


def _named(resource: Any, name: str) -> None:
    attr = resource.attributes.add()
    attr.key = "service.name"
    attr.value.string_value = name


def traces(services: Sequence[str], spans_per_scope: int, scopes: int = 2) -> Any:
    request = trace_service_pb2.ExportTraceServiceRequest()
    for r, name in enumerate(services):
        rs = request.resource_spans.add()
        _named(rs.resource, name)
        rs.schema_url = f"https://schema/{r}"
        for s in range(scopes):
            ss = rs.scope_spans.add()
            ss.scope.name = f"scope-{s}"
            ss.scope.version = "1.0"
            for i in range(spans_per_scope):
                span = ss.spans.add()
                span.span_id = bytes([r, s, i % 256, i // 256, 0, 0, 0, 1])
                span.trace_id = bytes(16)
                span.name = "op" * 10
                span.start_time_unix_nano = T0 + i * SECOND
                span.end_time_unix_nano = T0 + i * SECOND + 1
    return request


def span_ids(request: Any) -> list[bytes]:
    return [
        span.span_id for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans
    ]


def test_filter_spans_by_start_time_keeping_resource_and_scope() -> None:
    request = traces(["a"], 10)
    kept, n = filtered(
        "traces", request.resource_spans[0], Window(T0 + 2 * SECOND, T0 + 5 * SECOND)
    )
    assert n == 6  # 3 per scope
    assert service_name(kept) == "a" and kept.schema_url == "https://schema/0"
    assert [ss.scope.name for ss in kept.scope_spans] == ["scope-0", "scope-1"]
    starts = [s.start_time_unix_nano for ss in kept.scope_spans for s in ss.spans]
    assert sorted(set(starts)) == [T0 + 2 * SECOND, T0 + 3 * SECOND, T0 + 4 * SECOND]
    _, none = filtered("traces", request.resource_spans[0], Window(T0 + 99 * SECOND))
    assert none == 0


def test_filter_logs_by_time_else_observed_time() -> None:
    request = logs_service_pb2.ExportLogsServiceRequest()
    rl = request.resource_logs.add()
    records = rl.scope_logs.add()
    a = records.log_records.add(time_unix_nano=T0, observed_time_unix_nano=T0 - 10 * SECOND)
    a.body.string_value = "by time"
    b = records.log_records.add(observed_time_unix_nano=T0 + 1)
    b.body.string_value = "by observed time"
    c = records.log_records.add(time_unix_nano=T0 - 10 * SECOND, observed_time_unix_nano=T0)
    c.body.string_value = "outside by its time"
    records.log_records.add().body.string_value = "no time at all"
    kept, n = filtered("logs", rl, Window(T0, T0 + SECOND))
    assert n == 2
    assert [r.body.string_value for r in kept.scope_logs[0].log_records] == [
        "by time",
        "by observed time",
    ]


def metrics(points: int, *, name: str = "m") -> Any:
    request = metrics_service_pb2.ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    _named(rm.resource, "svc")
    sm = rm.scope_metrics.add()
    sm.scope.name = "meter"
    metric = sm.metrics.add(name=name, unit="1", description="a counter")
    metric.sum.aggregation_temporality = 2
    metric.sum.is_monotonic = True
    for i in range(points):
        metric.sum.data_points.add(as_int=i, time_unix_nano=T0 + i * SECOND)
    empty = sm.metrics.add(name="empty")
    empty.gauge.SetInParent()
    return request


def test_filter_metric_points_by_time_and_drop_empty_metrics() -> None:
    request = metrics(10)
    kept, n = filtered("metrics", request.resource_metrics[0], Window(T0 + 8 * SECOND))
    assert n == 2
    [metric] = kept.scope_metrics[0].metrics
    assert (metric.name, metric.unit, metric.description) == ("m", "1", "a counter")
    assert metric.sum.is_monotonic and metric.sum.aggregation_temporality == 2
    assert [p.as_int for p in metric.sum.data_points] == [8, 9]


def decoded(signal: str, body: bytes) -> Any:
    return otlp.decode(signal, body)


def test_pieces_pack_whole_resources_up_to_the_limit() -> None:
    request = traces([f"svc-{i}" for i in range(12)], 3)
    entry_size = len(request.resource_spans[0].SerializeToString()) + 2
    out = list(pieces("traces", request, max_bytes=entry_size * 4 + 10))
    assert len(out) == 3
    for piece in out:
        assert len(piece.body) <= entry_size * 4 + 10
        message = decoded("traces", piece.body)
        assert piece.records == otlp.count_records("traces", message)
        # Resources whole: each one with all of its 6 spans.
        assert all(otlp.count_records("traces", _one(rs)) == 6 for rs in message.resource_spans)
    assert Counter(i for p in out for i in span_ids(decoded("traces", p.body))) == Counter(
        span_ids(request)
    )
    # Unlimited: the request itself, byte for byte.
    [whole] = pieces("traces", request, max_bytes=1 << 30)
    assert whole.body == request.SerializeToString()


def _one(resource_spans: Any) -> Any:
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.resource_spans.add().CopyFrom(resource_spans)
    return request


def test_a_resource_larger_than_the_limit_is_split_by_records_keeping_resource_and_scope() -> None:
    request = traces(["small", "huge", "small-2"], 2)
    huge = request.resource_spans[1]
    for ss in huge.scope_spans:
        for i in range(2, 200):
            span = ss.spans.add(name="op" * 10, trace_id=bytes(16))
            span.span_id = i.to_bytes(8, "big")
            span.start_time_unix_nano = T0
    limit = 1500
    assert huge.ByteSize() > limit
    out = list(pieces("traces", request, max_bytes=limit))
    assert len(out) > 5
    assert all(len(p.body) <= limit for p in out)
    seen: Counter[bytes] = Counter()
    for piece in out:
        message = decoded("traces", piece.body)
        for rs in message.resource_spans:
            original = next(r for r in request.resource_spans if r.resource == rs.resource)
            assert rs.schema_url == original.schema_url
            for ss in rs.scope_spans:
                assert ss.scope.name in ("scope-0", "scope-1") and ss.scope.version == "1.0"
                assert ss.spans
        seen.update(span_ids(message))
    assert seen == Counter(span_ids(request))


def test_a_metric_larger_than_the_limit_is_split_by_points_keeping_the_metric() -> None:
    request = metrics(300)
    out = list(pieces("metrics", request, max_bytes=600))
    assert len(out) > 5 and all(len(p.body) <= 600 for p in out)
    values = []
    for piece in out:
        message = decoded("metrics", piece.body)
        assert piece.records == otlp.count_records("metrics", message)
        for sm in message.resource_metrics[0].scope_metrics:
            assert sm.scope.name == "meter"
            for metric in sm.metrics:
                if metric.name == "m":
                    assert metric.sum.is_monotonic and metric.unit == "1"
                    values += [p.as_int for p in metric.sum.data_points]
    assert values == list(range(300))


def test_a_record_larger_than_the_limit_goes_alone() -> None:
    request = traces(["a"], 3, scopes=1)
    request.resource_spans[0].scope_spans[0].spans[1].name = "x" * 5000
    out = list(pieces("traces", request, max_bytes=1000))
    assert [p.records for p in out] == [1, 1, 1]
    assert len(out[1].body) > 1000


def test_pieces_take_only_the_service_and_the_window() -> None:
    request = traces(["a", "b", "a"], 5)
    out = list(
        pieces(
            "traces", request, max_bytes=1 << 20, service="a", window=Window(T0, T0 + 2 * SECOND)
        )
    )
    [piece] = out
    message = decoded("traces", piece.body)
    assert [service_name(rs) for rs in message.resource_spans] == ["a", "a"]
    assert piece.records == 8  # 2 resources x 2 scopes x 2 spans
    assert list(pieces("traces", request, max_bytes=1 << 20, service="nobody")) == []


# --- retries, backoff, rate -------------------------------------------------------------------


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(" 1.5 ") == 1.5
    date = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, NOW) == 30.0
    past = format_datetime(NOW - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(past, NOW) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    assert backoff_s(0, 0.25, 30, rand=lambda: 0.0) == 0.125
    assert backoff_s(0, 0.25, 30, rand=lambda: 1.0) == 0.25
    assert backoff_s(3, 0.25, 30, rand=lambda: 1.0) == 2.0
    assert backoff_s(20, 0.25, 30, rand=lambda: 1.0) == 30.0


def test_redact_drops_user_information() -> None:
    assert redact("https://user:pw@collector:4318/otlp") == "https://collector:4318/otlp"
    assert redact("http://collector:4318") == "http://collector:4318"


def test_partial_success_is_read_from_protobuf_and_json_answers() -> None:
    response = trace_service_pb2.ExportTraceServiceResponse()
    response.partial_success.rejected_spans = 3
    response.partial_success.error_message = "too old"
    assert rejected_records("traces", "application/x-protobuf", response.SerializeToString()) == (
        3,
        "too old",
    )
    body = orjson.dumps({"partialSuccess": {"rejectedLogRecords": "2", "errorMessage": "no"}})
    assert rejected_records("logs", "application/json", body) == (2, "no")
    assert rejected_records("metrics", "application/x-protobuf", b"") == (0, "")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_token_bucket_caps_the_average_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    await bucket.take(100)  # a full bucket: at once
    assert clock.slept == []
    await bucket.take(50)
    assert clock.slept == [0.5]
    await bucket.take(250)  # larger than the bucket: waits for a full one, leaves a debt
    await bucket.take(10)
    assert clock.now == pytest.approx((100 + 50 + 250 + 10 - 100) / 100)


# --- the checkpoint -------------------------------------------------------------------------


async def test_checkpoint_appends_and_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "cp"
    checkpoint = Checkpoint.open(path)
    assert checkpoint.done == set()
    await checkpoint.add("a/1")
    await checkpoint.add("a/2")
    checkpoint.close()
    assert path.read_text() == "a/1\na/2\n"
    assert Checkpoint.open(path).done == {"a/1", "a/2"}


async def test_checkpoint_ignores_a_line_cut_short_and_starts_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "cp"
    path.write_text("a/1\na/2\nb/cut-sho")
    checkpoint = Checkpoint.open(path)
    assert checkpoint.done == {"a/1", "a/2"}
    await checkpoint.add("b/3")
    checkpoint.close()
    assert Checkpoint.open(path).done == {"a/1", "a/2", "b/3"}


# --- progress ---------------------------------------------------------------------------------


def test_progress_line_and_eta() -> None:
    counts = Counts(objects_total=10, bytes_total=1000, objects_done=4, bytes_done=400)
    counts.records, counts.sent_bytes = 2000, 3 * 1024 * 1024
    assert eta_s(counts, 20.0) == 30.0
    line = render(counts, 20.0, bar=False)
    assert line == "replay: 4/10 objects, 2000 records, 3.0 MiB, 100 records/s, ETA 0:00:30"
    bar = render(counts, 20.0, bar=True)
    assert bar.startswith("[##########..............]  40% 4/10 objects")
    assert eta_s(Counts(objects_total=3, bytes_total=10), 1.0) is None
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB"


def test_progress_redraws_one_line_on_a_terminal_and_prints_lines_otherwise() -> None:
    clock = FakeClock()
    tty, log = io.StringIO(), io.StringIO()
    counts = Counts(objects_total=2)
    on_tty = Progress(tty, counts, tty=True, clock=clock)
    in_log = Progress(log, counts, tty=False, interval_s=5, clock=clock)
    for _ in range(3):
        clock.now += 2
        on_tty.update()
        in_log.update()
    on_tty.finish()
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().endswith("\n")
    assert "\n" not in tty.getvalue()[:-1]
    assert log.getvalue().count("\n") == 1  # at 6 s; the next is due at 11 s


# --- replay with fakes --------------------------------------------------------------------------


def row(key: str, signal: str = "traces", size: int = 100) -> BatchRow:
    return BatchRow(uuid.uuid4(), signal, key, 1, 1, size, size, None, None, ("a",), NOW)


class MemoryStore:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.deleted: list[str] = []
        self.events: list[str] = []

    async def put(self, key: str, body: bytes, content_type: str, encoding: str | None) -> None:
        self.objects[key] = body

    async def get(self, key: str) -> bytes:
        if key not in self.objects:
            raise ObjectStoreError(f"get {key}: NoSuchKey")
        return self.objects[key]

    async def delete(self, key: str) -> None:
        self.events.append(f"delete {key}")
        self.deleted.append(key)
        self.objects.pop(key, None)

    async def list(self, prefix: str) -> AsyncIterator[StoredObject]:
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield StoredObject(key, NOW - timedelta(days=400), 1)

    async def close(self) -> None:
        return None


class FakeSender:
    def __init__(self, refuse: str | None = None) -> None:
        self.refuse = refuse
        self.sent: list[tuple[str, int]] = []
        self.tenants: dict[str, set[str | None]] = {}  # object key -> tenants sent with
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(
        self, signal: str, body: bytes, *, object_key: str, tenant: str | None = None
    ) -> Ack:
        self.tenants.setdefault(object_key, set()).add(tenant)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if object_key == self.refuse:
                raise RequestRejected(f"answered 400 for object {object_key}", object_key)
            message = otlp.decode(signal, igzip.decompress(body))
            self.sent.append((object_key, otlp.count_records(signal, message)))
            return Ack()
        finally:
            self.in_flight -= 1


async def rows_of(rows: Sequence[BatchRow]) -> AsyncIterator[BatchRow]:
    for r in rows:
        yield r


def archive(n: int) -> tuple[MemoryStore, list[BatchRow]]:
    objects = {
        f"otel/traces_{i}.binpb.gz": igzip.compress(
            traces([f"s{j}" for j in range(4)], 5).SerializeToString()
        )
        for i in range(n)
    }
    return MemoryStore(objects), [row(key) for key in objects]


async def test_replay_sends_every_object_within_the_concurrency_and_checkpoints_it(
    tmp_path: Path,
) -> None:
    store, rows = archive(6)
    sender = FakeSender()
    checkpoint = Checkpoint.open(tmp_path / "cp")
    await checkpoint.add(rows[0].object_key)  # done by an earlier run
    options = ReplayOptions(max_request_bytes=600, concurrency=3)
    progress = Progress(io.StringIO(), Counts(objects_total=6), tty=False)
    result = await Replay(store, sender, options, progress, checkpoint=checkpoint).run(
        rows_of(rows)
    )
    assert result.ok
    assert {key for key, _ in sender.sent} == {r.object_key for r in rows[1:]}
    assert sum(n for _, n in sender.sent) == 5 * 40
    assert len(sender.sent) > 5  # cut into several requests each
    assert 1 < sender.max_in_flight <= 3
    assert checkpoint.done == {r.object_key for r in rows}
    assert result.counts.objects_skipped == 1 and result.counts.objects_done == 5
    checkpoint.close()
    assert Checkpoint.open(tmp_path / "cp").done == checkpoint.done


async def test_replay_stops_at_a_refusal_and_does_not_checkpoint_that_object(
    tmp_path: Path,
) -> None:
    store, rows = archive(5)
    sender = FakeSender(refuse=rows[2].object_key)
    checkpoint = Checkpoint.open(tmp_path / "cp")
    progress = Progress(io.StringIO(), Counts(objects_total=5), tty=False)
    replay = Replay(store, sender, ReplayOptions(concurrency=1), progress, checkpoint=checkpoint)
    result = await replay.run(rows_of(rows))
    assert isinstance(result.error, RequestRejected)
    assert result.error.object_key == rows[2].object_key
    assert checkpoint.done == {rows[0].object_key, rows[1].object_key}
    checkpoint.close()


async def test_replay_names_an_object_it_cannot_read() -> None:
    store, rows = archive(2)
    del store.objects[rows[1].object_key]
    progress = Progress(io.StringIO(), Counts(objects_total=2), tty=False)
    result = await Replay(store, FakeSender(), ReplayOptions(), progress).run(rows_of(rows))
    assert result.error is not None and rows[1].object_key in str(result.error)
    assert result.counts.objects_done == 1


async def test_dry_run_prints_and_sends_nothing() -> None:
    store, rows = archive(2)
    out = io.StringIO()
    progress = Progress(io.StringIO(), Counts(objects_total=2), tty=False)
    result = await Replay(store, None, ReplayOptions(), progress, out=out).run(rows_of(rows))
    assert result.ok and result.counts.records == 2 * 40
    assert [line.split()[2] for line in out.getvalue().splitlines()] == [r.object_key for r in rows]


# --- prune and gc-orphans with fakes -------------------------------------------------------------


class FakeIndex:
    """Manifest rows by key with their created_at; expire() 'commits' at once.

    ``tenants`` names rows' tenants; a row not in it has none (DEFAULT_TENANT's).
    """

    def __init__(
        self,
        rows: dict[str, datetime],
        store: MemoryStore,
        tenants: dict[str, str] | None = None,
        default_tenant: str = "default",
    ) -> None:
        self.rows = rows
        self.store = store
        self.tenants = tenants or {}
        self.default_tenant = default_tenant

    def _whose(self, key: str, tenant: str | None) -> bool:
        return tenant is None or self.tenants.get(key, self.default_tenant) == tenant

    async def manifest_keys_among(self, keys: Sequence[str]) -> set[str]:
        return set(keys) & set(self.rows)

    async def expire(
        self, signal: str, before: datetime, limit: int, tenant: str | None = None
    ) -> Expired:
        keys = sorted(
            k
            for k, at in self.rows.items()
            if signal in k and at < before and self._whose(k, tenant)
        )[:limit]
        for key in keys:
            del self.rows[key]
            self.store.events.append(f"commit {key}")
        return Expired(keys, 10 * len(keys))

    async def expired_totals(self, before: datetime, tenant: str | None = None) -> Totals:
        keys = [k for k, at in self.rows.items() if at < before and self._whose(k, tenant)]
        return Totals(len(keys), 0, 10 * len(keys))


def prune_fixture() -> tuple[MemoryStore, FakeIndex]:
    store = MemoryStore({f"otel/traces_{i}": b"x" for i in range(5)})
    store.objects["otel/logs_0"] = b"x"
    store.objects["otel/orphan"] = b"x"
    ages = {f"otel/traces_{i}": NOW - timedelta(days=40 if i < 3 else 1) for i in range(5)}
    ages["otel/logs_0"] = NOW - timedelta(days=50)
    return store, FakeIndex(ages, store)


async def test_prune_commits_the_rows_before_deleting_their_objects() -> None:
    store, index = prune_fixture()
    result = await prune(
        index, store, older_than=timedelta(days=30), prefix="otel", now=NOW, chunk_rows=2
    )
    assert (result.rows, result.objects, result.orphans) == (4, 4, 1)
    assert sorted(index.rows) == ["otel/traces_3", "otel/traces_4"]
    assert sorted(store.objects) == ["otel/traces_3", "otel/traces_4"]
    for key in ("otel/traces_0", "otel/traces_1", "otel/traces_2", "otel/logs_0"):
        assert store.events.index(f"commit {key}") < store.events.index(f"delete {key}")


async def test_prune_dry_run_deletes_nothing() -> None:
    store, index = prune_fixture()
    result = await prune(
        index, store, older_than=timedelta(days=30), prefix="otel", now=NOW, dry_run=True
    )
    assert (result.rows, result.bytes, result.orphans) == (4, 40, 1)
    assert store.deleted == [] and len(index.rows) == 6


async def test_prune_that_cannot_delete_an_object_leaves_an_orphan_never_a_dangling_row() -> None:
    store, index = prune_fixture()

    async def broken(key: str) -> None:
        raise ObjectStoreError(f"delete {key}: AccessDenied")

    store.delete = broken  # type: ignore[method-assign]
    with pytest.raises(PruneError, match="orphans"):
        await prune(index, store, older_than=timedelta(days=30), prefix="otel", now=NOW)
    assert all(key in store.objects for key in index.rows)  # no row without its object


async def test_gc_orphans_never_takes_a_young_object() -> None:
    store, index = prune_fixture()
    found = await gc_orphans(store, index, prefix="otel", older_than=timedelta(days=500), now=NOW)
    assert found == 0  # the orphan is 400 days old
    with pytest.raises(ValueError, match="at least 3600"):  # prune's least age, an hour
        await gc_orphans(store, index, prefix="otel", older_than=timedelta(0), now=NOW)
    assert "otel/orphan" in store.objects
    found = await gc_orphans(store, index, prefix="otel", older_than=ORPHAN_MIN_AGE, now=NOW)
    assert found == 1 and "otel/orphan" not in store.objects
    assert timedelta(hours=1) == ORPHAN_MIN_AGE


# --- batches ----------------------------------------------------------------------------------


async def test_batches_json_lines_end_with_the_totals_and_the_table_too() -> None:
    rows = [row("otel/a", size=10), row("otel/b", "logs", size=32)]
    out = io.StringIO()
    totals = await print_batches(rows_of(rows), out, json=True)
    *lines, last = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["object_key"] for line in lines] == ["otel/a", "otel/b"]
    assert last == {"totals": {"objects": 2, "records": 2, "bytes": 42}}
    assert totals == Totals(2, 2, 42)
    out = io.StringIO()
    await print_batches(rows_of(rows), out, json=False)
    table = out.getvalue().splitlines()
    assert table[0].split() == [
        "KEY",
        "SIGNAL",
        "RECORDS",
        "BYTES",
        "MIN",
        "TIME",
        "MAX",
        "TIME",
        "TENANT",
        "SERVICES",
    ]
    assert table[1].split()[:4] == ["otel/a", "traces", "1", "10"]
    assert table[-1] == "total: 2 objects, 2 records, 42 bytes (42 B) stored"


# --- tenants: the options, the selection's parameters, what each command does with them --------


def archive_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otelworker")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize(
    "argv",
    [
        ["batches"],
        ["replay", "--dry-run"],
        ["prune", "--older-than", "30d"],
    ],
)
def test_tenant_option_selects_one_tenant_or_every_tenant(argv: list[str]) -> None:
    args = archive_parser().parse_args([*argv, "--tenant", "team-a"])
    assert args.tenant == "team-a"
    assert archive_parser().parse_args(argv).tenant is None
    if argv[0] != "prune":
        assert cli_selection(args, NOW).tenant == "team-a"
        assert cli_selection(archive_parser().parse_args(argv), NOW).tenant is None


@pytest.mark.parametrize("command", ["batches", "replay", "prune"])
@pytest.mark.parametrize("name", ["", "a/b", "..", "-x", ".x", "a b", "a=b", "x" * 65, "ü"])
def test_an_invalid_tenant_is_a_usage_error_naming_the_option(
    command: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--older-than", "30d"] if command == "prune" else []
    with pytest.raises(SystemExit) as exited:
        archive_parser().parse_args([command, *extra, f"--tenant={name}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tenant: not a tenant name" in err, err


def test_gc_orphans_takes_no_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        archive_parser().parse_args(["gc-orphans", "--tenant", "team-a"])
    assert exited.value.code == 2
    assert "--tenant" in capsys.readouterr().err


def test_replay_tenant_header_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = archive_parser().parse_args(["replay", "--to", "http://t:4318"])
    assert (args.tenant_header, args.no_tenant_header) == ("X-Scope-OrgID", False)
    args = archive_parser().parse_args(["replay", "--tenant-header", "X-Tenant"])
    assert args.tenant_header == "X-Tenant"
    assert archive_parser().parse_args(["replay", "--no-tenant-header"]).no_tenant_header
    # The existing --header (NAME=VALUE, repeatable) stays as it was.
    args = archive_parser().parse_args(
        ["replay", "--header", "Authorization=Bearer a=b", "--header", "X-A= 1 "]
    )
    assert args.header == [("Authorization", "Bearer a=b"), ("X-A", "1")]
    for argv in (
        ["replay", "--tenant-header", "X-Tenant", "--no-tenant-header"],
        ["replay", "--tenant-header", "X Tenant"],
        ["replay", "--tenant-header", "X-Tenant:"],
    ):
        with pytest.raises(SystemExit) as exited:
            archive_parser().parse_args(argv)
        assert exited.value.code == 2, argv
    err = capsys.readouterr().err
    assert "not allowed with argument --tenant-header" in err, err
    assert "argument --tenant-header: not an HTTP header name" in err, err


class RecordingIndex(ArchiveIndex):
    """The real adapter with the database replaced by canned answers; records each call."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__(None, default_tenant="main")  # type: ignore[arg-type]
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.canned = rows or []

    async def _fetch(self, name: str, *args: Any) -> list[Any]:
        # Every placeholder of the query has its argument, and no more.
        placeholders = {int(n) for n in re.findall(r"\$(\d+)", query(name))}
        assert placeholders == set(range(1, len(args) + 1)), (name, placeholders, len(args))
        self.calls.append((name, args))
        if name == "archive_batches":
            return self.canned if args[0] == "traces" else []
        if name == "archive_totals":
            return [(len(self.canned), 0, 0)]
        if name == "archive_expired_totals":
            return [(0, 0)]
        return []


def manifest_row(key: str, tenant: str) -> dict[str, Any]:
    return {
        "batch_id": uuid.uuid4(),
        "signal": "traces",
        "object_key": key,
        "item_count": 1,
        "record_count": 2,
        "compressed_bytes": 3,
        "raw_bytes": 4,
        "min_time": None,
        "max_time": None,
        "service_names": ["a"],
        "created_at": NOW,
        "tenant": tenant,
    }


async def test_selection_passes_the_tenant_and_the_default_tenant_to_every_query() -> None:
    index = RecordingIndex([manifest_row("otel/team-a/k", "team-a")])
    chosen = Selection(signals=("traces", "logs"), service="svc", tenant="team-a")
    rows = [r async for r in index.rows(chosen)]
    assert [(r.object_key, r.tenant) for r in rows] == [("otel/team-a/k", "team-a")]
    batches = [args for name, args in index.calls if name == "archive_batches"]
    assert [args[0] for args in batches] == ["traces", "logs"]  # one signal at a time
    assert all(args[3] == "svc" and args[7:] == ("team-a", "main") for args in batches)

    await index.totals(chosen)
    totals = [args for name, args in index.calls if name == "archive_totals"]
    assert [args[5:] for args in totals] == [("team-a", "main")] * 2

    # Without --tenant: every tenant's rows (NULL), with the default for rows without one.
    index = RecordingIndex()
    [_ async for _ in index.rows(Selection())]
    await index.totals(Selection())
    assert {args[7:] for name, args in index.calls if name == "archive_batches"} == {(None, "main")}
    assert {args[5:] for name, args in index.calls if name == "archive_totals"} == {(None, "main")}


async def test_prune_queries_take_the_tenant() -> None:
    index = RecordingIndex()
    await index.expire("logs", NOW, 10, "team-b")
    await index.expired_totals(NOW, "team-b")
    await index.expire("logs", NOW, 10)
    await index.expired_totals(NOW)
    assert index.calls == [
        ("archive_expire", ("logs", NOW, 10, "team-b", "main", False)),
        ("archive_expired_totals", (NOW, "team-b", "main", False)),
        ("archive_expire", ("logs", NOW, 10, None, "main", False)),
        ("archive_expired_totals", (NOW, None, "main", False)),
    ]


def test_the_tenant_filter_keeps_the_index_and_resolves_rows_without_a_tenant() -> None:
    """The tenant is one more filter in each archive query (the signal and created_at, the
    index's columns, lead as before), and a row without a tenant is the default's."""
    for name, tenant, default in (
        ("archive_batches", 8, 9),
        ("archive_totals", 6, 7),
        ("archive_expire", 4, 5),
        ("archive_expired_totals", 2, 3),
    ):
        sql = " ".join(query(name).split())
        assert (
            f"(${tenant}::text IS NULL OR tenant = ${tenant}"
            f" OR (tenant IS NULL AND ${tenant} = ${default}::text))"
        ) in sql, name
        if name != "archive_expired_totals":
            assert "WHERE signal = $1" in sql, name
    assert "coalesce(tenant, $9::text) AS tenant" in query("archive_batches")


def test_batch_row_reads_its_tenant() -> None:
    assert BatchRow.from_row(manifest_row("otel/team-a/k", "team-a")).tenant == "team-a"


async def test_batches_show_each_rows_tenant_in_the_table_and_the_json() -> None:
    rows = [
        replace(row("otel/year=2024/a"), tenant="default"),
        replace(row("otel/a-long-tenant-name/year=2024/b", "logs"), tenant="a-long-tenant-name"),
    ]
    out = io.StringIO()
    await print_batches(rows_of(rows), out, json=True)
    *lines, _ = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["tenant"] for line in lines] == ["default", "a-long-tenant-name"]
    out = io.StringIO()
    await print_batches(rows_of(rows), out, json=False)
    header, first, second, _ = out.getvalue().splitlines()
    column = header.index("TENANT")
    assert first[column:].split()[0] == "default"
    assert second[column:].split() == ["a-long-tenant-name", "a"]  # then the services
    assert header.index("SERVICES") == column + len("a-long-tenant-name") + 2


def test_request_headers_name_the_tenant_unless_told_not_to_or_overridden() -> None:
    base = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
    sender = Sender("http://t:4318", {}, concurrency=1, tenant_header="X-Scope-OrgID")
    assert sender.request_headers("team-a") == {**base, "X-Scope-OrgID": "team-a"}
    assert sender.request_headers(None) == base
    assert Sender("http://t", {}, concurrency=1).request_headers("team-a") == base
    # An operator's --header of that name (any case) is sent instead, on every request.
    overridden = Sender(
        "http://t", {"x-scope-orgid": "fixed"}, concurrency=1, tenant_header="X-Scope-OrgID"
    )
    assert overridden.tenant_header is None
    assert overridden.request_headers("team-a") == base
    other = Sender("http://t", {"Authorization": "Bearer x"}, concurrency=1, tenant_header="X-T")
    assert other.request_headers("team-b") == {**base, "X-T": "team-b"}


async def test_replay_sends_each_request_with_its_objects_tenant() -> None:
    store, rows = archive(4)
    rows = [replace(r, tenant=t) for r, t in zip(rows, ["a", "b", "a", "default"], strict=True)]
    sender = FakeSender()
    options = ReplayOptions(max_request_bytes=600, concurrency=2)
    progress = Progress(io.StringIO(), Counts(objects_total=4), tty=False)
    result = await Replay(store, sender, options, progress).run(rows_of(rows))
    assert result.ok
    assert sender.tenants == {r.object_key: {r.tenant} for r in rows}


def test_tenant_prefixes() -> None:
    assert tenant_prefixes("otel", None, "default") == ["otel/"]
    assert tenant_prefixes("/otel/", "team-a", "default") == ["otel/team-a/"]
    # The default tenant's objects from before tenants have no tenant segment.
    assert tenant_prefixes("otel", "default", "default") == ["otel/default/", "otel/year="]
    assert tenant_prefixes("", None, "default") == [""]
    assert tenant_prefixes("", "main", "main") == ["main/", "year="]


def two_layouts() -> MemoryStore:
    """Objects of before tenants ({prefix}/year=...) and after ({prefix}/{tenant}/year=...)."""
    part = "year=2024/month=05/day=01/hour=12/minute=00"
    return MemoryStore(
        {
            f"otel/{part}/traces_old.binpb.gz": b"x",  # a row names it
            f"otel/{part}/traces_old-orphan.binpb.gz": b"x",
            f"otel/team-a/{part}/traces_a.binpb.gz": b"x",  # a row names it
            f"otel/team-a/{part}/traces_a-orphan.binpb.gz": b"x",
            f"otel/default/{part}/logs_d-orphan.binpb.gz": b"x",
            f"otel/team-b/{part}/logs_b-orphan.binpb.gz": b"x",
            f"otelx/{part}/traces_elsewhere.binpb.gz": b"x",  # not under the prefix
            f"other/team-a/{part}/traces_elsewhere.binpb.gz": b"x",
        }
    )


async def test_gc_orphans_finds_orphans_of_both_layouts_under_the_prefix_and_nothing_else() -> None:
    store = two_layouts()
    part = "year=2024/month=05/day=01/hour=12/minute=00"
    named = {f"otel/{part}/traces_old.binpb.gz": NOW, f"otel/team-a/{part}/traces_a.binpb.gz": NOW}
    index = FakeIndex(dict(named), store)
    found = await gc_orphans(store, index, prefix="otel", older_than=timedelta(hours=1), now=NOW)
    assert found == 4
    assert sorted(store.deleted) == sorted(
        [
            f"otel/{part}/traces_old-orphan.binpb.gz",
            f"otel/team-a/{part}/traces_a-orphan.binpb.gz",
            f"otel/default/{part}/logs_d-orphan.binpb.gz",
            f"otel/team-b/{part}/logs_b-orphan.binpb.gz",
        ]
    )
    assert sorted(store.objects) == sorted(
        [
            *named,
            f"otelx/{part}/traces_elsewhere.binpb.gz",
            f"other/team-a/{part}/traces_elsewhere.binpb.gz",
        ]
    )


async def test_prune_of_one_tenant_deletes_its_rows_and_sweeps_only_its_keys() -> None:
    store = two_layouts()
    part = "year=2024/month=05/day=01/hour=12/minute=00"
    old, a = f"otel/{part}/traces_old.binpb.gz", f"otel/team-a/{part}/traces_a.binpb.gz"
    ages = {old: NOW - timedelta(days=40), a: NOW - timedelta(days=40)}

    index = FakeIndex(dict(ages), store, tenants={a: "team-a"})  # old: no tenant, default's
    result = await prune(
        index, store, older_than=timedelta(days=30), prefix="otel", now=NOW, tenant="team-a"
    )
    assert (result.rows, result.orphans) == (1, 1)
    assert sorted(store.deleted) == sorted([a, f"otel/team-a/{part}/traces_a-orphan.binpb.gz"])
    assert list(index.rows) == [old]

    # The default tenant: its new objects' keys and those from before tenants.
    store.deleted.clear()
    dry = await prune(
        index,
        store,
        older_than=timedelta(days=30),
        prefix="otel",
        now=NOW,
        tenant="default",
        dry_run=True,
    )
    assert (dry.rows, dry.orphans, store.deleted) == (1, 2, [])
    result = await prune(
        index, store, older_than=timedelta(days=30), prefix="otel", now=NOW, tenant="default"
    )
    assert (result.rows, result.orphans) == (1, 2)
    assert sorted(store.deleted) == sorted(
        [
            old,
            f"otel/{part}/traces_old-orphan.binpb.gz",
            f"otel/default/{part}/logs_d-orphan.binpb.gz",
        ]
    )
    assert f"otel/team-b/{part}/logs_b-orphan.binpb.gz" in store.objects
