"""The compiled OTLP walker (otelworker/_wire.c) against the Python paths it mirrors:
the same time ranges and the same otel_traces rows, or a refusal (False) that sends the
request down the Python path, never a different answer."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from loadtest.payloads import build_request
from otelworker import otlp
from otelworker.columnar.convert import tables_of, to_tables
from otelworker.exceptions import BadPayload
from otelworker.wire import compiled
from tests.unit.test_columnar_convert import EVERY_VALUE, any_value, kv, traces_request

if compiled is None and os.environ.get("CI") == "true":
    raise RuntimeError("otelworker._wire was not built: CI installs need a C compiler")
pytestmark = pytest.mark.skipif(compiled is None, reason="otelworker._wire not built here")

BIG = 2**64 - 1


def _value(rng: random.Random) -> AnyValue:
    key = rng.choice(list(EVERY_VALUE))
    value = EVERY_VALUE[key][0]
    if key == "s":
        value = rng.choice(["", "x", "ünïcode ✓", "a" * rng.randint(0, 300)])
    elif key == "i":
        value = rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randint(-1000, 1000)])
    return any_value(value)


def _attrs(rng: random.Random, target: Any, most: int = 6) -> None:
    for n in rng.sample(range(40), rng.randint(0, most)):  # distinct keys
        target.add(key=f"k{n}").value.CopyFrom(_value(rng))


def _time(rng: random.Random) -> int:
    return rng.choice([0, 1, BIG, 2**63, 2**63 - 1, rng.randint(1, BIG)])


def random_traces(rng: random.Random) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(rng.randint(0, 3)):
        rs = req.resource_spans.add()
        if rng.random() < 0.8:
            rs.resource.attributes.add(key="service.name").value.CopyFrom(_value(rng))
            _attrs(rng, rs.resource.attributes)
        rs.schema_url = rng.choice(["", "https://opentelemetry.io/schemas/1.26.0"])
        for _ in range(rng.randint(0, 3)):
            ss = rs.scope_spans.add()
            if rng.random() < 0.7:
                ss.scope.name = rng.choice(["", "lib", "ünï"])
                ss.scope.version = rng.choice(["", "1.2"])
            for _ in range(rng.randint(0, 6)):
                span = ss.spans.add()
                if rng.random() < 0.9:
                    span.trace_id = rng.randbytes(rng.choice([16, 16, 0, 3]))
                    span.span_id = rng.randbytes(rng.choice([8, 8, 0]))
                if rng.random() < 0.5:
                    span.parent_span_id = rng.randbytes(8)
                span.trace_state = rng.choice(["", "k=v"])
                span.name = rng.choice(["", "GET /", "ünï ✓"])
                span.kind = rng.choice([0, 1, 2, 3, 4, 5, 6, 99, -3])
                span.start_time_unix_nano = _time(rng)
                span.end_time_unix_nano = _time(rng)
                _attrs(rng, span.attributes)
                span.dropped_attributes_count = rng.choice([0, 3])
                if rng.random() < 0.5:
                    span.status.code = rng.choice([0, 1, 2, 7, -1])
                    span.status.message = rng.choice(["", "bad"])
                for _ in range(rng.choice([0, 0, 1, 3])):
                    event = span.events.add(time_unix_nano=_time(rng), name="e")
                    _attrs(rng, event.attributes, 3)
                for _ in range(rng.choice([0, 0, 1, 2])):
                    link = span.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8))
                    link.trace_state = rng.choice(["", "x=y"])
                    link.flags = rng.choice([0, 257])
                    _attrs(rng, link.attributes, 3)
                span.flags = rng.choice([0, 1, 768])
    return req


def _python_tables(raw: bytes) -> Any:
    return to_tables("traces", otlp.decode("traces", raw), "t")["otel_traces"]


@pytest.mark.parametrize("seed", range(40))
def test_random_requests_give_the_python_rows(seed: int) -> None:
    rng = random.Random(seed)
    raw = random_traces(rng).SerializeToString()
    assert compiled is not None
    assert compiled.span_columns(raw, lambda b: "") is not False  # read, not declined
    assert tables_of("traces", raw, "t")["otel_traces"].equals(_python_tables(raw))


def test_the_benchmark_spans_and_joined_requests_give_the_python_rows() -> None:
    # An object is its requests joined: one request of all their resources.
    raw = b"".join(build_request(64, seed=s).SerializeToString() for s in range(5))
    assert tables_of("traces", raw, "t")["otel_traces"].equals(_python_tables(raw))


def test_every_value_type_is_rendered_as_the_python_path_does() -> None:
    req = traces_request()
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                kept = [a for a in span.attributes if a.key != "dup"]
                del span.attributes[:]
                span.attributes.extend(kept)
    raw = req.SerializeToString()
    assert compiled is not None
    assert compiled.span_columns(raw, lambda b: "?") is not False  # read, not declined
    got = tables_of("traces", raw, "t")["otel_traces"]
    assert got.equals(_python_tables(raw))
    attrs = dict(got.column("SpanAttributes")[0].as_py())
    assert attrs == {key: text for key, (_, text) in EVERY_VALUE.items()}


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = bytes([number << 3 | wire])
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _request_of_span(span: bytes) -> bytes:
    return _field(1, 2, _field(2, 2, _field(2, 2, span)))


@pytest.mark.parametrize(
    ("why", "span"),
    [
        (
            "a repeated attribute key keeps the last value",
            _field(9, 2, kv("a", 1).SerializeToString())
            + _field(9, 2, kv("a", 2).SerializeToString()),
        ),
        ("a name written twice: the last wins", _field(5, 2, b"first") + _field(5, 2, b"second")),
        (
            "a status written twice is merged",
            _field(15, 2, _field(2, 2, b"m")) + _field(15, 2, _field(3, 0, b"\x02")),
        ),
        (
            "a start time as a varint is an unknown field",
            _field(7, 0, b"\x05") + _field(5, 2, b"n"),
        ),
        (
            "an AnyValue with two values set: the last wins",
            _field(
                9, 2, _field(1, 2, b"k") + _field(2, 2, _field(1, 2, b"s") + _field(3, 0, b"\x07"))
            ),
        ),
    ],
)
def test_what_the_walker_does_not_read_goes_the_python_way(why: str, span: bytes) -> None:
    raw = _request_of_span(span)
    assert compiled is not None
    assert compiled.span_columns(raw, lambda b: "") is False, why
    assert tables_of("traces", raw, "t")["otel_traces"].equals(_python_tables(raw)), why


def test_malformed_requests_are_refused_as_the_python_path_refuses_them() -> None:
    good = build_request(3, seed=1).SerializeToString()
    for raw in (good[:-5], good + b"\x0a\xff", _request_of_span(_field(5, 2, b"\xff\xfe"))):
        with pytest.raises(BadPayload):
            tables_of("traces", raw, "t")


def test_time_ranges_match_the_python_path() -> None:
    rng = random.Random(7)
    assert compiled is not None
    for _ in range(300):
        traces = random_traces(rng)
        raw = traces.SerializeToString()
        assert compiled.time_range("traces", raw) == otlp.time_range("traces", traces)
        logs = ExportLogsServiceRequest()
        for _ in range(rng.randint(0, 3)):
            scope = logs.resource_logs.add().scope_logs.add()
            for _ in range(rng.randint(0, 5)):
                record = scope.log_records.add()
                if rng.random() < 0.7:
                    record.time_unix_nano = _time(rng)
                if rng.random() < 0.7:
                    record.observed_time_unix_nano = _time(rng)
        raw = logs.SerializeToString()
        assert compiled.time_range("logs", raw) == otlp.time_range("logs", logs)
        assert otlp.payload_time_range("logs", raw, logs) == otlp.time_range("logs", logs)


def test_time_range_declines_what_it_does_not_read() -> None:
    assert compiled is not None
    twice = _request_of_span(_field(7, 1, (5).to_bytes(8, "little")) * 2)
    assert compiled.time_range("traces", twice) is False
    assert compiled.time_range("traces", b"\x0a\x05\x01") is False  # truncated
    assert compiled.time_range("metrics", b"") is False  # metrics: the Python path
    message = otlp.decode("traces", twice)
    assert otlp.payload_time_range("traces", twice, message) == (5, 5)


def test_an_attribute_list_of_keyvalues_without_values_renders_empty() -> None:
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add(name="x")
    span.attributes.append(KeyValue(key="empty"))
    raw = req.SerializeToString()
    got = tables_of("traces", raw, "t")["otel_traces"]
    assert got.equals(_python_tables(raw))
    assert got.column("SpanAttributes")[0].as_py() == [("empty", "")]


def mutated(rng: random.Random, seed: bytes) -> bytes:
    """``seed`` with one to four random bytes changed, runs deleted, bytes inserted, or a
    byte below 0x80 (often a varint's last) padded (``0x05`` to ``0x85 0x80 0x00``)."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        at = rng.randrange(len(data))
        action = rng.random()
        if action < 0.45:
            data[at] = rng.randrange(256)
        elif action < 0.65:
            del data[at : at + rng.randint(1, 8)]
        elif action < 0.85 or data[at] >= 0x80:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            data[at : at + 1] = bytes([data[at] | 0x80]) + b"\x80" * rng.randint(0, 9) + b"\x00"
    return bytes(data)


def test_mutated_bytes_never_crash_and_never_disagree_with_upb() -> None:
    """The walker runs at the door on every request's bytes: mutated, truncated and
    spliced requests must never crash it, and whatever upb accepts it reads as the Python
    path does, or declines."""
    rng = random.Random(11)
    assert compiled is not None
    seeds = [random_traces(rng).SerializeToString() for _ in range(20)]
    seeds += [build_request(8, seed=s).SerializeToString() for s in range(3)]
    for _ in range(3000):
        raw = mutated(rng, rng.choice(seeds))
        found = compiled.time_range("traces", raw)
        columns = compiled.span_columns(raw, lambda b: "")
        try:
            message = otlp.decode("traces", raw)
        except BadPayload:
            continue
        if found is not False:
            assert found == otlp.time_range("traces", message)
        if columns is not False:
            assert tables_of("traces", raw, "t")["otel_traces"].equals(
                to_tables("traces", message, "t")["otel_traces"]
            )


# --- logs -------------------------------------------------------------------------------


def random_logs(rng: random.Random) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for _ in range(rng.randint(0, 3)):
        rl = req.resource_logs.add()
        if rng.random() < 0.8:
            rl.resource.attributes.add(key="service.name").value.CopyFrom(_value(rng))
            _attrs(rng, rl.resource.attributes)
        rl.schema_url = rng.choice(["", "https://opentelemetry.io/schemas/1.26.0", "ü"])
        for _ in range(rng.randint(0, 3)):
            sl = rl.scope_logs.add()
            if rng.random() < 0.7:
                sl.scope.name = rng.choice(["", "lib", "ünï"])
                sl.scope.version = rng.choice(["", "1.2"])
                _attrs(rng, sl.scope.attributes, 2)
            sl.schema_url = rng.choice(["", "https://x/1.0"])
            for _ in range(rng.randint(0, 6)):
                record = sl.log_records.add()
                if rng.random() < 0.8:
                    record.time_unix_nano = _time(rng)
                if rng.random() < 0.8:
                    record.observed_time_unix_nano = _time(rng)
                record.severity_number = rng.choice([0, 9, 17, 24, 300, -2])
                record.severity_text = rng.choice(["", "INFO", "ÉRREUR"])
                if rng.random() < 0.9:
                    record.body.CopyFrom(_value(rng))
                _attrs(rng, record.attributes)
                record.flags = rng.choice([0, 1, 0x1FF, 2**32 - 1])
                if rng.random() < 0.6:
                    record.trace_id = rng.randbytes(16)
                    record.span_id = rng.randbytes(8)
                record.dropped_attributes_count = rng.choice([0, 2])
                record.event_name = rng.choice(["", "browser.click"])
    return req


def _python_logs(raw: bytes) -> Any:
    return to_tables("logs", otlp.decode("logs", raw), "t")["otel_logs"]


@pytest.mark.parametrize("seed", range(40))
def test_random_log_requests_give_the_python_rows(seed: int) -> None:
    raw = random_logs(random.Random(seed)).SerializeToString()
    assert compiled is not None
    assert compiled.log_columns(raw, lambda b: "") is not False  # read, not declined
    assert tables_of("logs", raw, "t")["otel_logs"].equals(_python_logs(raw))


def _request_of_log(record: bytes) -> bytes:
    return _field(1, 2, _field(2, 2, _field(2, 2, record)))


@pytest.mark.parametrize(
    ("why", "record"),
    [
        ("a body written twice is merged", _field(5, 2, _field(1, 2, b"a")) * 2),
        ("a repeated attribute key", _field(6, 2, kv("a", 1).SerializeToString()) * 2),
        ("flags as a varint is an unknown field", _field(8, 0, b"\x01")),
        ("the reserved field 4", _field(4, 0, b"\x01")),
    ],
)
def test_log_records_the_walker_does_not_read_go_the_python_way(why: str, record: bytes) -> None:
    raw = _request_of_log(record)
    assert compiled is not None
    assert compiled.log_columns(raw, lambda b: "") is False, why
    assert tables_of("logs", raw, "t")["otel_logs"].equals(_python_logs(raw)), why


def test_a_schema_url_that_is_not_utf8_is_refused_as_the_python_path_refuses_it() -> None:
    raw = _field(1, 2, _field(3, 2, b"\xff\xfe") + _field(2, 2, _field(2, 2, b"")))
    with pytest.raises(BadPayload):
        tables_of("logs", raw, "t")


def test_mutated_log_requests_never_crash_and_never_disagree_with_upb() -> None:
    rng = random.Random(12)
    assert compiled is not None
    seeds = [random_logs(rng).SerializeToString() for _ in range(20)]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            at = rng.randrange(len(data))
            if rng.random() < 0.6:
                data[at] = rng.randrange(256)
            else:
                del data[at : at + rng.randint(1, 8)]
        raw = bytes(data)
        columns = compiled.log_columns(raw, lambda b: "")
        try:
            message = otlp.decode("logs", raw)
        except BadPayload:
            continue
        if columns is not False:
            assert tables_of("logs", raw, "t")["otel_logs"].equals(
                to_tables("logs", message, "t")["otel_logs"]
            )
