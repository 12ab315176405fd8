"""The Parquet tables: the Collector's clickhouseexporter tables, column for column.

Table and column names are the clickhouseexporter's (``internal/sqltemplates/*_table.sql``),
so a query written for it carries over. Types map ClickHouse's to Parquet's:

- ``DateTime64(9)`` (and the metric tables' ``DateTime``): TIMESTAMP(ns, UTC);
- ``String``/``LowCardinality(String)``: string (dictionary-encoded by the writer);
- ``Map(LowCardinality(String), String)``: MAP<string, string>; a non-string attribute
  value is rendered as the clickhouseexporter renders it, pdata's ``Value.AsString()``
  (:func:`otelworker.columnar.convert.render`): bool ``true``/``false``; int in decimal;
  double in ECMAScript number form (``1``, ``0.5``, ``1e-7``, ``1e+21``; NaN and
  infinities as ``json: unsupported value: NaN`` / ``+Inf`` / ``-Inf``, pdata's text);
  bytes in standard base64; an array or kvlist as compact JSON (a kvlist's keys sorted,
  bytes in base64, ``<``, ``>``, ``&`` escaped as Go's encoding/json does); an empty
  value as ``""``. A key repeated in one list keeps its last value (a Go map's);
- ``UInt*``/``Int*``/``Float64``/``Boolean``: the same width; ``Duration`` is int64
  nanoseconds (ClickHouse's UInt64 wraps a negative duration; int64 keeps its sign);
- ``Nested(...)`` (Events, Links, Exemplars, ValueAtQuantiles): ONE column, a list of
  structs with the Nested's field names (``Events`` is list<struct<Timestamp, Name,
  Attributes>>). ClickHouse flattens a Nested into parallel arrays ``Events.Timestamp``,
  ``Events.Name``; one list of structs keeps an event's fields together (they cannot
  disagree in length), and every reader named takes it as it is: DuckDB ``UNNEST(Events)``
  or ``[e.Name FOR e IN Events]`` / ``list_transform``, Athena/Trino ``array(row(...))``
  with ``CROSS JOIN UNNEST``, pyarrow ``list<struct>``, and ClickHouse's ``s3()`` as
  ``Array(Tuple(...))`` (or as ``Nested`` with ``input_format_parquet_import_nested``).
- a ``Tenant`` column last (whose data; also in the object key).

Optional numbers the OTLP message may lack (a histogram's Sum, Min, Max) are null when
absent rather than 0. What the columns do not hold (docs/query.md): dropped-attribute
counts (but ``ScopeDroppedAttrCount``), span flags, resource/scope schema URLs of spans,
a log record's ``event_name`` and observed time when it has its own time, a metric's
metadata and data point flags beyond ``Flags``, an exemplar's int-ness (its value is a
double). The OTLP objects stay the source of truth.
"""

from __future__ import annotations

import pyarrow as pa

# In every file's key-value metadata (``otelworker.schema_version``); a change to a table's
# columns or to how a value is rendered increments it.
SCHEMA_VERSION = 1

TIMESTAMP = pa.timestamp("ns", tz="UTC")
ATTRIBUTES = pa.map_(pa.string(), pa.string())

_EXEMPLARS = pa.list_(
    pa.struct(
        [
            ("FilteredAttributes", ATTRIBUTES),
            ("TimeUnix", TIMESTAMP),
            ("Value", pa.float64()),
            ("SpanId", pa.string()),
            ("TraceId", pa.string()),
        ]
    )
)

TRACES = pa.schema(
    [
        ("Timestamp", TIMESTAMP),
        ("TraceId", pa.string()),
        ("SpanId", pa.string()),
        ("ParentSpanId", pa.string()),
        ("TraceState", pa.string()),
        ("SpanName", pa.string()),
        ("SpanKind", pa.string()),
        ("ServiceName", pa.string()),
        ("ResourceAttributes", ATTRIBUTES),
        ("ScopeName", pa.string()),
        ("ScopeVersion", pa.string()),
        ("SpanAttributes", ATTRIBUTES),
        ("Duration", pa.int64()),
        ("StatusCode", pa.string()),
        ("StatusMessage", pa.string()),
        (
            "Events",
            pa.list_(
                pa.struct(
                    [("Timestamp", TIMESTAMP), ("Name", pa.string()), ("Attributes", ATTRIBUTES)]
                )
            ),
        ),
        (
            "Links",
            pa.list_(
                pa.struct(
                    [
                        ("TraceId", pa.string()),
                        ("SpanId", pa.string()),
                        ("TraceState", pa.string()),
                        ("Attributes", ATTRIBUTES),
                    ]
                )
            ),
        ),
        ("Tenant", pa.string()),
    ]
)

LOGS = pa.schema(
    [
        ("Timestamp", TIMESTAMP),
        ("TraceId", pa.string()),
        ("SpanId", pa.string()),
        ("TraceFlags", pa.uint8()),
        ("SeverityText", pa.string()),
        ("SeverityNumber", pa.uint8()),
        ("ServiceName", pa.string()),
        ("Body", pa.string()),
        ("ResourceSchemaUrl", pa.string()),
        ("ResourceAttributes", ATTRIBUTES),
        ("ScopeSchemaUrl", pa.string()),
        ("ScopeName", pa.string()),
        ("ScopeVersion", pa.string()),
        ("ScopeAttributes", ATTRIBUTES),
        ("LogAttributes", ATTRIBUTES),
        ("Tenant", pa.string()),
    ]
)

# The columns every metric table starts with (resource, scope, metric, point identity).
_METRIC_HEAD: list[tuple[str, pa.DataType]] = [
    ("ResourceAttributes", ATTRIBUTES),
    ("ResourceSchemaUrl", pa.string()),
    ("ScopeName", pa.string()),
    ("ScopeVersion", pa.string()),
    ("ScopeAttributes", ATTRIBUTES),
    ("ScopeDroppedAttrCount", pa.uint32()),
    ("ScopeSchemaUrl", pa.string()),
    ("ServiceName", pa.string()),
    ("MetricName", pa.string()),
    ("MetricDescription", pa.string()),
    ("MetricUnit", pa.string()),
    ("Attributes", ATTRIBUTES),
    ("StartTimeUnix", TIMESTAMP),
    ("TimeUnix", TIMESTAMP),
]

GAUGE = pa.schema(
    [
        *_METRIC_HEAD,
        ("Value", pa.float64()),
        ("Flags", pa.uint32()),
        ("Exemplars", _EXEMPLARS),
        ("Tenant", pa.string()),
    ]
)

SUM = pa.schema(
    [
        *_METRIC_HEAD,
        ("Value", pa.float64()),
        ("Flags", pa.uint32()),
        ("Exemplars", _EXEMPLARS),
        ("AggregationTemporality", pa.int32()),
        ("IsMonotonic", pa.bool_()),
        ("Tenant", pa.string()),
    ]
)

HISTOGRAM = pa.schema(
    [
        *_METRIC_HEAD,
        ("Count", pa.uint64()),
        ("Sum", pa.float64()),
        ("BucketCounts", pa.list_(pa.uint64())),
        ("ExplicitBounds", pa.list_(pa.float64())),
        ("Exemplars", _EXEMPLARS),
        ("Flags", pa.uint32()),
        ("Min", pa.float64()),
        ("Max", pa.float64()),
        ("AggregationTemporality", pa.int32()),
        ("Tenant", pa.string()),
    ]
)

EXPONENTIAL_HISTOGRAM = pa.schema(
    [
        *_METRIC_HEAD,
        ("Count", pa.uint64()),
        ("Sum", pa.float64()),
        ("Scale", pa.int32()),
        ("ZeroCount", pa.uint64()),
        ("PositiveOffset", pa.int32()),
        ("PositiveBucketCounts", pa.list_(pa.uint64())),
        ("NegativeOffset", pa.int32()),
        ("NegativeBucketCounts", pa.list_(pa.uint64())),
        ("Exemplars", _EXEMPLARS),
        ("Flags", pa.uint32()),
        ("Min", pa.float64()),
        ("Max", pa.float64()),
        ("AggregationTemporality", pa.int32()),
        ("Tenant", pa.string()),
    ]
)

SUMMARY = pa.schema(
    [
        *_METRIC_HEAD,
        ("Count", pa.uint64()),
        ("Sum", pa.float64()),
        (
            "ValueAtQuantiles",
            pa.list_(pa.struct([("Quantile", pa.float64()), ("Value", pa.float64())])),
        ),
        ("Flags", pa.uint32()),
        ("Tenant", pa.string()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "otel_traces": TRACES,
    "otel_logs": LOGS,
    "otel_metrics_gauge": GAUGE,
    "otel_metrics_sum": SUM,
    "otel_metrics_histogram": HISTOGRAM,
    "otel_metrics_exponential_histogram": EXPONENTIAL_HISTOGRAM,
    "otel_metrics_summary": SUMMARY,
}

# Which tables a signal's objects fill.
SIGNAL_TABLES: dict[str, tuple[str, ...]] = {
    "traces": ("otel_traces",),
    "logs": ("otel_logs",),
    "metrics": (
        "otel_metrics_gauge",
        "otel_metrics_sum",
        "otel_metrics_histogram",
        "otel_metrics_exponential_histogram",
        "otel_metrics_summary",
    ),
}

# The column a table's rows are timed by (parquet_files.min_time/max_time, partitions).
TIME_COLUMN: dict[str, str] = {
    name: ("Timestamp" if name in ("otel_traces", "otel_logs") else "TimeUnix") for name in TABLES
}

# Key-value metadata keys of every file.
META_SCHEMA_VERSION = b"otelworker.schema_version"
META_SOURCE_BATCHES = b"otelworker.source_batches"  # JSON list of manifest batch_ids
META_TABLE = b"otelworker.table"
META_TENANT = b"otelworker.tenant"


def parquet_key(prefix: str, tenant: str, table: str, hour_start: str, file_id: str) -> str:
    """``{prefix}/{tenant}/parquet/{table}/date=YYYY-MM-DD/hour=HH/part-{id}.parquet``.

    ``hour_start`` is ``YYYY-MM-DDTHH`` (UTC) of the arrival hour of the file's source
    objects. The tenant is a validated name (no ``/``); the prefix as ``object_key``'s.
    """
    date, hour = hour_start.split("T")
    parts = [p for p in (prefix.strip("/"), tenant) if p]
    return "/".join(
        [*parts, "parquet", table, f"date={date}", f"hour={hour}", f"part-{file_id}.parquet"]
    )
