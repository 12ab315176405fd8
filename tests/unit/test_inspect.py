"""The door's compiled check (``otelworker._wire.inspect``) against upb and the Python
readers it replaces: whatever it accepts, upb accepts, with the same record count, time
range and service names; whatever upb refuses, it declines (False), so that upb names the
fault. Never a different answer."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from loadtest.payloads import build_logs_request, build_request
from otelworker import otlp, wire
from otelworker.exceptions import BadPayload
from otelworker.ingress import intake as intake_module
from otelworker.ingress.intake import Intake, Refused
from otelworker.wire import compiled
from tests.unit.test_columnar_convert import kv, metrics_request
from tests.unit.test_wire import _field, _time, _varint, mutated, random_logs, random_traces

if compiled is None and os.environ.get("CI") == "true":
    raise RuntimeError("otelworker._wire was not built: CI installs need a C compiler")
pytestmark = pytest.mark.skipif(compiled is None, reason="otelworker._wire not built here")


def python_facts(signal: str, raw: bytes) -> tuple[int, Any, set[str]] | None:
    """What the door read before the walker: upb's decode and the Python readers; None
    where upb refuses the bytes."""
    try:
        message = otlp.decode(signal, raw)
    except BadPayload:
        return None
    return (
        otlp.count_records(signal, message),
        otlp.time_range(signal, message),
        otlp.service_names(signal, message),
    )


def inspected(signal: str, raw: bytes) -> tuple[int, Any, set[str]] | None:
    assert compiled is not None
    found = compiled.inspect(signal, raw)
    if found is False:
        return None
    records, span, names = found
    return records, span, set(names)


def random_metrics(rng: random.Random) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    for _ in range(rng.randint(0, 3)):
        rm = req.resource_metrics.add()
        if rng.random() < 0.8:
            rm.resource.attributes.append(kv("service.name", rng.choice(["a", "b", "ü"])))
        for _ in range(rng.randint(0, 2)):
            sm = rm.scope_metrics.add()
            sm.scope.name = rng.choice(["", "meter"])
            for _ in range(rng.randint(0, 4)):
                metric = sm.metrics.add(name=rng.choice(["m", "ünï"]), unit="1")
                kind = rng.choice(["gauge", "sum", "histogram", "exp", "summary", None])
                for _ in range(rng.randint(0, 4)):
                    t = _time(rng)
                    if kind == "gauge":
                        metric.gauge.data_points.add(time_unix_nano=t, as_double=1.5)
                    elif kind == "sum":
                        metric.sum.data_points.add(time_unix_nano=t, as_int=-3)
                    elif kind == "histogram":
                        point = metric.histogram.data_points.add(time_unix_nano=t, count=3)
                        point.bucket_counts.extend([1, 2, rng.randint(0, 2**64 - 1)])
                        point.explicit_bounds.extend([0.5, 2.0])
                    elif kind == "exp":
                        point = metric.exponential_histogram.data_points.add(time_unix_nano=t)
                        point.positive.bucket_counts.extend([rng.randint(0, 300), 2])
                    elif kind == "summary":
                        point = metric.summary.data_points.add(time_unix_nano=t, count=1)
                        point.quantile_values.add(quantile=0.5, value=2.0)
    return req


GENERATORS = {"traces": random_traces, "logs": random_logs, "metrics": random_metrics}


@pytest.mark.parametrize("signal", ["traces", "logs", "metrics"])
def test_random_requests_give_upbs_facts_and_are_read_here(signal: str) -> None:
    rng = random.Random(signal)
    read = 0
    for _ in range(300):
        raw = GENERATORS[signal](rng).SerializeToString()
        got = inspected(signal, raw)
        want = python_facts(signal, raw)
        assert want is not None
        if got is not None:
            read += 1
            assert got == want
    assert read == 300  # well-formed requests are all read here, none declined


def test_the_benchmark_requests_and_every_metric_type_are_read_here() -> None:
    cases = [
        ("traces", build_request(100).SerializeToString()),
        ("traces", build_request(512, service="ünïcode").SerializeToString()),
        ("logs", build_logs_request(300).SerializeToString()),
        ("metrics", metrics_request().SerializeToString()),
    ]
    for signal, raw in cases:
        got = inspected(signal, raw)
        assert got is not None, signal
        assert got == python_facts(signal, raw)
    assert inspected("metrics", cases[3][1]) == (
        14,
        inspected("metrics", cases[3][1])[1],
        {"svc0", "svc1"},
    )  # type: ignore[index]


def _request_of_span(span: bytes) -> bytes:
    return _field(1, 2, _field(2, 2, _field(2, 2, span)))


def _nested_kvlist(depth: int) -> bytes:
    value = _field(1, 2, b"leaf")  # AnyValue{string_value}
    for _ in range(depth):
        value = _field(6, 2, _field(1, 2, _field(1, 2, b"k") + _field(2, 2, value)))
    return _field(9, 2, _field(1, 2, b"attr") + _field(2, 2, value))


BAD_UTF8 = {
    "a lone continuation byte": b"\x80",
    "an overlong slash": b"\xc0\xaf",
    "an overlong three-byte form": b"\xe0\x80\xaf",
    "a surrogate": b"\xed\xa0\x80",
    "past U+10FFFF": b"\xf4\x90\x80\x80",
    "a truncated sequence": b"ok\xe2\x82",
    "0xFF": b"\xff",
}


@pytest.mark.parametrize("why", list(BAD_UTF8))
def test_invalid_utf8_anywhere_is_declined_and_refused_by_upb(why: str) -> None:
    bad = BAD_UTF8[why]
    deep = _nested_kvlist(5).replace(b"leaf", bad[:4].ljust(4, b"a"))
    for raw in (
        _request_of_span(_field(5, 2, b"name " + bad)),  # a span name
        _request_of_span(_field(11, 2, _field(2, 2, b"e" + bad))),  # an event's name
        _request_of_span(deep),  # a string five kvlists down
        _field(1, 2, _field(3, 2, bad)),  # a schema URL
    ):
        assert inspected("traces", raw) is None, why
        assert python_facts("traces", raw) is None, why


def test_valid_multibyte_utf8_is_read() -> None:
    for text in ("é", "€", "𝄞", "\U0010ffff", "\ud7ff", "\ue000", "a" * 17 + "ü" + "b" * 9):
        raw = _request_of_span(
            _field(5, 2, text.encode()) + _field(7, 1, (9).to_bytes(8, "little"))
        )
        assert inspected("traces", raw) == (1, (9, 9), set())


@pytest.mark.parametrize(
    ("why", "span"),
    [
        ("a start time as a varint: upb keeps it as an unknown field", _field(7, 0, b"\x05")),
        ("a start time twice: the last wins", _field(7, 1, b"\x01" * 8) * 2),
        ("a group", bytes([9 << 3 | 3]) + bytes([9 << 3 | 4])),
        ("a name as a varint", _field(5, 0, b"\x01")),
        ("nested past the walker's depth", _nested_kvlist(40)),
    ],
)
def test_what_it_is_not_sure_of_goes_to_upb(why: str, span: bytes) -> None:
    raw = _request_of_span(span)
    assert compiled is not None
    assert compiled.inspect("traces", raw) is False, why


def _padded(value: int, size: int) -> bytes:
    """``value`` as a varint of exactly ``size`` bytes (zero-padded: legal, up to a point)."""
    return bytes(((value >> (7 * i)) & 0x7F) | (0x80 if i < size - 1 else 0) for i in range(size))


def test_padded_tags_and_lengths_are_read_as_far_as_upb_reads_them() -> None:
    """upb takes a tag or a length of at most 5 bytes, a value of at most 10."""
    span = _field(7, 1, (7).to_bytes(8, "little"))
    scope = _field(2, 2, _field(2, 2, span))
    for size in range(1, 12):
        for what, raw, most in (
            ("tag", _padded(1 << 3 | 2, size) + _varint(len(scope)) + scope, 5),
            ("length", b"\x0a" + _padded(len(scope), size) + scope, 5),
            ("value", _request_of_span(span + b"\x30" + _padded(2, size)), 10),
        ):
            want = python_facts("traces", raw)
            assert inspected("traces", raw) == want, (what, size)
            assert (want is not None) is (size <= most), (what, size)


def test_a_declined_request_is_still_staged_with_upbs_facts() -> None:
    twice = _request_of_span(_field(7, 1, (5).to_bytes(8, "little")) * 2)
    decoded = Intake.decode("traces", twice, json=False)
    assert (decoded.records, decoded.span, decoded.services) == (1, (5, 5), ())
    with pytest.raises(Refused) as refused:
        Intake.decode("traces", _request_of_span(_field(5, 2, b"\xff")), json=False)
    assert refused.value.reason == "bad_request" and "invalid traces protobuf" in str(refused.value)


def test_the_door_reads_the_same_with_and_without_the_walker(monkeypatch: Any) -> None:
    rng = random.Random(5)
    raws = [(s, GENERATORS[s](rng).SerializeToString()) for s in GENERATORS for _ in range(30)]
    fast = [Intake.decode(signal, raw, json=False) for signal, raw in raws]
    monkeypatch.setattr(intake_module, "compiled", None)
    slow = [Intake.decode(signal, raw, json=False) for signal, raw in raws]
    assert fast == slow


def test_unknown_fields_are_skipped_as_upb_keeps_them() -> None:
    unknown = (
        _varint(99 << 3 | 2)
        + _varint(len(b"\xff\xfe any bytes"))
        + b"\xff\xfe any bytes"
        + _varint(98 << 3 | 0)
        + _varint(2**40)
        + _varint(5000 << 3 | 5)
        + b"abcd"
    )
    raw = _request_of_span(_field(7, 1, (3).to_bytes(8, "little")) + unknown) + unknown
    assert inspected("traces", raw) == python_facts("traces", raw) == (1, (3, 3), set())


def test_metric_data_members_and_packed_scalars() -> None:
    point = _field(3, 1, (4).to_bytes(8, "little"))
    gauge = _field(5, 2, _field(1, 2, point))
    total = _field(7, 2, _field(1, 2, point + point))
    request = lambda metric: _field(1, 2, _field(2, 2, _field(2, 2, metric)))  # noqa: E731
    # The same member twice is merged: every point counts.
    assert inspected("metrics", request(gauge + gauge)) == python_facts(
        "metrics", request(gauge + gauge)
    )
    # Two members: protobuf keeps the last; declined, upb counts it.
    assert inspected("metrics", request(gauge + total)) is None
    assert python_facts("metrics", request(gauge + total)) == (1, (4, 4), set())
    # Histogram bucket counts unpacked (one fixed64 each) and packed, and a bad packing.
    hist_point = _field(3, 1, (8).to_bytes(8, "little"))
    unpacked = hist_point + _field(6, 1, b"\x01" * 8) * 2
    packed = hist_point + _field(6, 2, b"\x01" * 16)
    misaligned = hist_point + _field(6, 2, b"\x01" * 12)
    for body, ok in ((unpacked, True), (packed, True), (misaligned, False)):
        raw = request(_field(9, 2, _field(1, 2, body)))
        assert (inspected("metrics", raw) is not None) is ok
        assert (python_facts("metrics", raw) is not None) is ok
        if ok:
            assert inspected("metrics", raw) == python_facts("metrics", raw)


def test_the_schema_is_the_installed_descriptors() -> None:
    messages, roots = wire.schema()
    names = {m.full_name for m in wire.ROOTS}
    assert len(messages) > 20 and len(set(roots)) == 3 and names
    kinds = {kind for _role, _a, _b, _oneof, fields in messages for _n, kind, _r, _c in fields}
    assert kinds == {
        wire.K_VARINT,
        wire.K_FIXED64,
        wire.K_FIXED32,
        wire.K_STRING,
        wire.K_BYTES,
        wire.K_MESSAGE,
    }
    roles = [m[0] for m in messages]
    for role in (wire.R_SPAN, wire.R_LOG, wire.R_RESOURCE, wire.R_METRIC):
        assert roles.count(role) == 1
    assert roles.count(wire.R_POINT) == 4
    # Every string field is checked: a new one in a later opentelemetry-proto is too.
    strings = sum(
        1
        for _role, _a, _b, _o, fields in messages
        for _n, kind, _r, _c in fields
        if kind == wire.K_STRING
    )
    assert strings == _count_string_fields()


def _count_string_fields() -> int:
    seen: set[str] = set()
    stack = list(wire.ROOTS)
    count = 0
    while stack:
        descriptor = stack.pop()
        if descriptor.full_name in seen:
            continue
        seen.add(descriptor.full_name)
        for field in descriptor.fields:
            count += field.type == FieldDescriptor.TYPE_STRING
            if field.message_type is not None:
                stack.append(field.message_type)
    return count


@pytest.mark.parametrize("signal", ["traces", "logs", "metrics"])
def test_mutated_requests_never_crash_and_never_pass_what_upb_refuses(signal: str) -> None:
    """The walker replaces upb's check at the door: for mutated, truncated and spliced
    requests it must accept nothing upb refuses and read what it accepts as upb does."""
    rng = random.Random(f"mutate-{signal}")
    assert compiled is not None
    seeds = [GENERATORS[signal](rng).SerializeToString() for _ in range(20)]
    if signal == "traces":
        seeds += [build_request(8, seed=s).SerializeToString() for s in range(3)]
    elif signal == "metrics":
        seeds.append(metrics_request().SerializeToString())
    seeds = [s for s in seeds if s]
    accepted = refused = 0
    for _ in range(4000):
        raw = mutated(rng, rng.choice(seeds))
        got = inspected(signal, raw)
        want = python_facts(signal, raw)
        if want is None:
            refused += 1
            assert got is None, raw
        elif got is not None:
            accepted += 1
            assert got == want, raw
    # Both sides of the check were exercised.
    assert accepted > 150 and refused > 1000, (accepted, refused)


def test_other_signals_and_empty_requests() -> None:
    assert compiled is not None
    assert compiled.inspect("profiles", b"") is False
    assert inspected("traces", b"") == (0, None, set())
    assert inspected("logs", ExportLogsServiceRequest().SerializeToString()) == (0, None, set())
    empty_spans = ExportTraceServiceRequest()
    empty_spans.resource_spans.add().resource.attributes.append(kv("service.name", "s"))
    assert inspected("traces", empty_spans.SerializeToString()) == (0, None, {"s"})
