"""Prometheus metrics: one registry per service instance, served at GET /metrics.

Names follow Prometheus conventions: the ``otelworker_`` prefix, base units, ``_total``
on counters, and only low-cardinality labels (transport, signal, code, reason).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class LostObjects(Collector):
    """``otelworker_forward_lost_objects_total{destination}``: a running total kept in the
    database (``delivery_losses``, written by ``prune --force``, another process), as last
    read by the forwarder's stats task. Every forwarding process reports the same total:
    aggregate with ``max``, not ``sum``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "otelworker_forward_lost_objects",
            "Objects prune --force deleted before a destination had taken them (their"
            " deliveries were pending), per destination; the database's running total.",
            labels=["destination"],
        )
        for destination, total in sorted(self.totals.items()):
            family.add_metric([destination], total)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...
        ProcessCollector(registry=r)
        self.process_index = Gauge(
            "otelworker_process_index",
            "Which of `serve --processes N` answered this scrape (0 .. N-1; 0 alone).",
            registry=r,
        )
        self.ready = Gauge(
            "otelworker_ready",
            "1 while the process is ready (its last /readyz check passed and it is not"
            " stopping), else 0.",
            registry=r,
        )
        self.requests = Counter(
            "otelworker_requests",
            "OTLP export requests answered, by transport, signal and status code (the HTTP"
            " status, or the gRPC code name).",
            ["transport", "signal", "code"],
            registry=r,
        )
        self.records_accepted = Counter(
            "otelworker_records_accepted",
            "Records (spans, data points, log records) staged and acknowledged.",
            ["transport", "signal"],
            registry=r,
        )
        self.http_open_connections = Gauge(
            "otelworker_http_open_connections",
            "HTTP connections open in this process (python -m otelworker serve).",
            registry=r,
        )
        self.http_connections_refused = Counter(
            "otelworker_http_connections_refused",
            "New HTTP connections answered 503 and closed: HTTP_MAX_CONNECTIONS were open.",
            registry=r,
        )
        self.http_requests_timed_out = Counter(
            "otelworker_http_requests_timed_out",
            "HTTP requests closed for a slow client, by reason: header (the head not"
            " complete within HTTP_HEADER_TIMEOUT_S), body (below HTTP_BODY_MIN_RATE_BYTES"
            " after HTTP_BODY_TIMEOUT_S).",
            ["reason"],
            registry=r,
        )
        self.descriptors_exhausted = Counter(
            "otelworker_descriptors_exhausted",
            "accept() failures for want of file descriptors (EMFILE, ENFILE): each is"
            " retried; the connection cap is meant to keep this at 0.",
            registry=r,
        )
        self.requests_refused = Counter(
            "otelworker_requests_refused",
            "Requests refused or shed, by reason.",
            ["transport", "signal", "reason"],
            registry=r,
        )
        self.records_refused = Counter(
            "otelworker_records_refused",
            "Records refused or shed, by reason (where the body was decoded).",
            ["transport", "signal", "reason"],
            registry=r,
        )
        self.request_bytes = Counter(
            "otelworker_request_bytes",
            "Bytes of decompressed OTLP payload staged.",
            ["transport", "signal"],
            registry=r,
        )
        # Per tenant: the label is the tenant's name for the first METRICS_MAX_TENANTS
        # tenants seen by this process, then "other" (bounded cardinality).
        self.tenant_records_accepted = Counter(
            "otelworker_tenant_records_accepted",
            "Records staged and acknowledged, by tenant.",
            ["tenant", "signal"],
            registry=r,
        )
        self.tenant_bytes_accepted = Counter(
            "otelworker_tenant_bytes_accepted",
            "Bytes of decompressed OTLP payload staged, by tenant.",
            ["tenant", "signal"],
            registry=r,
        )
        self.tenant_requests_refused = Counter(
            "otelworker_tenant_requests_refused",
            "Requests refused or shed, by tenant and reason (unauthenticated requests have"
            " no tenant and are not here).",
            ["tenant", "signal", "reason"],
            registry=r,
        )
        self.tenant_records_refused = Counter(
            "otelworker_tenant_records_refused",
            "Records refused or shed, by tenant and reason (where the body was decoded).",
            ["tenant", "signal", "reason"],
            registry=r,
        )
        self.tenant_bytes_refused = Counter(
            "otelworker_tenant_bytes_refused",
            "Bytes refused or shed, by tenant and reason (decompressed where the body was"
            " decompressed, else as received).",
            ["tenant", "signal", "reason"],
            registry=r,
        )
        self.staged_bytes = Counter(
            "otelworker_staged_bytes",
            "Bytes written to ingestion_queue for payloads (as stored: compressed).",
            ["signal"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "otelworker_stage_duration_seconds",
            "Time from a request's payload being ready to its commit in the staging queue.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.commit_outcome_unknown = Counter(
            "otelworker_commit_outcome_unknown",
            "Requests answered 503 whose commit may have happened (it timed out), by"
            " reason: commit_timeout, or sync_replication_wait when this role's commits"
            " were waiting for a synchronous standby (committed on the primary, not yet"
            " acknowledged by the standby).",
            ["reason"],
            registry=r,
        )
        self.durability_scope = Gauge(
            "otelworker_durability_scope",
            "1 for the scope of the 2xx promise read from the database's replication"
            " settings (single_node, synchronous_replica or unknown), 0 for the others.",
            ["scope"],
            registry=r,
        )
        self.group_commit_size = Histogram(
            "otelworker_group_commit_requests",
            "Requests per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.staging_backlog = Gauge(
            "otelworker_staging_backlog_items",
            "Items staged and not yet exported (pending, processing, failed), as admission"
            " sees it.",
            registry=r,
        )
        self.staging_oldest_age = Gauge(
            "otelworker_staging_oldest_age_seconds",
            "Age of the oldest item staged and not yet exported (0 when none), as of the"
            " last backlog count. Ingress processes only.",
            registry=r,
        )
        self.staging_dead = Gauge(
            "otelworker_staging_dead_items",
            "Dead rows in ingestion_queue (attempts exhausted or undecodable), as of the"
            " last backlog count. Ingress processes only.",
            registry=r,
        )
        self.staging_backlog_limit = Gauge(
            "otelworker_staging_backlog_limit_items",
            "STAGING_MAX_BACKLOG.",
            registry=r,
        )
        self.buffer_depth = Gauge(
            "otelworker_buffer_items",
            "Items claimed into worker memory and not yet finished.",
            registry=r,
        )
        self.buffer_capacity = Gauge(
            "otelworker_buffer_capacity_items",
            "PROCESSING_QUEUE_MAX_DEPTH.",
            registry=r,
        )
        self.paused_seconds = Counter(
            "otelworker_polling_paused_seconds",
            "Time polling spent paused because the buffer was full.",
            registry=r,
        )
        self.pauses = Counter(
            "otelworker_polling_pauses",
            "Times polling paused because the buffer was full.",
            registry=r,
        )
        self.items_claimed = Counter(
            "otelworker_items_claimed",
            "Staged items claimed by this worker.",
            ["signal"],
            registry=r,
        )
        self.batches = Counter(
            "otelworker_batches_flushed",
            "Batches uploaded and indexed.",
            ["signal"],
            registry=r,
        )
        self.batch_items = Histogram(
            "otelworker_batch_items",
            "Items per flushed batch.",
            ["signal"],
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.batch_records = Counter(
            "otelworker_records_exported",
            "Records written to object storage and indexed.",
            ["signal"],
            registry=r,
        )
        self.batch_bytes = Counter(
            "otelworker_object_bytes",
            "Compressed bytes uploaded to object storage.",
            ["signal"],
            registry=r,
        )
        self.upload_duration = Histogram(
            "otelworker_upload_duration_seconds",
            "Object upload time.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_failures = Counter(
            "otelworker_batch_failures",
            "Batches whose upload or index write failed, by error class.",
            ["signal", "reason"],
            registry=r,
        )
        self.items_dead = Counter(
            "otelworker_items_dead",
            "Items moved to dead (attempts exhausted or undecodable).",
            ["signal", "reason"],
            registry=r,
        )
        self.queue_vacuums = Counter(
            "otelworker_queue_vacuums",
            "VACUUMs of ingestion_queue this process ran (QUEUE_VACUUM_INTERVAL_S).",
            registry=r,
        )
        self.queue_vacuum_seconds = Counter(
            "otelworker_queue_vacuum_seconds",
            "Time spent in those VACUUMs.",
            registry=r,
        )
        self.orphans = Counter(
            "otelworker_orphan_objects",
            "Uploaded objects left out of the manifest (their index transaction did not commit).",
            ["signal"],
            registry=r,
        )
        # --- forwarding (otelworker/forwarding; the gauges as of the last stats count) ---
        self.forward_delivered_records = Counter(
            "otelworker_forward_delivered_records",
            "Records a destination took (acknowledged, not counting those it rejected).",
            ["destination", "signal"],
            registry=r,
        )
        self.forward_rejected_records = Counter(
            "otelworker_forward_rejected_records",
            "Records a destination rejected in a partial success (not retried).",
            ["destination", "signal"],
            registry=r,
        )
        self.forward_attempts = Counter(
            "otelworker_forward_attempts",
            "Delivery attempts (one per object sent, whatever its parts), by outcome:"
            " delivered, retry, permanent, object_missing, object_store_error.",
            ["destination", "outcome"],
            registry=r,
        )
        self.forward_pending_objects = Gauge(
            "otelworker_forward_pending_objects",
            "Deliveries not yet taken by the destination (pending or being sent).",
            ["destination"],
            registry=r,
        )
        self.forward_lag = Gauge(
            "otelworker_forward_lag_seconds",
            "Age of the oldest delivery the destination has not taken yet (0 when none).",
            ["destination"],
            registry=r,
        )
        self.forward_dead_objects = Gauge(
            "otelworker_forward_dead_objects",
            "Deliveries parked dead (a permanent refusal, or the object is gone);"
            " requeue-dead --destination brings them back.",
            ["destination"],
            registry=r,
        )
        self.forward_lost_objects = LostObjects()
        r.register(self.forward_lost_objects)
        # --- compaction (otelworker/columnar/compact.py; ROLE=compactor) ------------------
        self.compact_files = Counter(
            "otelworker_compact_files",
            "Parquet files recorded in parquet_files (their source objects marked"
            " compacted in the same transaction), by table.",
            ["table"],
            registry=r,
        )
        self.compact_records = Counter(
            "otelworker_compact_records",
            "Rows in the Parquet files recorded, by table.",
            ["table"],
            registry=r,
        )
        self.compact_bytes = Counter(
            "otelworker_compact_bytes",
            "Bytes of the Parquet files recorded (as uploaded), by table.",
            ["table"],
            registry=r,
        )
        self.compact_source_objects = Counter(
            "otelworker_compact_source_objects",
            "OTLP objects (manifest rows) marked compacted, by signal.",
            ["signal"],
            registry=r,
        )
        self.compact_failures = Counter(
            "otelworker_compact_failures",
            "Compaction failures, by reason: object_missing, object_corrupt (an object left"
            " uncompacted), lost_race (a chunk another compactor recorded first: its files"
            " orphans), object_store_error, database_error (a pass that failed).",
            ["reason"],
            registry=r,
        )
        self.compact_runs = Counter(
            "otelworker_compact_runs",
            "Compaction passes run (every tenant and signal once), whatever their outcome.",
            registry=r,
        )
        self.compact_lag = Gauge(
            "otelworker_compact_lag_seconds",
            "Age of the oldest OTLP object due for compaction and not compacted yet (0 when"
            " none), as of the last pass. Compactor processes only.",
            registry=r,
        )
