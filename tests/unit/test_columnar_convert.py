"""The Parquet copy's conversion: OTLP requests of every signal and metric type into the
clickhouseexporter's tables, value by value; the written file read back by pyarrow and
DuckDB."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from otelworker.columnar.convert import go_float, render, to_tables, write_parquet
from otelworker.columnar.schema import (
    META_SCHEMA_VERSION,
    META_SOURCE_BATCHES,
    SCHEMA_VERSION,
    SIGNAL_TABLES,
    TABLES,
    parquet_key,
)

T0 = 1_767_225_600_000_000_123  # 2026-01-01T00:00:00.000000123Z
TRACE = bytes(range(16))
SPAN = bytes(range(8, 16))


def _ns(t: Any) -> Any:
    """A type with every timestamp as int64 nanoseconds (datetime cannot hold them)."""
    if pa.types.is_timestamp(t):
        return pa.int64()
    if pa.types.is_map(t):
        return t
    if pa.types.is_list(t):
        return pa.list_(_ns(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _ns(f.type)) for f in t])
    return t


def rows_of(table: Any) -> list[dict[str, Any]]:
    schema = pa.schema([pa.field(f.name, _ns(f.type)) for f in table.schema])
    return list(table.cast(schema).to_pylist())


def kv(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=any_value(value))


def any_value(value: Any) -> AnyValue:
    if isinstance(value, AnyValue):
        return value
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        v = AnyValue()
        v.array_value.values.extend(any_value(x) for x in value)
        return v
    if isinstance(value, dict):
        v = AnyValue()
        v.kvlist_value.values.extend(kv(k, x) for k, x in value.items())
        return v
    return AnyValue(string_value=value)


# Every AnyValue type, and how the clickhouseexporter (pdata's AsString) renders it.
EVERY_VALUE: dict[str, tuple[Any, str]] = {
    "s": ("text", "text"),
    "b": (True, "true"),
    "f": (False, "false"),
    "i": (-42, "-42"),
    "big": (2**62, str(2**62)),
    "d": (1.5, "1.5"),
    "whole": (3.0, "3"),
    "tiny": (1e-7, "1e-7"),
    "huge": (1.5e21, "1.5e+21"),
    "fixed": (1e20, "100000000000000000000"),
    "nan": (float("nan"), "json: unsupported value: NaN"),
    "bytes": (b"\x00\xffab", base64.b64encode(b"\x00\xffab").decode()),
    "array": ([1, "two", 3.5, True, b"\x01"], '[1,"two",3.5,true,"AQ=="]'),
    "kvlist": (
        {"z": 1, "a": {"inner": ["x", "<&>"]}, "m": None},
        '{"a":{"inner":["x","\\u003c\\u0026\\u003e"]},"m":null,"z":1}',
    ),
    "empty": (AnyValue(), ""),
}


def every_value_attributes() -> list[KeyValue]:
    out = []
    for key, (value, _) in EVERY_VALUE.items():
        if key == "kvlist":
            v = AnyValue()
            v.kvlist_value.values.extend([kv("z", 1), kv("a", {"inner": ["x", "<&>"]})])
            v.kvlist_value.values.add(key="m")  # an empty value: null
            out.append(KeyValue(key=key, value=v))
        else:
            out.append(kv(key, value))
    return out


EXPECTED_ATTRS = {key: text for key, (_, text) in EVERY_VALUE.items()}


def test_render_matches_pdata_as_string() -> None:
    for key, (value, text) in EVERY_VALUE.items():
        if key == "kvlist":
            continue
        assert render(any_value(value)) == text, key
    [kvlist] = [a for a in every_value_attributes() if a.key == "kvlist"]
    assert render(kvlist.value) == EVERY_VALUE["kvlist"][1]
    assert render(any_value([1.0, float("inf")])) == ""  # Go's json.Marshal fails: ""
    assert go_float(-0.0) == "-0"
    assert go_float(0.00001) == "0.00001"
    assert go_float(1e21) == "1e+21"
    assert go_float(123456789.125) == "123456789.125"


def traces_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for r, service in enumerate(("checkout", "cart")):
        rs = req.resource_spans.add()
        rs.resource.attributes.extend([kv("service.name", service), kv("host.id", r)])
        for s in range(2):
            ss = rs.scope_spans.add()
            ss.scope.name = f"lib{s}"
            ss.scope.version = f"1.{s}"
            for i in range(3):
                span = ss.spans.add()
                span.trace_id = TRACE
                span.span_id = bytes([r, s, i, 0, 0, 0, 0, 1])
                if i:
                    span.parent_span_id = SPAN
                span.trace_state = "k=v" if i == 1 else ""
                span.name = f"op{i}"
                span.kind = i + 1
                span.start_time_unix_nano = T0 + i
                span.end_time_unix_nano = T0 + i + 1000 * (i + 1)
                span.status.code = i % 3
                span.status.message = "bad" if i == 2 else ""
                span.attributes.extend([*every_value_attributes(), kv("dup", "a"), kv("dup", "b")])
                if i == 1:
                    event = span.events.add()
                    event.time_unix_nano = T0 + 5
                    event.name = "exception"
                    event.attributes.extend([kv("exception.type", "E"), kv("n", 7)])
                    link = span.links.add()
                    link.trace_id = bytes(16)
                    link.span_id = SPAN
                    link.trace_state = "x=y"
                    link.attributes.append(kv("why", "retry"))
    return req


def test_traces_rows_equal_the_spans_sent() -> None:
    req = traces_request()
    tables = to_tables("traces", req, "acme")
    assert set(tables) == set(SIGNAL_TABLES["traces"])
    table = tables["otel_traces"]
    assert table.schema.equals(TABLES["otel_traces"])
    rows = rows_of(table)
    assert len(rows) == 2 * 2 * 3
    ts = table.column("Timestamp").cast(pa.int64()).to_pylist()
    assert ts[:3] == [T0, T0 + 1, T0 + 2]
    first = rows[1]  # checkout, lib0, op1
    assert first["TraceId"] == TRACE.hex()
    assert first["SpanId"] == bytes([0, 0, 1, 0, 0, 0, 0, 1]).hex()
    assert first["ParentSpanId"] == SPAN.hex()
    assert rows[0]["ParentSpanId"] == ""
    assert first["TraceState"] == "k=v"
    assert first["SpanName"] == "op1"
    assert [r["SpanKind"] for r in rows[:3]] == ["Internal", "Server", "Client"]
    assert [r["StatusCode"] for r in rows[:3]] == ["Unset", "Ok", "Error"]
    assert rows[2]["StatusMessage"] == "bad"
    assert [r["Duration"] for r in rows[:3]] == [1000, 2000, 3000]
    assert first["ServiceName"] == "checkout"
    assert rows[6]["ServiceName"] == "cart"
    assert dict(first["ResourceAttributes"]) == {"service.name": "checkout", "host.id": "0"}
    assert dict(rows[6]["ResourceAttributes"]) == {"service.name": "cart", "host.id": "1"}
    assert [(r["ScopeName"], r["ScopeVersion"]) for r in rows[:6:3]] == [
        ("lib0", "1.0"),
        ("lib1", "1.1"),
    ]
    attrs = dict(first["SpanAttributes"])
    assert attrs == {**EXPECTED_ATTRS, "dup": "b"}  # a repeated key: its last value
    [event] = first["Events"]
    assert event["Name"] == "exception"
    assert dict(event["Attributes"]) == {"exception.type": "E", "n": "7"}
    events_ts = table.column("Events").combine_chunks().flatten().field("Timestamp")
    assert events_ts.cast(pa.int64()).to_pylist()[0] == T0 + 5
    [link] = first["Links"]
    assert link == {
        "TraceId": "00" * 16,
        "SpanId": SPAN.hex(),
        "TraceState": "x=y",
        "Attributes": [("why", "retry")],
    }
    assert rows[0]["Events"] == [] and rows[0]["Links"] == []
    assert {r["Tenant"] for r in rows} == {"acme"}


def logs_request() -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for r in range(2):
        rl = req.resource_logs.add()
        rl.schema_url = f"https://schema/{r}"
        rl.resource.attributes.append(kv("service.name", f"svc{r}"))
        for s in range(2):
            sl = rl.scope_logs.add()
            sl.schema_url = "scope-schema"
            sl.scope.name = f"logger{s}"
            sl.scope.version = "2"
            sl.scope.attributes.append(kv("scope.attr", s))
            for i in range(2):
                rec = sl.log_records.add()
                rec.time_unix_nano = T0 + i if i == 0 else 0
                rec.observed_time_unix_nano = T0 + 100
                rec.severity_number = 9 + i
                rec.severity_text = "INFO"
                rec.flags = 0x101
                rec.trace_id = TRACE
                rec.span_id = SPAN
                rec.body.CopyFrom(any_value("hello" if i == 0 else {"msg": "hi", "n": 2}))
                rec.attributes.extend(every_value_attributes())
    return req


def test_logs_rows_equal_the_records_sent() -> None:
    table = to_tables("logs", logs_request(), "t1")["otel_logs"]
    assert table.schema.equals(TABLES["otel_logs"])
    rows = rows_of(table)
    assert len(rows) == 8
    ts = table.column("Timestamp").cast(pa.int64()).to_pylist()
    assert ts[:2] == [T0, T0 + 100]  # no time: the observed time
    row = rows[1]
    assert row["TraceId"] == TRACE.hex() and row["SpanId"] == SPAN.hex()
    assert row["TraceFlags"] == 1  # the low byte of flags
    assert (row["SeverityText"], row["SeverityNumber"]) == ("INFO", 10)
    assert rows[0]["Body"] == "hello"
    assert row["Body"] == '{"msg":"hi","n":2}'
    assert row["ServiceName"] == "svc0" and rows[4]["ServiceName"] == "svc1"
    assert rows[4]["ResourceSchemaUrl"] == "https://schema/1"
    assert row["ScopeSchemaUrl"] == "scope-schema"
    assert (rows[2]["ScopeName"], rows[2]["ScopeVersion"]) == ("logger1", "2")
    assert dict(rows[2]["ScopeAttributes"]) == {"scope.attr": "1"}
    assert dict(row["LogAttributes"]) == EXPECTED_ATTRS
    assert {r["Tenant"] for r in rows} == {"t1"}


def metrics_request() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    for r in range(2):
        rm = req.resource_metrics.add()
        rm.schema_url = "rs"
        rm.resource.attributes.append(kv("service.name", f"svc{r}"))
        sm = rm.scope_metrics.add()
        sm.scope.name = "meter"
        sm.scope.version = "3"
        sm.scope.dropped_attributes_count = 4
        sm.scope.attributes.append(kv("sa", True))
        sm.schema_url = "ss"

        gauge = sm.metrics.add(name="g", description="a gauge", unit="1")
        p = gauge.gauge.data_points.add(time_unix_nano=T0, start_time_unix_nano=T0 - 10)
        p.as_double = 0.25
        p.attributes.extend(every_value_attributes())
        ex = p.exemplars.add(time_unix_nano=T0 - 1, span_id=SPAN, trace_id=TRACE)
        ex.as_int = 9
        ex.filtered_attributes.append(kv("fa", "x"))
        p2 = gauge.gauge.data_points.add(time_unix_nano=T0 + 1, flags=1)
        p2.as_int = 7

        total = sm.metrics.add(name="s", unit="By")
        total.sum.aggregation_temporality = 2
        total.sum.is_monotonic = True
        q = total.sum.data_points.add(time_unix_nano=T0 + 2)
        q.as_int = 100

        hist = sm.metrics.add(name="h")
        hist.histogram.aggregation_temporality = 1
        h = hist.histogram.data_points.add(time_unix_nano=T0 + 3, count=6, sum=12.5, min=1, max=4)
        h.bucket_counts.extend([1, 2, 3])
        h.explicit_bounds.extend([1.0, 2.0])
        hist.histogram.data_points.add(time_unix_nano=T0 + 4, count=0)  # no sum/min/max

        exp = sm.metrics.add(name="e")
        exp.exponential_histogram.aggregation_temporality = 2
        e = exp.exponential_histogram.data_points.add(
            time_unix_nano=T0 + 5, count=5, sum=2.0, scale=3, zero_count=1, min=0.1, max=9
        )
        e.positive.offset = -2
        e.positive.bucket_counts.extend([1, 2])
        e.negative.offset = 1
        e.negative.bucket_counts.extend([1])

        summ = sm.metrics.add(name="q")
        sp = summ.summary.data_points.add(time_unix_nano=T0 + 6, count=3, sum=6.0)
        sp.quantile_values.add(quantile=0.5, value=2.0)
        sp.quantile_values.add(quantile=0.99, value=3.0)
        sm.metrics.add(name="nodata")  # no data: no rows
    return req


def test_metrics_rows_of_every_type() -> None:
    tables = to_tables("metrics", metrics_request(), "m")
    assert set(tables) == set(SIGNAL_TABLES["metrics"])
    for name, table in tables.items():
        assert table.schema.equals(TABLES[name]), name
    gauge = rows_of(tables["otel_metrics_gauge"])
    assert len(gauge) == 4
    g = gauge[0]
    assert g["ServiceName"] == "svc0" and gauge[2]["ServiceName"] == "svc1"
    assert (g["MetricName"], g["MetricDescription"], g["MetricUnit"]) == ("g", "a gauge", "1")
    assert (g["ScopeName"], g["ScopeVersion"], g["ScopeDroppedAttrCount"]) == ("meter", "3", 4)
    assert dict(g["ScopeAttributes"]) == {"sa": "true"}
    assert (g["ResourceSchemaUrl"], g["ScopeSchemaUrl"]) == ("rs", "ss")
    assert dict(g["Attributes"]) == EXPECTED_ATTRS
    assert g["Value"] == 0.25 and gauge[1]["Value"] == 7.0 and gauge[1]["Flags"] == 1
    [ex] = g["Exemplars"]
    assert ex["Value"] == 9.0 and ex["SpanId"] == SPAN.hex() and ex["TraceId"] == TRACE.hex()
    assert dict(ex["FilteredAttributes"]) == {"fa": "x"}
    times = tables["otel_metrics_gauge"].column("TimeUnix").cast(pa.int64()).to_pylist()
    starts = tables["otel_metrics_gauge"].column("StartTimeUnix").cast(pa.int64()).to_pylist()
    assert (times[0], starts[0]) == (T0, T0 - 10)

    [s, _] = rows_of(tables["otel_metrics_sum"])
    assert (s["Value"], s["AggregationTemporality"], s["IsMonotonic"]) == (100.0, 2, True)
    assert s["MetricUnit"] == "By"

    h, h0, *_ = rows_of(tables["otel_metrics_histogram"])
    assert (h["Count"], h["Sum"], h["Min"], h["Max"]) == (6, 12.5, 1.0, 4.0)
    assert (h["BucketCounts"], h["ExplicitBounds"]) == ([1, 2, 3], [1.0, 2.0])
    assert h["AggregationTemporality"] == 1
    assert (h0["Sum"], h0["Min"], h0["Max"]) == (None, None, None)  # absent: null, not 0

    [e, _] = rows_of(tables["otel_metrics_exponential_histogram"])
    assert (e["Count"], e["Sum"], e["Scale"], e["ZeroCount"]) == (5, 2.0, 3, 1)
    assert (e["PositiveOffset"], e["PositiveBucketCounts"]) == (-2, [1, 2])
    assert (e["NegativeOffset"], e["NegativeBucketCounts"]) == (1, [1])
    assert (e["Min"], e["Max"], e["AggregationTemporality"]) == (0.1, 9.0, 2)

    [q, _] = rows_of(tables["otel_metrics_summary"])
    assert (q["Count"], q["Sum"]) == (3, 6.0)
    assert q["ValueAtQuantiles"] == [
        {"Quantile": 0.5, "Value": 2.0},
        {"Quantile": 0.99, "Value": 3.0},
    ]
    # Records in = rows out (data points: the manifest's record count for metrics).
    assert sum(t.num_rows for t in tables.values()) == 2 * 7


def test_an_empty_request_gives_empty_tables() -> None:
    for signal, request in (
        ("traces", ExportTraceServiceRequest()),
        ("logs", ExportLogsServiceRequest()),
        ("metrics", ExportMetricsServiceRequest()),
    ):
        tables = to_tables(signal, request, "t")
        assert set(tables) == set(SIGNAL_TABLES[signal])
        assert all(t.num_rows == 0 for t in tables.values())


def test_written_files_are_read_by_pyarrow_and_duckdb(tmp_path: Path) -> None:
    written: dict[str, Path] = {}
    for signal, request in (
        ("traces", traces_request()),
        ("logs", logs_request()),
        ("metrics", metrics_request()),
    ):
        for name, table in to_tables(signal, request, "acme").items():
            path = tmp_path / f"{name}.parquet"
            write_parquet(
                table, table_name=name, tenant="acme", source_batches=["b2", "b1"], sink=str(path)
            )
            written[name] = path
            back = pq.read_table(path)
            assert back.schema.remove_metadata().equals(TABLES[name]), name
            assert rows_of(back) == rows_of(table), name
            meta = pq.read_metadata(path).metadata
            assert meta[META_SCHEMA_VERSION] == str(SCHEMA_VERSION).encode()
            assert json.loads(meta[META_SOURCE_BATCHES]) == ["b1", "b2"]
            assert pq.read_metadata(path).row_group(0).column(0).compression == "ZSTD"
    con = duckdb.connect()
    traces = str(written["otel_traces"])
    assert con.execute(f"SELECT count(*) FROM '{traces}'").fetchone() == (12,)
    assert con.execute(
        f"SELECT SpanAttributes['d'], ResourceAttributes['service.name'], Duration"
        f" FROM '{traces}' WHERE SpanName = 'op2' AND ServiceName = 'cart' LIMIT 1"
    ).fetchone() == ("1.5", "cart", 3000)
    assert (
        con.execute(
            f"SELECT e.Name, e.Attributes['n'] FROM (SELECT unnest(Events) AS e FROM '{traces}')"
        ).fetchall()
        == [("exception", "7")] * 4
    )
    assert con.execute(f"SELECT epoch_ns(min(Timestamp)) FROM '{traces}'").fetchone() == (T0,)
    hist = str(written["otel_metrics_histogram"])
    assert con.execute(
        f"SELECT sum(Count), list_sum(first(BucketCounts)) FROM '{hist}'"
    ).fetchone() == (
        12,
        6,
    )
    summ = str(written["otel_metrics_summary"])
    assert con.execute(
        f"SELECT q.Value FROM (SELECT unnest(ValueAtQuantiles) AS q FROM '{summ}')"
        " WHERE q.Quantile = 0.99"
    ).fetchall() == [(3.0,), (3.0,)]
    logs = str(written["otel_logs"])
    assert con.execute(
        f"SELECT count(*) FROM '{logs}' WHERE LogAttributes['b'] = 'true'"
    ).fetchone() == (8,)


def test_parquet_key_layout() -> None:
    assert (
        parquet_key("otel/", "acme", "otel_traces", "2026-01-01T07", "id")
        == "otel/acme/parquet/otel_traces/date=2026-01-01/hour=07/part-id.parquet"
    )
    assert parquet_key("", "t", "otel_logs", "2026-12-31T23", "x").startswith(
        "t/parquet/otel_logs/date=2026-12-31/hour=23/"
    )


def test_conversion_cost_per_span() -> None:
    """Not a benchmark (make bench has it): a guard that conversion stays in the tens of
    microseconds per span on a realistic 512-span request, whatever the machine's load."""
    from loadtest.payloads import TraceRequestFactory

    bodies = TraceRequestFactory(512).many(4)
    requests = []
    for body in bodies:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        requests.append(req)
    started = time.perf_counter()
    spans = sum(to_tables("traces", r, "t")["otel_traces"].num_rows for r in requests)
    per_span_us = (time.perf_counter() - started) / spans * 1e6
    assert spans == 4 * 512
    assert per_span_us < 100, per_span_us
