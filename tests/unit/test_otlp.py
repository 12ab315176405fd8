"""OTLP messages: the JSON mapping, protobuf decoding, record counts and response bodies."""

from __future__ import annotations

import json

import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from otelworker import otlp
from otelworker.exceptions import BadPayload

TRACE_ID_HEX = "5b8efff798038103d269b633813fc60c"
SPAN_ID_HEX = "eee19b7ec3c1b174"
PARENT_ID_HEX = "eee19b7ec3c1b173"
LINK_TRACE_HEX = "0102030405060708090a0b0c0d0e0f10"
LINK_SPAN_HEX = "1112131415161718"
# Larger than 2**53: a float on the way would change it.
BIG_NANOS = 1_700_000_000_123_456_789


def _json(tree: object) -> bytes:
    return json.dumps(tree).encode()


def _resource(name: str) -> resource_pb2.Resource:
    return resource_pb2.Resource(
        attributes=[
            common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=name))
        ]
    )


# --- JSON -> protobuf ---------------------------------------------------------------------


def _trace_json(start: object, end: object) -> dict[str, object]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "checkout"}}],
                    "someFutureField": {"nested": True},
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "lib", "version": "1.0"},
                        "spans": [
                            {
                                "traceId": TRACE_ID_HEX,
                                "spanId": SPAN_ID_HEX,
                                "parentSpanId": PARENT_ID_HEX,
                                "name": "GET /cart",
                                "kind": 2,
                                "startTimeUnixNano": start,
                                "endTimeUnixNano": end,
                                "attributes": [
                                    {"key": "http.status_code", "value": {"intValue": "200"}},
                                    {"key": "retries", "value": {"intValue": 3}},
                                ],
                                "links": [{"traceId": LINK_TRACE_HEX, "spanId": LINK_SPAN_HEX}],
                                "status": {"code": 2, "message": "boom"},
                                "unknownSpanField": "ignored",
                            }
                        ],
                    }
                ],
            }
        ],
        "unknownTopLevel": [1, 2, 3],
    }


def _expected_trace() -> trace_service_pb2.ExportTraceServiceRequest:
    span = trace_pb2.Span(
        trace_id=bytes.fromhex(TRACE_ID_HEX),
        span_id=bytes.fromhex(SPAN_ID_HEX),
        parent_span_id=bytes.fromhex(PARENT_ID_HEX),
        name="GET /cart",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=BIG_NANOS,
        end_time_unix_nano=BIG_NANOS + 1000,
        attributes=[
            common_pb2.KeyValue(key="http.status_code", value=common_pb2.AnyValue(int_value=200)),
            common_pb2.KeyValue(key="retries", value=common_pb2.AnyValue(int_value=3)),
        ],
        links=[
            trace_pb2.Span.Link(
                trace_id=bytes.fromhex(LINK_TRACE_HEX), span_id=bytes.fromhex(LINK_SPAN_HEX)
            )
        ],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="boom"),
    )
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=_resource("checkout"),
                scope_spans=[
                    trace_pb2.ScopeSpans(
                        scope=common_pb2.InstrumentationScope(name="lib", version="1.0"),
                        spans=[span],
                    )
                ],
            )
        ]
    )


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (str(BIG_NANOS), str(BIG_NANOS + 1000)),  # 64-bit integers as strings
        (BIG_NANOS, BIG_NANOS + 1000),  # ... or as numbers
    ],
    ids=["int64-as-string", "int64-as-number"],
)
def test_json_traces_map_to_the_same_protobuf(start: object, end: object) -> None:
    message = otlp.decode_json("traces", _json(_trace_json(start, end)))

    expected = _expected_trace()
    assert message == expected
    # Canonical bytes: the JSON twin serialises to exactly the protobuf twin's bytes.
    assert message.SerializeToString() == expected.SerializeToString()
    span = message.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == TRACE_ID_HEX
    assert span.span_id.hex() == SPAN_ID_HEX
    assert span.start_time_unix_nano == BIG_NANOS
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER


def test_json_accepts_uppercase_hex_ids() -> None:
    tree = _trace_json(str(BIG_NANOS), str(BIG_NANOS + 1000))
    span = tree["resourceSpans"][0]["scopeSpans"][0]["spans"][0]  # type: ignore[index]
    span["traceId"] = TRACE_ID_HEX.upper()
    message = otlp.decode_json("traces", _json(tree))
    assert message.resource_spans[0].scope_spans[0].spans[0].trace_id.hex() == TRACE_ID_HEX


def test_json_logs_map_hex_ids_enums_and_int64() -> None:
    body = {
        "resourceLogs": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "billing"}}]
                },
                "scopeLogs": [
                    {
                        "logRecords": [
                            {
                                "timeUnixNano": str(BIG_NANOS),
                                "observedTimeUnixNano": BIG_NANOS + 5,
                                "severityNumber": 17,
                                "severityText": "ERROR",
                                "body": {"stringValue": "payment failed"},
                                "traceId": TRACE_ID_HEX,
                                "spanId": SPAN_ID_HEX,
                                "flags": 1,
                                "notInTheSpec": {"a": 1},
                            },
                            {"body": {"stringValue": "second"}},
                        ]
                    }
                ],
            }
        ]
    }
    message = otlp.decode_json("logs", _json(body))

    expected = logs_service_pb2.ExportLogsServiceRequest(
        resource_logs=[
            logs_pb2.ResourceLogs(
                resource=_resource("billing"),
                scope_logs=[
                    logs_pb2.ScopeLogs(
                        log_records=[
                            logs_pb2.LogRecord(
                                time_unix_nano=BIG_NANOS,
                                observed_time_unix_nano=BIG_NANOS + 5,
                                severity_number=logs_pb2.SEVERITY_NUMBER_ERROR,
                                severity_text="ERROR",
                                body=common_pb2.AnyValue(string_value="payment failed"),
                                trace_id=bytes.fromhex(TRACE_ID_HEX),
                                span_id=bytes.fromhex(SPAN_ID_HEX),
                                flags=1,
                            ),
                            logs_pb2.LogRecord(body=common_pb2.AnyValue(string_value="second")),
                        ]
                    )
                ],
            )
        ]
    )
    assert message == expected
    assert message.SerializeToString() == expected.SerializeToString()
    assert otlp.count_records("logs", message) == 2


def test_json_metrics_every_kind_with_int64_strings_and_exemplar_ids() -> None:
    body = {
        "resourceMetrics": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "api"}}]
                },
                "scopeMetrics": [
                    {
                        "metrics": [
                            {
                                "name": "queue.depth",
                                "gauge": {
                                    "dataPoints": [
                                        {"timeUnixNano": str(BIG_NANOS), "asInt": "-42"},
                                        {"timeUnixNano": BIG_NANOS, "asDouble": 0.5},
                                    ]
                                },
                            },
                            {
                                "name": "requests",
                                "sum": {
                                    "aggregationTemporality": 2,
                                    "isMonotonic": True,
                                    "dataPoints": [
                                        {
                                            "timeUnixNano": str(BIG_NANOS),
                                            "asInt": "9007199254740993",
                                            "exemplars": [
                                                {
                                                    "timeUnixNano": str(BIG_NANOS),
                                                    "asDouble": 1.0,
                                                    "traceId": TRACE_ID_HEX,
                                                    "spanId": SPAN_ID_HEX,
                                                }
                                            ],
                                        }
                                    ],
                                },
                            },
                            {
                                "name": "latency",
                                "histogram": {
                                    "aggregationTemporality": 1,
                                    "dataPoints": [
                                        {
                                            "count": "3",
                                            "sum": 7.5,
                                            "bucketCounts": ["1", 2],
                                            "explicitBounds": [5.0],
                                        }
                                    ]
                                    * 3,
                                },
                            },
                            {
                                "name": "size",
                                "exponentialHistogram": {
                                    "dataPoints": [
                                        {
                                            "count": 4,
                                            "scale": 2,
                                            "zeroCount": "1",
                                            "positive": {"offset": -1, "bucketCounts": ["1", "2"]},
                                        }
                                    ]
                                },
                            },
                            {
                                "name": "rpc.duration",
                                "summary": {
                                    "dataPoints": [
                                        {
                                            "count": "10",
                                            "sum": 2.0,
                                            "quantileValues": [{"quantile": 0.99, "value": 1.5}],
                                        }
                                    ]
                                },
                            },
                        ]
                    }
                ],
            }
        ]
    }
    message = otlp.decode_json("metrics", _json(body))

    metrics = message.resource_metrics[0].scope_metrics[0].metrics
    assert [m.WhichOneof("data") for m in metrics] == [
        "gauge",
        "sum",
        "histogram",
        "exponential_histogram",
        "summary",
    ]
    assert metrics[0].gauge.data_points[0].as_int == -42
    assert metrics[0].gauge.data_points[0].time_unix_nano == BIG_NANOS
    assert metrics[1].sum.data_points[0].as_int == 9007199254740993
    assert metrics[1].sum.aggregation_temporality == metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert metrics[1].sum.is_monotonic
    exemplar = metrics[1].sum.data_points[0].exemplars[0]
    assert exemplar.trace_id == bytes.fromhex(TRACE_ID_HEX)
    assert exemplar.span_id == bytes.fromhex(SPAN_ID_HEX)
    assert list(metrics[2].histogram.data_points[0].bucket_counts) == [1, 2]
    assert metrics[2].histogram.data_points[0].count == 3
    assert metrics[3].exponential_histogram.data_points[0].positive.offset == -1
    assert list(metrics[3].exponential_histogram.data_points[0].positive.bucket_counts) == [1, 2]
    assert metrics[4].summary.data_points[0].quantile_values[0].quantile == 0.99
    # 2 gauge + 1 sum + 3 histogram + 1 exponential histogram + 1 summary points.
    assert otlp.count_records("metrics", message) == 8


def test_json_snake_case_keys_are_also_accepted() -> None:
    # The spec asks receivers for lowerCamelCase; the protobuf field names parse too.
    body = {
        "resource_spans": [
            {"scope_spans": [{"spans": [{"trace_id": TRACE_ID_HEX, "span_id": SPAN_ID_HEX}]}]}
        ]
    }
    message = otlp.decode_json("traces", _json(body))
    assert message.resource_spans[0].scope_spans[0].spans[0].trace_id.hex() == TRACE_ID_HEX


def test_json_enum_names_map_like_their_integers() -> None:
    by_name = {"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": "SPAN_KIND_CLIENT"}]}]}]}
    by_number = {"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": 3}]}]}]}
    assert otlp.decode_json("traces", _json(by_name)) == otlp.decode_json(
        "traces", _json(by_number)
    )


def test_json_empty_object_is_an_empty_request() -> None:
    for signal in otlp.SIGNALS:
        message = otlp.decode_json(signal, b"{}")
        assert message == otlp.REQUEST_TYPES[signal]()
        assert otlp.count_records(signal, message) == 0


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'"a string"',
        _json({"resourceSpans": 5}),
        _json({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}),
        _json({"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "abc"}]}]}]}),
        _json({"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}),
        _json({"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 12}]}]}]}),
    ],
    ids=[
        "syntax",
        "empty",
        "array",
        "string",
        "wrong-type",
        "non-hex-id",
        "odd-hex-id",
        "non-integer-int64",
        "number-for-string",
    ],
)
def test_invalid_json_raises_bad_payload(body: bytes) -> None:
    with pytest.raises(BadPayload):
        otlp.decode_json("traces", body)


# --- protobuf -------------------------------------------------------------------------------


def test_decode_protobuf_round_trip() -> None:
    expected = _expected_trace()
    assert otlp.decode("traces", expected.SerializeToString()) == expected


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff\xff", b"\x0a\x10only-part-of-it", b"\x0a"],
    ids=["garbage", "truncated-length", "dangling-tag"],
)
@pytest.mark.parametrize("signal", otlp.SIGNALS)
def test_decode_malformed_protobuf_raises_bad_payload(signal: str, data: bytes) -> None:
    with pytest.raises(BadPayload):
        otlp.decode(signal, data)


def test_decode_empty_bytes_is_an_empty_request() -> None:
    for signal in otlp.SIGNALS:
        assert otlp.count_records(signal, otlp.decode(signal, b"")) == 0


# --- counting ---------------------------------------------------------------------------------


def test_count_records_traces_across_resources_and_scopes() -> None:
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                scope_spans=[
                    trace_pb2.ScopeSpans(spans=[trace_pb2.Span(name="a"), trace_pb2.Span()]),
                    trace_pb2.ScopeSpans(spans=[trace_pb2.Span()]),
                ]
            ),
            trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans()]),
            trace_pb2.ResourceSpans(
                scope_spans=[trace_pb2.ScopeSpans(spans=[trace_pb2.Span()] * 4)]
            ),
        ]
    )
    assert otlp.count_records("traces", request) == 7


def test_count_records_logs_across_resources_and_scopes() -> None:
    request = logs_service_pb2.ExportLogsServiceRequest(
        resource_logs=[
            logs_pb2.ResourceLogs(
                scope_logs=[
                    logs_pb2.ScopeLogs(log_records=[logs_pb2.LogRecord()] * 3),
                    logs_pb2.ScopeLogs(),
                ]
            ),
            logs_pb2.ResourceLogs(
                scope_logs=[logs_pb2.ScopeLogs(log_records=[logs_pb2.LogRecord()])]
            ),
        ]
    )
    assert otlp.count_records("logs", request) == 4


def _metric(kind: str, points: int) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=kind)
    data = getattr(metric, kind)
    for _ in range(points):
        data.data_points.add()
    if points == 0:
        # Select the oneof even without points.
        data.SetInParent()
    return metric


@pytest.mark.parametrize(
    ("kind", "points"),
    [("gauge", 2), ("sum", 3), ("histogram", 4), ("exponential_histogram", 5), ("summary", 6)],
)
def test_count_records_metrics_each_kind(kind: str, points: int) -> None:
    request = metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[_metric(kind, points)])]
            )
        ]
    )
    assert otlp.count_records("metrics", request) == points


def test_count_records_metrics_mixed_and_empty() -> None:
    request = metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        metrics=[
                            _metric("gauge", 1),
                            _metric("sum", 2),
                            metrics_pb2.Metric(name="no data at all"),
                            _metric("histogram", 0),
                        ]
                    ),
                    metrics_pb2.ScopeMetrics(metrics=[_metric("summary", 3)]),
                ]
            ),
            metrics_pb2.ResourceMetrics(
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(metrics=[_metric("exponential_histogram", 4)])
                ]
            ),
        ]
    )
    assert otlp.count_records("metrics", request) == 10


# --- indexing helpers -------------------------------------------------------------------------


def test_time_range_and_service_names() -> None:
    message = _expected_trace()
    assert otlp.time_range("traces", message) == (BIG_NANOS, BIG_NANOS + 1000)
    assert otlp.service_names("traces", message) == {"checkout"}
    assert otlp.time_range("traces", trace_service_pb2.ExportTraceServiceRequest()) is None


def test_time_range_skips_unset_timestamps() -> None:
    traces = trace_service_pb2.ExportTraceServiceRequest()
    spans = traces.resource_spans.add().scope_spans.add().spans
    spans.add(start_time_unix_nano=0, end_time_unix_nano=0)
    spans.add(start_time_unix_nano=300, end_time_unix_nano=0)  # unfinished: its start ends it
    spans.add(start_time_unix_nano=200, end_time_unix_nano=250)
    assert otlp.time_range("traces", traces) == (200, 300)

    logs = logs_service_pb2.ExportLogsServiceRequest()
    records = logs.resource_logs.add().scope_logs.add().log_records
    records.add(time_unix_nano=0, observed_time_unix_nano=0)
    records.add(time_unix_nano=0, observed_time_unix_nano=70)  # observed time stands in
    records.add(time_unix_nano=50)
    assert otlp.time_range("logs", logs) == (50, 70)

    metrics = metrics_service_pb2.ExportMetricsServiceRequest()
    metric = metrics.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
    metric.gauge.data_points.add(time_unix_nano=9)
    metric.gauge.data_points.add(time_unix_nano=4)
    metric.gauge.data_points.add(time_unix_nano=0)
    metrics.resource_metrics[0].scope_metrics[0].metrics.add(name="empty")
    assert otlp.time_range("metrics", metrics) == (4, 9)
    assert otlp.time_range("logs", logs_service_pb2.ExportLogsServiceRequest()) is None


# --- responses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signal", otlp.SIGNALS)
def test_success_bodies(signal: str) -> None:
    assert otlp.success(signal, otlp.PROTOBUF) == b""
    assert json.loads(otlp.success(signal, otlp.JSON)) == {}
    assert otlp.PROTOBUF.content_type == "application/x-protobuf"
    assert otlp.JSON.content_type == "application/json"


def test_partial_success_bodies() -> None:
    raw = otlp.partial_success("traces", otlp.PROTOBUF, 7, "shed")
    response = trace_service_pb2.ExportTraceServiceResponse.FromString(raw)
    assert response.partial_success.rejected_spans == 7
    assert response.partial_success.error_message == "shed"

    tree = json.loads(otlp.partial_success("metrics", otlp.JSON, 3, "shed"))
    assert tree == {"partialSuccess": {"rejectedDataPoints": "3", "errorMessage": "shed"}}

    logs = logs_service_pb2.ExportLogsServiceResponse.FromString(
        otlp.partial_success("logs", otlp.PROTOBUF, 2, "x")
    )
    assert logs.partial_success.rejected_log_records == 2


def test_status_body_in_both_encodings() -> None:
    raw = otlp.status_body(otlp.CODE_INVALID_ARGUMENT, "bad", otlp.PROTOBUF)
    assert status_pb2.Status.FromString(raw) == status_pb2.Status(code=3, message="bad")
    assert json.loads(otlp.status_body(otlp.CODE_UNAVAILABLE, "later", otlp.JSON)) == {
        "code": 14,
        "message": "later",
    }
