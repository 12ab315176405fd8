"""The verify scenarios: each starts the real service with small limits, pushes it into
one overload or failure, and checks invariants against what the stores hold.

Every scenario ends with the accounting invariant (:func:`check_accounting`): once
``ingestion_queue`` has drained, the records answered 200 are exactly the records in the
objects that ``export_batches`` lists (none missing, none twice), records answered
202/429 are absent, and an unanswered request is stored whole or not at all. The
``grpc`` scenario sends over OTLP/gRPC, each answer counted as its HTTP analogue (OK 200,
OK with partial_success 202, RESOURCE_EXHAUSTED 429: :mod:`loadtest.otlp_grpc`). The
``tenants`` scenario also holds it per tenant: a tenant's records in its own objects only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
from google.rpc import status_pb2
from isal import igzip
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from loadtest.stress_env import (
    BASE_SETTINGS,
    ENCODINGS,
    UNKNOWN,
    Exported,
    GrpcSender,
    Harness,
    Ledger,
    Sender,
    Sent,
    Service,
    Stores,
    Target,
    account,
    check,
    check_accounting,
    mixed_plan,
    no_bug_events,
    wait_until,
)
from loadtest.stress_proxy import TcpProxy
from loadtest.stress_records import Template

RESOURCE_EXHAUSTED = 8
RESPONSE_TYPES = {
    "traces": ExportTraceServiceResponse,
    "logs": ExportLogsServiceResponse,
    "metrics": ExportMetricsServiceResponse,
}
REJECTED_FIELD = {
    "traces": "rejected_spans",
    "logs": "rejected_log_records",
    "metrics": "rejected_data_points",
}


@dataclass
class Report:
    """What a scenario found, one line per fact; ``lines[0]`` is the headline."""

    lines: list[str] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)

    def add(self, line: str) -> None:
        self.lines.append(line)


Scenario = Callable[[Harness, Report], Awaitable[None]]


def _status_code(sent: Sent) -> int:
    """The google.rpc.Status code of an error body, in the request's encoding."""
    if sent.encoding == "json":
        return int(json.loads(sent.body or b"{}").get("code", -1))
    status = status_pb2.Status()
    status.ParseFromString(sent.body)
    return int(status.code)


def _check_429s(refused: list[Sent], name: str) -> None:
    for sent in refused:
        check(
            sent.retry_after is not None
            and sent.retry_after.isdigit()
            and int(sent.retry_after) >= 1,
            f"{name}_retry_after",
            f"request {sent.index} answered 429 with Retry-After {sent.retry_after!r}",
        )
        check(
            _status_code(sent) == RESOURCE_EXHAUSTED,
            f"{name}_status_body",
            f"request {sent.index}: 429 body is not a google.rpc.Status RESOURCE_EXHAUSTED",
        )


def _statuses(sents: list[Sent]) -> str:
    counts: dict[int, int] = {}
    for s in sents:
        counts[s.status] = counts.get(s.status, 0) + 1
    return ", ".join(f"{k or 'no answer'}: {v}" for k, v in sorted(counts.items()))


# --- 1. rate limit ---------------------------------------------------------------------

RL_RPS = 5.0
RL_BURST = 20
RL_GAP_S = 2.0


async def rate_limit(h: Harness, report: Report) -> None:
    """A burst against the token bucket, a pause to refill, another burst.

    The bucket starts full and refills at RATE_LIMIT_RPS. With t the whole run
    (first request sent to last answer) and g the measured pause between the bursts,
    the 200s must lie within [BURST + min(second burst, floor(RPS * g)),
    floor(BURST + RPS * t)]: the first burst is owed BURST tokens, the pause at least
    RPS * g more (capped by BURST), and no run can take more than BURST + RPS * t.
    """
    target = await h.target("ratelimit")
    settings = {
        "ENABLE_RATE_LIMITING": "true",
        "RATE_LIMIT_RPS": str(RL_RPS),
        "RATE_LIMIT_BURST": str(RL_BURST),
    }
    service = await h.service(target, "ratelimit", settings).start()
    ledger = Ledger()
    sender = Sender(ledger)
    stores = Stores(target)
    try:
        first, second = 80, 40
        plan = [(s, min(r, 3), e) for s, r, e in mixed_plan(first + second)]
        t0 = time.monotonic()
        a = await sender.send_many(service, plan[:first], concurrency=16)
        t1 = time.monotonic()
        await asyncio.sleep(RL_GAP_S)  # the refill being measured, not a wait for luck
        t2 = time.monotonic()
        b = await sender.send_many(service, plan[first:], concurrency=16)
        t3 = time.monotonic()
        gap, elapsed = t2 - t1, t3 - t0
        sents = a + b
        check(
            all(s.status in (200, 429) for s in sents),
            "rate_limit_only_200_or_429",
            _statuses(sents),
        )
        ok = sum(s.status == 200 for s in sents)
        low = RL_BURST + min(second, math.floor(RL_RPS * gap))
        high = math.floor(RL_BURST + RL_RPS * elapsed)
        check(
            low <= ok <= high,
            "rate_limit_token_arithmetic",
            f"{ok} of {len(sents)} answered 200; the bucket allows {low}..{high} "
            f"(burst {RL_BURST}, {RL_RPS}/s, pause {gap:.2f} s, run {elapsed:.2f} s)",
        )
        check(
            any(s.status == 429 for s in a) and any(s.status == 429 for s in b),
            "rate_limit_both_bursts_limited",
            f"first burst: {_statuses(a)}; second: {_statuses(b)}",
        )
        refused = [s for s in sents if s.status == 429]
        _check_429s(refused, "rate_limit")
        await service.wait_event("rate_limited", "limit_exceeded", within=10)
        metrics = await service.metrics(sender.client)
        served_429 = metrics.value("otelworker_requests_total", code="429")
        check(
            served_429 == len(refused),
            "rate_limit_metrics_agree",
            f"/metrics counts {served_429:.0f} 429s, the client saw {len(refused)}",
        )
        accounting = await check_accounting(ledger, stores)
        await service.stop()
        logged = service.event_count("rate_limited", "limit_exceeded")
        check(
            logged == len(refused),
            "rate_limit_logged",
            f"rate_limited/limit_exceeded events count {logged}, the client saw {len(refused)}",
        )
        no_bug_events(service)
        report.add(
            f"{ok}/{len(sents)} answered 200 (token bucket allows {low}..{high}), "
            f"{len(refused)} x 429 each with Retry-After"
        )
        report.add(f"log: rate_limited/limit_exceeded x {logged}; {accounting.line()}")
        report.data.update(ok=ok, low=low, high=high, refused=len(refused), gap_s=gap)
    finally:
        await sender.aclose()
        await stores.close()


# --- 2. saturation under each policy ---------------------------------------------------

SAT_CAP = 8
SAMPLE_RATE = 0.25
SAMPLE_N = 300
SAMPLE_SIGMAS = 4.0


async def saturation(h: Harness, report: Report) -> None:
    """ROLE=ingress (no worker), STAGING_MAX_BACKLOG=8: fill it, then each policy in turn.

    The same database carries over: each restart counts the backlog from the table and
    starts saturated. After the three policies a ROLE=worker process drains it all.
    """
    target = await h.target("saturation")
    ledger = Ledger()
    sender = Sender(ledger)
    stores = Stores(target)
    base = {
        "ROLE": "ingress",
        "STAGING_MAX_BACKLOG": str(SAT_CAP),
        "BACKLOG_REFRESH_INTERVAL_MS": "100",
        "SATURATED_RETRY_AFTER_S": "2",
    }

    async def staged_matches(policy: str) -> None:
        counts = await stores.staged_ids()
        found, _ = account(ledger, counts, f"ingestion_queue after {policy}")
        check(
            found == ledger.records(200),
            f"{policy}_nothing_else_staged",
            f"ingestion_queue holds {found} records, {ledger.records(200)} were acknowledged",
        )

    services: list[Service] = []
    try:
        # reject ------------------------------------------------------------------------
        svc = await h.service(target, "reject", {**base, "OVERFLOW_POLICY": "reject"}).start()
        services.append(svc)
        fill = await sender.send_many(svc, mixed_plan(SAT_CAP), concurrency=1)
        check(
            all(s.status == 200 for s in fill),
            "saturation_fill_accepted",
            f"the first {SAT_CAP} requests (backlog below the cap): {_statuses(fill)}",
        )
        over = await sender.send_many(svc, mixed_plan(30), concurrency=4)
        check(
            all(s.status == 429 for s in over),
            "reject_answers_429",
            f"{_statuses(over)} with the backlog at its cap",
        )
        _check_429s(over, "reject")
        await svc.wait_event("queue_saturated", "queue_full_reject", within=10)
        backlog = (await svc.metrics(sender.client)).value("otelworker_staging_backlog_items")
        check(backlog >= SAT_CAP, "reject_backlog_seen", f"backlog gauge {backlog}")
        await staged_matches("reject")
        await svc.stop()
        logged = svc.event_count("queue_saturated", "queue_full_reject")
        check(
            logged == len(over),
            "reject_logged",
            f"queue_saturated/queue_full_reject count {logged}, {len(over)} refused",
        )
        report.add(
            f"reject: {SAT_CAP} x 200 filled the backlog, then {len(over)} x 429 "
            f"(Retry-After, queue_saturated x {logged}); ingestion_queue holds only the 200s"
        )

        # drop --------------------------------------------------------------------------
        svc = await h.service(target, "drop", {**base, "OVERFLOW_POLICY": "drop"}).start()
        services.append(svc)
        dropped = await sender.send_many(svc, mixed_plan(30), concurrency=4)
        check(
            all(s.status == 202 for s in dropped),
            "drop_answers_202",
            f"{_statuses(dropped)} (a restart must count the staged backlog)",
        )
        for sent in dropped:
            _check_partial_success(sent)
        await svc.wait_event("load_shedding", "queue_full_drop_or_sample", within=10)
        await staged_matches("drop")
        await svc.stop()
        shed = svc.event_count("load_shedding", "queue_full_drop_or_sample")
        check(shed == len(dropped), "drop_logged", f"load_shedding count {shed}")
        report.add(
            f"drop: {len(dropped)} x 202 with partial_success (load_shedding x {shed}); "
            "nothing staged for them"
        )

        # sample ------------------------------------------------------------------------
        sample_settings = {
            **base,
            "OVERFLOW_POLICY": "sample",
            "OVERFLOW_SAMPLE_RATE": str(SAMPLE_RATE),
            "OVERFLOW_SAMPLE_SEED": "20240601",
        }
        svc = await h.service(target, "sample", sample_settings).start()
        services.append(svc)
        plan = [(s, 1, "protobuf") for s, _, _ in mixed_plan(SAMPLE_N)]
        sampled = await sender.send_many(svc, plan, concurrency=4)
        check(
            all(s.status in (200, 202) for s in sampled),
            "sample_answers_200_or_202",
            _statuses(sampled),
        )
        kept = sum(s.status == 200 for s in sampled)
        mean = SAMPLE_N * SAMPLE_RATE
        spread = SAMPLE_SIGMAS * math.sqrt(SAMPLE_N * SAMPLE_RATE * (1 - SAMPLE_RATE))
        check(
            abs(kept - mean) <= spread,
            "sample_fraction_near_rate",
            f"{kept}/{SAMPLE_N} accepted, expected {mean:.0f} +- {spread:.0f} "
            f"({SAMPLE_SIGMAS:.0f} sigma of Binomial({SAMPLE_N}, {SAMPLE_RATE}))",
        )
        for sent in sampled:
            if sent.status == 202:
                _check_partial_success(sent)
        await staged_matches("sample")
        await svc.stop()
        report.add(
            f"sample: {kept}/{SAMPLE_N} = {kept / SAMPLE_N:.2f} accepted at "
            f"OVERFLOW_SAMPLE_RATE {SAMPLE_RATE} (tolerance +-{spread / SAMPLE_N:.2f}); "
            "the rest 202, not staged"
        )

        # drain ---------------------------------------------------------------------------
        worker = await h.service(target, "drain", {**base, "ROLE": "worker"}).start()
        services.append(worker)
        accounting = await check_accounting(ledger, stores)
        await worker.stop()
        no_bug_events(*services)
        report.add(f"ROLE=worker drain: {accounting.line()}")
        report.data.update(sample_kept=kept, sample_n=SAMPLE_N)
    finally:
        await sender.aclose()
        await stores.close()


def _check_partial_success(sent: Sent) -> None:
    """A shed request's 202 says how many records were rejected: all of them."""
    field_name = REJECTED_FIELD[sent.signal]
    if sent.encoding == "json":
        tree = json.loads(sent.body or b"{}").get("partialSuccess", {})
        camel = "".join(w.capitalize() if i else w for i, w in enumerate(field_name.split("_")))
        rejected = int(tree.get(camel, 0))
    else:
        message = RESPONSE_TYPES[sent.signal]()
        message.ParseFromString(sent.body)
        rejected = int(getattr(message.partial_success, field_name))
    check(
        rejected == sent.records,
        "shed_partial_success",
        f"request {sent.index}: 202 reports {rejected} rejected of {sent.records}",
    )


# --- 3. slow object store --------------------------------------------------------------

SLOW_DEPTH = 10
SLOW_BATCH = 5
SLOW_CONCURRENCY = 1
SLOW_DELAY_S = 0.4
SLOW_REQUESTS = 200
SLOW_RECORDS = 100
SLOW_PAD = 2000
SLOW_RSS_GROWTH_MB = 24


@dataclass
class Sample:
    t: float
    buffer: float
    capacity: float
    processing: int
    pending: int
    rss: int


async def _sample_forever(
    service: Service, sender: Sender, stores: Stores, out: list[Sample], interval: float
) -> None:
    t0 = time.monotonic()
    while True:
        try:
            metrics = await service.metrics(sender.client)
            status = await stores.queue_status()
            out.append(
                Sample(
                    time.monotonic() - t0,
                    metrics.value("otelworker_buffer_items"),
                    metrics.value("otelworker_buffer_capacity_items"),
                    status.get("processing", 0),
                    status.get("pending", 0) + status.get("failed", 0),
                    service.rss(),
                )
            )
        except Exception:  # a sample missed under load is not a finding
            pass
        await asyncio.sleep(interval)


async def slow_store(h: Harness, report: Report) -> None:
    """Every byte to and from S3 is delayed; the worker must pause, not hoard."""
    assert h.s3 is not None
    target = await h.target("slow")
    proxy = TcpProxy.for_url(h.s3.endpoint_url)
    settings = {
        "PROCESSING_QUEUE_MAX_DEPTH": str(SLOW_DEPTH),
        "BATCH_MAX_SIZE": str(SLOW_BATCH),
        "WORKER_CONCURRENCY": str(SLOW_CONCURRENCY),
        "LEASE_TIMEOUT_S": "30",
        "S3_TIMEOUT_S": "30",
    }
    service = h.service(target, "slow", settings, s3_url=proxy.url_for(h.s3.endpoint_url))
    ledger = Ledger()
    sender = Sender(ledger, pad=SLOW_PAD)
    stores = Stores(target)
    samples: list[Sample] = []
    sampler: asyncio.Task[None] | None = None
    try:
        await service.start()
        warm = await sender.send_many(service, [("traces", SLOW_RECORDS, "protobuf")] * 4, 2)
        check(all(s.status == 200 for s in warm), "slow_warmup_accepted", _statuses(warm))
        await stores.wait_drained(30)
        baseline = service.rss()
        proxy.delay(SLOW_DELAY_S)
        sampler = asyncio.create_task(_sample_forever(service, sender, stores, samples, 0.1))
        plan = [("traces", SLOW_RECORDS, "protobuf")] * SLOW_REQUESTS
        t0 = time.monotonic()
        load = await sender.send_many(service, plan, concurrency=4)
        ingest_s = time.monotonic() - t0
        check(all(s.status == 200 for s in load), "slow_ingest_accepted", _statuses(load))
        staged_mb = sum(len(sender.template("traces", SLOW_RECORDS).make(1)) for _ in load) / 2**20
        paused = await service.wait_event("processing_paused", "buffer_full", within=30)
        await asyncio.sleep(2.0)  # more samples while paused (observation, not a wait for luck)
        proxy.pass_through()
        accounting = await check_accounting(ledger, stores, drain_timeout=120)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        sampler = None
        check(len(samples) >= 10, "slow_sampled", f"only {len(samples)} samples of /metrics")
        worst = max(samples, key=lambda s: s.buffer)
        check(
            all(s.buffer <= s.capacity == SLOW_DEPTH for s in samples),
            "buffer_within_capacity",
            f"otelworker_buffer_items {worst.buffer} > capacity {worst.capacity} "
            f"at {worst.t:.1f} s",
        )
        check(
            any(s.buffer == SLOW_DEPTH and s.pending > 0 for s in samples),
            "slow_backlog_waits",
            "no sample saw a full buffer with rows waiting: the store was not slow enough",
        )
        # Claims: the buffer's payloads plus the batches whose object is stored and whose
        # index is committing (they free their room at the upload, not at the commit).
        most = max(s.processing for s in samples)
        claim_bound = SLOW_DEPTH + SLOW_CONCURRENCY * SLOW_BATCH
        check(
            most <= claim_bound,
            "claims_within_capacity",
            f"{most} rows in processing at once (PROCESSING_QUEUE_MAX_DEPTH {SLOW_DEPTH} + "
            f"WORKER_CONCURRENCY x BATCH_MAX_SIZE {SLOW_CONCURRENCY * SLOW_BATCH})",
        )
        peak = max(s.rss for s in samples)
        growth_mb = (peak - baseline) / 2**20
        check(
            growth_mb <= SLOW_RSS_GROWTH_MB,
            "memory_bounded",
            f"RSS grew {growth_mb:.0f} MB (baseline {baseline / 2**20:.0f} MB, peak "
            f"{peak / 2**20:.0f} MB) with {staged_mb:.0f} MB staged; bound {SLOW_RSS_GROWTH_MB} MB",
        )
        pauses = len(service.events("processing_paused", "buffer_full"))
        resumed = service.events("processing_resumed")
        await service.stop()
        no_bug_events(service)
        report.add(
            f"{SLOW_REQUESTS} x {staged_mb / SLOW_REQUESTS * 1024:.0f} KiB staged in "
            f"{ingest_s:.1f} s with S3 {SLOW_DELAY_S * 1000:.0f} ms away; "
            f"processing_paused/buffer_full x {pauses} (first at depth "
            f"{paused.get('buffer_depth')}/{paused.get('buffer_capacity')}), "
            f"resumed x {len(resumed)}"
        )
        report.add(
            f"{len(samples)} samples: buffer max {worst.buffer:.0f}/{SLOW_DEPTH}, processing rows "
            f"max {most}; RSS {baseline / 2**20:.0f} -> peak {peak / 2**20:.0f} MB "
            f"(+{growth_mb:.0f} MB <= {SLOW_RSS_GROWTH_MB} MB) for {staged_mb:.0f} MB staged"
        )
        report.add(accounting.line())
        report.data.update(rss_growth_mb=growth_mb, staged_mb=staged_mb, pauses=pauses)
    finally:
        if sampler is not None:
            sampler.cancel()
        proxy.close()
        await sender.aclose()
        await stores.close()


# --- 4. object store outage ------------------------------------------------------------


async def store_outage(h: Harness, report: Report) -> None:
    """S3 refuses every connection while data arrives; then it comes back."""
    assert h.s3 is not None
    target = await h.target("outage")
    proxy = TcpProxy.for_url(h.s3.endpoint_url)
    proxy.refuse()
    settings = {
        "RETRY_BACKOFF_INITIAL_MS": "200",
        "RETRY_BACKOFF_MAX_MS": "800",
        "MAX_ATTEMPTS": "2",  # an outage must not spend them
        "S3_TIMEOUT_S": "3",
    }
    service = h.service(target, "outage", settings, s3_url=proxy.url_for(h.s3.endpoint_url))
    ledger = Ledger()
    sender = Sender(ledger)
    stores = Stores(target)
    try:
        await service.start()
        sent = await sender.send_many(service, mixed_plan(45), concurrency=4)
        check(
            all(s.status == 200 for s in sent),
            "outage_ingest_accepted",
            f"{_statuses(sent)}: staging does not need the object store",
        )
        failed = await service.wait_event("batch_persist_failed", None, within=20)

        async def failures_so_far() -> float:
            metrics = await service.metrics(sender.client)
            return float(metrics.value("otelworker_batch_failures_total"))

        # Retried through the outage (several failed flushes), and an outage is not the
        # rows' fault: no attempt counted, no row dead (MAX_ATTEMPTS is not a clock).
        await wait_until(failures_so_far, lambda n: n >= 3, within=30, what="outage_rows_retried")
        retried = [
            dict(r)
            for r in await stores.fetch(
                "SELECT status, attempts, last_error FROM ingestion_queue "
                "WHERE last_error IS NOT NULL ORDER BY id LIMIT 50"
            )
        ]
        check(bool(retried), "outage_rows_failed", "no row was marked failed during the outage")
        check(
            all(r["attempts"] == 0 and r["status"] != "dead" for r in retried),
            "outage_not_counted",
            f"an outage counted as the rows' attempts: {retried[:3]}",
        )
        manifest = await stores.fetchval("SELECT count(*) FROM export_batches")
        check(manifest == 0, "outage_nothing_indexed", f"{manifest} manifest rows during outage")
        failures = (await service.metrics(sender.client)).value("otelworker_batch_failures_total")
        check(failures > 0, "outage_failures_counted", "otelworker_batch_failures_total is 0")
        proxy.pass_through()
        accounting = await check_accounting(ledger, stores, drain_timeout=90)
        await service.stop()
        no_bug_events(service)
        events = len(service.events("batch_persist_failed"))
        report.add(
            f"{len(sent)} x 200 while S3 refused; batch_persist_failed x {events} "
            f"(reason {failed.get('reason')}), rows failed with no attempt counted "
            f"({retried[0]['last_error'][:60]!r})"
        )
        report.add(f"after recovery: drained; {accounting.line()}")
        report.data.update(persist_failed=events, proxy_refused=proxy.refused)
    finally:
        proxy.close()
        await sender.aclose()
        await stores.close()


# --- 5. SIGKILL under load, restart ---------------------------------------------------------

KILL_LEASE_S = 3


async def sigkill(h: Harness, report: Report) -> None:
    """Kill -9 the service mid-load and mid-export; a restart must finish the job."""
    assert h.s3 is not None
    target = await h.target("sigkill")
    proxy = TcpProxy.for_url(h.s3.endpoint_url)
    proxy.delay(0.05)  # uploads in flight at the moment of the kill
    settings = {"LEASE_TIMEOUT_S": str(KILL_LEASE_S), "PROCESSING_QUEUE_MAX_DEPTH": "20"}
    s3_url = proxy.url_for(h.s3.endpoint_url)
    first = h.service(target, "victim", settings, s3_url=s3_url)
    ledger = Ledger()
    sender = Sender(ledger, pad=64)
    stores = Stores(target)
    halt = False
    try:
        await first.start()
        endless = (
            (("traces", "logs", "metrics")[i % 3], i % 9 + 1, ENCODINGS[i % 2])
            for i in itertools.count()
        )
        load = asyncio.create_task(
            sender.send_many(first, endless, concurrency=6, stop=lambda _: halt)
        )

        async def progress() -> tuple[int, int]:
            batches = await stores.fetchval("SELECT count(*) FROM export_batches")
            return int(batches), len(ledger.with_status(200))

        await wait_until(
            progress,
            lambda p: p[0] >= 3 and p[1] >= 60,
            within=60,
            what="sigkill_load_under_way",
        )
        # Blocking on purpose: no new request starts between the kill and the halt, so
        # the unanswered ones are exactly those in flight when the process died.
        first.kill()
        halt = True
        await load
        check(not first.alive(), "sigkill_killed", "the service survived SIGKILL")
        status = await stores.queue_status()
        acked = len(ledger.with_status(200))
        lost = len(ledger.with_status(UNKNOWN))
        second = h.service(target, "restart", settings, s3_url=s3_url)
        await second.start()
        accounting = await check_accounting(ledger, stores, drain_timeout=90)
        await second.stop()
        no_bug_events(first, second)
        report.add(
            f"SIGKILL after {acked} x 200 with {lost} requests in flight; queue at the kill: "
            f"{status}"
        )
        report.add(f"restart (LEASE_TIMEOUT_S {KILL_LEASE_S}) drained; {accounting.line()}")
        report.data.update(acked=acked, in_flight=lost, queue_at_kill=status)
    finally:
        halt = True
        proxy.close()
        await sender.aclose()
        await stores.close()


# --- 6. OTLP/gRPC through the same intake ----------------------------------------------------

GRPC_CAP = 150
GRPC_BURST = 200
GRPC_RPS = 10.0
GRPC_REQUESTS = 400
GRPC_CONCURRENCY = 8


async def grpc_transport(h: Harness, report: Report) -> None:
    """OTLP/gRPC (GRPC_ENABLED, its own port): acknowledged, shed and throttled in one run.

    ROLE=ingress (nothing drains), STAGING_MAX_BACKLOG=150, OVERFLOW_POLICY=drop and a token
    bucket of 200 refilling at 10/s. 400 requests (the three signals, 1-12 records,
    protobuf and gzip message compression) at 8 in flight over two channels: the first
    150 fill the backlog (OK), the rest of the burst is shed (OK with partial_success
    rejecting every record), then the bucket is dry (RESOURCE_EXHAUSTED with RetryInfo).
    The staged rows hold exactly the OK records; a ROLE=worker process drains them and
    the accounting invariant holds, gRPC answers counted as their HTTP analogues.
    """
    target = await h.target("grpc")
    settings = {
        "ROLE": "ingress",
        "STAGING_MAX_BACKLOG": str(GRPC_CAP),
        "OVERFLOW_POLICY": "drop",
        "ENABLE_RATE_LIMITING": "true",
        "RATE_LIMIT_RPS": str(GRPC_RPS),
        "RATE_LIMIT_BURST": str(GRPC_BURST),
    }
    ledger = Ledger()
    sender = GrpcSender(ledger, channels=2)
    stores = Stores(target)
    services: list[Service] = []
    try:
        svc = await h.service(target, "ingress", settings, grpc=True).start()
        services.append(svc)
        plan = [
            (s, r, "gzip" if e == "gzip" else "protobuf") for s, r, e in mixed_plan(GRPC_REQUESTS)
        ]
        t0 = time.monotonic()
        sents = await sender.send_many(svc, plan, concurrency=GRPC_CONCURRENCY)
        elapsed = time.monotonic() - t0
        check(
            all(s.status in (200, 202, 429) for s in sents),
            "grpc_only_ok_shed_or_exhausted",
            f"{_grpc_codes(sents)}; unanswered: {[s.error for s in sents if not s.status][:3]}",
        )
        ok = [s for s in sents if s.status == 200]
        shed = [s for s in sents if s.status == 202]
        refused = [s for s in sents if s.status == 429]
        check(
            GRPC_CAP <= len(ok) <= GRPC_CAP + GRPC_CONCURRENCY - 1,
            "grpc_backlog_cap",
            f"{len(ok)} OK with STAGING_MAX_BACKLOG {GRPC_CAP} and {GRPC_CONCURRENCY} in flight",
        )
        passed = len(ok) + len(shed)
        high = math.floor(GRPC_BURST + GRPC_RPS * elapsed)
        check(
            GRPC_BURST <= passed <= high,
            "grpc_rate_limit_token_arithmetic",
            f"{passed} requests passed the rate limit; the bucket allows {GRPC_BURST}..{high} "
            f"(burst {GRPC_BURST}, {GRPC_RPS}/s, run {elapsed:.2f} s)",
        )
        check(
            bool(refused) or high >= GRPC_REQUESTS,
            "grpc_rate_limited",
            f"no RESOURCE_EXHAUSTED: {_grpc_codes(sents)}",
        )
        _check_429s(refused, "grpc")
        for sent in refused:
            check(
                sent.retry_info_twice,
                "grpc_retry_info",
                f"request {sent.index}: RESOURCE_EXHAUSTED without RetryInfo both in "
                "grpc-status-details-bin and google.rpc.retryinfo-bin",
            )
        for sent in shed:
            _check_partial_success(sent)
        counts = await stores.staged_ids()
        found, _ = account(ledger, counts, "ingestion_queue")
        check(
            found == ledger.records(200),
            "grpc_nothing_else_staged",
            f"ingestion_queue holds {found} records, {ledger.records(200)} were acknowledged",
        )
        metrics = await svc.metrics(sender.client)
        served_ok = metrics.value("otelworker_requests_total", transport="grpc", code="OK")
        served_re = metrics.value(
            "otelworker_requests_total", transport="grpc", code="RESOURCE_EXHAUSTED"
        )
        check(
            served_ok == passed and served_re == len(refused),
            "grpc_metrics_agree",
            f"/metrics counts {served_ok:.0f} OK and {served_re:.0f} RESOURCE_EXHAUSTED; "
            f"the client saw {passed} and {len(refused)}",
        )
        await svc.stop()
        logged_shed = svc.event_count("load_shedding", "queue_full_drop_or_sample")
        logged_limited = svc.event_count("rate_limited", "limit_exceeded")
        check(
            logged_shed == len(shed) and logged_limited == len(refused),
            "grpc_logged",
            f"load_shedding x {logged_shed} and rate_limited x {logged_limited}; the client "
            f"saw {len(shed)} shed and {len(refused)} refused",
        )
        worker = await h.service(target, "drain", {"ROLE": "worker"}).start()
        services.append(worker)
        accounting = await check_accounting(ledger, stores)
        await worker.stop()
        no_bug_events(*services)
        report.add(
            f"{len(sents)} gRPC requests in {elapsed:.1f} s: {len(ok)} OK (backlog cap "
            f"{GRPC_CAP}), {len(shed)} OK+partial_success (shed), {len(refused)} "
            f"RESOURCE_EXHAUSTED with RetryInfo (bucket allows {GRPC_BURST}..{high} through)"
        )
        report.add(f"ROLE=worker drain: {accounting.line()}")
        report.data.update(ok=len(ok), shed=len(shed), refused=len(refused), elapsed_s=elapsed)
    finally:
        await sender.aclose()
        await stores.close()


def _grpc_codes(sents: list[Sent]) -> str:
    counts: dict[str, int] = {}
    for s in sents:
        name = "OK+partial_success" if s.status == 202 else s.grpc_code or "no answer"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


# --- 7. 200 concurrent near-maximum bodies: peak RSS within a stated bound ---------------

MiB = 1 << 20
KiB = 1 << 10
BIG_MAX_BODY = 2 * MiB  # MAX_REQUEST_BODY_BYTES
BIG_INFLIGHT = 32 * MiB  # MAX_INFLIGHT_BYTES: 16 near-maximum bodies at the door at once
BIG_COMMIT_BYTES = 8 * MiB  # GROUP_COMMIT_MAX_BYTES
BIG_COMMITTERS = 2  # GROUP_COMMIT_WORKERS
BIG_QUEUE_BYTES = 16 * MiB  # PROCESSING_QUEUE_MAX_BYTES
BIG_BATCH = 4  # BATCH_MAX_SIZE
BIG_FLUSHES = 2  # WORKER_CONCURRENCY
BIG_SETTINGS = {
    "MAX_REQUEST_BODY_BYTES": str(BIG_MAX_BODY),
    "MAX_INFLIGHT_BYTES": str(BIG_INFLIGHT),
    "GROUP_COMMIT_MAX_BYTES": str(BIG_COMMIT_BYTES),
    "GROUP_COMMIT_WORKERS": str(BIG_COMMITTERS),
    "PROCESSING_QUEUE_MAX_BYTES": str(BIG_QUEUE_BYTES),
    "PROCESSING_QUEUE_MAX_DEPTH": "100",  # high, so that the bytes bind
    "BATCH_MAX_SIZE": str(BIG_BATCH),
    "WORKER_CONCURRENCY": str(BIG_FLUSHES),
    "LEASE_TIMEOUT_S": "30",
    "S3_TIMEOUT_S": "30",
}
# What hypercorn holds per connection before the app reads the body, counted by no
# setting of ours: max_app_queue_size (10) chunks of up to 64 KiB, its StreamReader's
# buffer (it pauses reading past 2 x 64 KiB) and one 64 KiB read in h11's buffer.
BIG_PER_CONNECTION = (10 + 2 + 1) * 64 * KiB
BIG_REQUESTS = 200  # at once, one connection each
BIG_RECORDS = 64
BIG_FILL = 0.97  # each body (decompressed) is this fraction of MAX_REQUEST_BODY_BYTES
BIG_DEADLINE_S = 60.0  # per wave: every request acknowledged by then
BIG_BACKOFF_MAX_S = 8.0
BIG_WRITE_CHUNK = 256 * KiB
BIG_SAMPLE_S = 0.05
# MAX_INFLIGHT_BYTES counts what an HTTP request sends, so a gzip body reserves its
# compressed bytes only, and its decompressed body and decoded message count against
# nothing but the connections (docs/stress-testing.md). Set True once the door reserves
# the decompressed bytes too: the gzip wave is then held to the same bound as the plain.
BIG_GZIP_COUNTED = True


def big_bound(
    baseline: int, connections: int, compressed: bool
) -> tuple[int, list[tuple[str, int]]]:
    """The peak RSS the settings allow the serving process, and its terms (bytes).

    At the door, each admitted body is held as read, decoded (upb: ~0.9 x its bytes) and
    compressed for staging (gzip level 1: <= 1 x) until its commit answers, and asyncpg
    encodes each group commit into one more copy; hypercorn buffers every connection's
    first chunks. In the worker, the buffer's payloads (plus one), the rows of a claim as
    asyncpg reads them, and per flush the joined object (at most a batch of payloads, or
    the buffer; kept until its index commits), what the HTTP client copies to send it and
    one payload decompressed for its check. Unless BIG_GZIP_COUNTED, a gzip
    request's decompressed body and decoded message are a term of their own, bounded by
    the connections alone.
    """
    batch = min(BIG_BATCH * BIG_MAX_BODY, BIG_QUEUE_BYTES + BIG_MAX_BODY)  # one object
    terms = [
        ("baseline", baseline),
        ("3 x MAX_INFLIGHT_BYTES", 3 * BIG_INFLIGHT),
        ("GROUP_COMMIT_WORKERS x GROUP_COMMIT_MAX_BYTES", BIG_COMMITTERS * BIG_COMMIT_BYTES),
        (
            f"{connections} connections x {BIG_PER_CONNECTION // KiB} KiB",
            connections * BIG_PER_CONNECTION,
        ),
        (
            "2 x (PROCESSING_QUEUE_MAX_BYTES + MAX_REQUEST_BODY_BYTES)",
            2 * (BIG_QUEUE_BYTES + BIG_MAX_BODY),
        ),
        (
            "WORKER_CONCURRENCY x (2 x BATCH_MAX_SIZE + 1) x MAX_REQUEST_BODY_BYTES",
            BIG_FLUSHES * (2 * batch + BIG_MAX_BODY),
        ),
    ]
    if compressed and not BIG_GZIP_COUNTED:
        terms.append(
            (
                f"{connections} gzip requests x 2 x MAX_REQUEST_BODY_BYTES",
                connections * 2 * BIG_MAX_BODY,
            )
        )
    return sum(v for _, v in terms), terms


def _vm(pid: int) -> dict[str, int]:
    """The Vm* lines of /proc/<pid>/status (VmRSS, VmHWM, ...), in bytes; without /proc,
    only VmRSS (from psutil)."""
    if not os.path.exists("/proc/self/status"):
        return {"VmRSS": int(psutil.Process(pid).memory_info().rss)}
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            parts = value.split()
            if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * KiB
    return out


def _reset_hwm(pid: int) -> bool:
    """VmHWM back to the current RSS (``clear_refs`` 5, Linux >= 4.0); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _big_template(signal_name: str, compressible: bool, seed: int) -> Template:
    """BIG_RECORDS records whose ``stress.pad`` values make the body BIG_FILL of the limit.

    Incompressible: random base64 text (gzip keeps ~77 % of it), so what is staged and
    exported is about as large as what arrived. Compressible: a log line repeated, for
    the wave sent gzip-compressed (~1/150 of it on the wire).
    """
    goal = int(BIG_MAX_BODY * BIG_FILL)
    rng = random.Random(seed)

    def text(size: int) -> str:
        if compressible:
            line = "GET /api/items/42 200 12ms user=alice region=eu-west-1 cache=miss; "
            return (line * (size // len(line) + 1))[:size]
        return base64.b64encode(rng.randbytes(size)).decode()[:size]

    probe = Template(signal_name, BIG_RECORDS, pad_text=text(1024), with_json=False)
    overhead = probe.size - BIG_RECORDS * 1024  # the records' own bytes, measured
    pad = (goal - overhead) // BIG_RECORDS
    return Template(signal_name, BIG_RECORDS, pad_text=text(pad), with_json=False)


@dataclass
class Wave:
    """One burst of BIG_REQUESTS and what it cost the service."""

    name: str
    encoding: str  # protobuf or gzip
    templates: dict[str, Template]
    count: int = BIG_REQUESTS
    final: list[Sent] = field(default_factory=list)  # each request's last attempt
    refused: list[Sent] = field(default_factory=list)  # every 429 answer (as it came)
    answers: Counter[int] = field(default_factory=Counter)  # every attempt's answer
    attempts: int = 0
    wire_bytes: int = 0  # the bodies as sent (compressed if gzip), one per request
    raw_bytes: int = 0  # the same decompressed
    refused_sent_bytes: int = 0  # body bytes written before each 429 ended the write
    elapsed_s: float = 0.0  # first request to last answer
    drained_s: float = 0.0  # first request to the queue drained
    cpu_s: float = 0.0  # the serving process's CPU time, to the drain
    start_rss: int = 0
    peak: int = 0  # VmHWM after the drain (reset before the wave)
    peak_sampled: int = 0  # the highest VmRSS sample
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return sum(s.status == 200 for s in self.final)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent_bytes: int  # of the request body, when the answer came or the write ended


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def post_reading_early(url: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
    """POST on a connection of its own, reading the answer while the body is written.

    An answer that comes before the body is written whole (a 429 by its Content-Length)
    ends the write, as Go's net/http client (the OpenTelemetry Collector's) does, and
    the connection is dropped. (httpx would write the whole body first.)
    """
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.transport.set_write_buffer_limits(high=BIG_WRITE_CHUNK)
    try:
        lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = asyncio.ensure_future(_read_answer(reader))
        view = memoryview(body)
        sent = 0
        try:
            while sent < len(body) and not answer.done():
                writer.write(view[sent : sent + BIG_WRITE_CHUNK])
                sent = min(len(body), sent + BIG_WRITE_CHUNK)
                drain = asyncio.ensure_future(writer.drain())
                await asyncio.wait((drain, answer), return_when=asyncio.FIRST_COMPLETED)
                if not drain.done():
                    drain.cancel()
                    with contextlib.suppress(BaseException):
                        await drain
                elif drain.exception() is not None:
                    break  # the service closed while we wrote: its answer may be there
            status, answer_headers, answer_body = await answer
        finally:
            answer.cancel()
        return Answer(status, answer_headers, answer_body, sent)
    finally:
        writer.transport.abort()  # whatever is left of the body is dropped, not sent


async def _send_wave(service: Service, ledger: Ledger, wave: Wave, seed: int) -> None:
    """``wave.count`` requests at once, each retried on 429 after its Retry-After or its
    own backoff, whichever is longer (1 s doubling to 8 s, jittered by +-50 %, as a
    client would) until it is answered otherwise or the deadline passes. A 503 or a lost
    answer is retried under fresh ids: the first stays in the ledger as refused (absent)
    or unanswered (stored whole or not at all)."""
    rng = random.Random(seed)
    deadline = time.monotonic() + BIG_DEADLINE_S
    signals = list(wave.templates)
    t0 = time.monotonic()
    headers = {"Content-Type": "application/x-protobuf"}
    if wave.encoding == "gzip":
        headers["Content-Encoding"] = "gzip"

    async def one(i: int) -> None:
        signal_name = signals[i % len(signals)]
        template = wave.templates[signal_name]
        backoff = 1.0
        first = True
        while True:
            sent = ledger.new(signal_name, BIG_RECORDS, wave.encoding)
            body = template.make(sent.index)
            if first:
                wave.raw_bytes += len(body)
            if wave.encoding == "gzip":
                body = await asyncio.to_thread(igzip.compress, body, 1)
            if first:
                wave.wire_bytes += len(body)
                first = False
            fresh = False
            while not fresh:
                wave.attempts += 1
                started = time.monotonic()
                try:
                    async with asyncio.timeout(BIG_DEADLINE_S):
                        answer = await post_reading_early(
                            service.url, f"/v1/{signal_name}", headers, body
                        )
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    sent.status, sent.error = UNKNOWN, type(exc).__name__
                    wave.answers[UNKNOWN] += 1
                    wait, fresh = 1.0, True
                else:
                    sent.latency_s = time.monotonic() - started
                    sent.status = answer.status
                    sent.retry_after = answer.headers.get("retry-after")
                    sent.body = answer.body
                    wave.answers[sent.status] += 1
                    if sent.status == 429:
                        wave.refused.append(dataclasses.replace(sent))
                        wave.refused_sent_bytes += answer.sent_bytes
                    if sent.status not in (429, 503):
                        wave.final.append(sent)
                        return
                    after = sent.retry_after or ""
                    wait = max(int(after) if after.isdigit() else 1, backoff)
                    backoff = min(2 * backoff, BIG_BACKOFF_MAX_S)
                    fresh = sent.status == 503
                wait *= 0.5 + rng.random()
                if time.monotonic() + wait > deadline:
                    wave.final.append(sent)
                    return
                await asyncio.sleep(wait)

    await asyncio.gather(*(one(i) for i in range(wave.count)))
    wave.elapsed_s = time.monotonic() - t0


async def _sample_rss(pid: int, out: list[tuple[float, int]]) -> None:
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(OSError, KeyError):
            out.append((time.monotonic() - t0, _vm(pid)["VmRSS"]))
        await asyncio.sleep(BIG_SAMPLE_S)


async def _run_wave(
    service: Service, ledger: Ledger, stores: Stores, pid: int, wave: Wave, seed: int
) -> None:
    """Send the wave and wait for the drain: VmHWM is reset before, read after."""
    _reset_hwm(pid)
    wave.start_rss = _vm(pid)["VmRSS"]
    cpu = _cpu_s(pid)
    sampler = asyncio.create_task(_sample_rss(pid, wave.samples))
    t0 = time.monotonic()
    try:
        await _send_wave(service, ledger, wave, seed)
        await stores.wait_drained(120)
        wave.drained_s = time.monotonic() - t0
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    wave.cpu_s = _cpu_s(pid) - cpu
    wave.peak_sampled = max((rss for _, rss in wave.samples), default=0)
    wave.peak = max(_vm(pid).get("VmHWM", 0), wave.peak_sampled)


def _mib(n: float) -> str:
    return f"{n / MiB:.0f}"


async def big_bodies(h: Harness, report: Report) -> None:
    """200 concurrent bodies near MAX_REQUEST_BODY_BYTES, ROLE=all.

    MAX_INFLIGHT_BYTES sheds what does not fit with 429 before it is read, every request
    is acknowledged after its client's retries, and the serving process's peak RSS stays
    within :func:`big_bound`. A second wave sends bodies of the same decompressed size
    gzip-compressed: they reserve only their compressed bytes at the door.
    """
    target = await h.target("bigbodies")
    service = h.service(target, "big", BIG_SETTINGS)
    ledger = Ledger()
    stores = Stores(target)
    client = httpx.AsyncClient(timeout=10)
    try:
        plain = {s: _big_template(s, False, n) for n, s in enumerate(("traces", "logs", "metrics"))}
        packed = {s: _big_template(s, True, n) for n, s in enumerate(("logs", "traces"))}
        await service.start()
        proc = service.server_process()
        check(proc is not None, "big_server_process", "no serving process under hypercorn")
        assert proc is not None
        pid = proc.pid
        # A warm-up of each kind, drained, so that the baseline has paid for the code
        # paths, the thread pools and the connections.
        warm = [Wave("warm-up", "protobuf", plain, 3), Wave("warm-up", "gzip", packed, 2)]
        for n, wave in enumerate(warm):
            await _send_wave(service, ledger, wave, n)
        await stores.wait_drained(60)
        baseline = _vm(pid)["VmRSS"]
        hwm_reset = _reset_hwm(pid)
        waves = [Wave("plain", "protobuf", plain), Wave("gzip", "gzip", packed)]
        for n, wave in enumerate(waves):
            await _run_wave(service, ledger, stores, pid, wave, 10 + n)
        refused_seen = sum(len(w.refused) for w in warm + waves)
        metrics = await service.metrics(client)
        refused_served = metrics.value("otelworker_requests_refused_total", reason="inflight_bytes")
        accounting = await check_accounting(ledger, stores)
        await service.stop()
        no_bug_events(service)
        for wave in warm + waves:
            check(
                wave.acked == wave.count,
                "big_all_acknowledged",
                f"{wave.name} ({wave.encoding}): {wave.acked} of {wave.count} answered 200 "
                f"within {BIG_DEADLINE_S:.0f} s; answers {dict(wave.answers)}",
            )
            _check_429s(wave.refused, "big")
        check(
            bool(waves[0].refused),
            "big_door_sheds",
            f"no 429 with {BIG_REQUESTS} x {_mib(waves[0].raw_bytes / BIG_REQUESTS)} MiB at once "
            f"and MAX_INFLIGHT_BYTES {_mib(BIG_INFLIGHT)} MiB",
        )
        check(
            refused_served == refused_seen,
            "big_refusals_counted",
            f"/metrics counts {refused_served:.0f} inflight_bytes refusals, the client saw "
            f"{refused_seen} x 429",
        )
        if not hwm_reset:
            report.add("(VmHWM could not be reset: each peak is the process's since start)")
        for wave in waves:
            bound, terms = big_bound(baseline, wave.count, wave.encoding == "gzip")
            per = wave.raw_bytes / wave.count
            sizes = f"{per / MiB:.2f} MiB"
            if wave.encoding == "gzip":
                sizes = f"{wave.wire_bytes / wave.count / KiB:.0f} KiB gzip ({sizes} decompressed)"
            refused = len(wave.refused)
            report.add(
                f"{wave.name}: {wave.count} x {sizes} at once: {wave.attempts} attempts, "
                f"{refused} x 429"
                + (
                    f" (the body sent before it: {wave.refused_sent_bytes / refused / MiB:.2f} "
                    f"of {per / MiB:.2f} MiB on average)"
                    if refused
                    else ""
                )
                + f", all 200 in {wave.elapsed_s:.1f} s, drained at {wave.drained_s:.1f} s, "
                f"{wave.cpu_s:.1f} s CPU"
            )
            report.add(
                f"  RSS {_mib(wave.start_rss)} MiB at the start, peak {_mib(wave.peak)} MiB "
                f"(VmHWM; samples {_mib(wave.peak_sampled)}) "
                f"<= bound {_mib(bound)} MiB = "
                + " + ".join(f"{name} {_mib(v)}" for name, v in terms)
            )
            check(
                wave.peak <= bound,
                "memory_bounded",
                f"{wave.name}: peak RSS {_mib(wave.peak)} MiB > bound {_mib(bound)} MiB "
                f"(baseline {_mib(baseline)} MiB; see {service.log_path})",
            )
            report.data[wave.name] = {
                "peak": wave.peak,
                "peak_sampled": wave.peak_sampled,
                "bound": bound,
                "attempts": wave.attempts,
                "refused": refused,
                "elapsed_s": wave.elapsed_s,
                "drained_s": wave.drained_s,
                "cpu_s": wave.cpu_s,
            }
        plain_wave, gzip_wave = waves
        plain_bound, _ = big_bound(baseline, plain_wave.count, False)
        uncounted, _ = big_bound(baseline, gzip_wave.count, False)
        over = gzip_wave.peak - uncounted
        report.lines.insert(
            0,
            f"{BIG_REQUESTS} x {_mib(BIG_MAX_BODY)} MiB bodies at once: peak RSS "
            f"{_mib(plain_wave.peak)} MiB <= {_mib(plain_bound)} MiB "
            f"({len(plain_wave.refused)} x 429); gzip: peak {_mib(gzip_wave.peak)} MiB, "
            + (
                f"{_mib(over)} MiB over the settings' bound (decompressed bodies that "
                "MAX_INFLIGHT_BYTES does not count)"
                if over > 0
                else "within the settings' bound"
            ),
        )
        report.add(accounting.line())
        report.data.update(baseline=baseline)
    finally:
        await client.aclose()
        await stores.close()


# --- 8. two tenants, one over its ingest bytes limit ---------------------------------------

TEN_QUIET = "quiet"  # no limit of its own: the settings' (ingest bytes unlimited)
TEN_NOISY = "noisy"  # TENANT_LIMITS_FILE: a few KB/s
TEN_BYTES_PER_S = 8000.0  # noisy's ingest_bytes_per_s (decompressed bytes)
TEN_BURST_BYTES = 16000  # noisy's ingest_burst_bytes: ~20 of the mixed requests
TEN_RPS = 100_000.0  # RATE_LIMIT_RPS / RATE_LIMIT_BURST for everyone: high, never binds
TEN_LOAD_S = 4.0  # both tenants send for this long
TEN_LANES = 4  # requests in flight per tenant (each lane a closed loop)
TEN_RETRY_JITTER = 0.25  # a retry waits Retry-After x [1, 1.25): never earlier than asked
TEN_PLAN = mixed_plan(45)  # one period of the signal x size x encoding cycle
TEN_REASON = "ingest_rate_limited"  # the metric reason of a 429 past INGEST_BYTES_PER_S


@dataclass
class TenantLoad:
    """One tenant's client: its requests, every answer, every 429 as it came."""

    tenant: str
    sender: Sender
    final: list[Sent] = field(default_factory=list)  # each request, with its last answer
    refused: list[Sent] = field(default_factory=list)  # a copy of every 429 answer
    answers: Counter[int] = field(default_factory=Counter)  # every attempt's answer
    retries: int = 0

    def acked(self) -> list[Sent]:
        return [s for s in self.final if s.status == 200]


async def _tenant_lanes(service: Service, load: TenantLoad, until: float, seed: int) -> None:
    """TEN_LANES closed loops until ``until``, over the harness's mixed plan. A 429 is
    retried as an OTLP exporter does: after its Retry-After (never earlier; jittered up to
    25 % later), with the same record ids (a 429 stored nothing). A lane whose wait would
    end past ``until`` stops there and gives its request up: it stays 429 in the ledger,
    and its records must be absent. Any other answer is final (a 503 or a lost answer would be
    counted as such by the accounting invariant; neither is expected here)."""
    rng = random.Random(seed)
    plan = itertools.cycle(TEN_PLAN)
    ledger = load.sender.ledger

    async def lane() -> None:
        while time.monotonic() < until:
            signal_name, records, encoding = next(plan)
            sent = ledger.new(signal_name, records, encoding)
            load.final.append(sent)
            while True:
                await load.sender.post(service, sent)
                load.answers[sent.status] += 1
                if sent.status != 429:
                    break
                load.refused.append(dataclasses.replace(sent))
                after = sent.retry_after or ""
                wait = (int(after) if after.isdigit() else 1) * (
                    1 + TEN_RETRY_JITTER * rng.random()
                )
                if time.monotonic() + wait > until:
                    return  # this client is done: the request given up, still 429
                await asyncio.sleep(wait)
                load.retries += 1

    await asyncio.gather(*(lane() for _ in range(TEN_LANES)))


def _check_tenant_objects(
    loads: list[TenantLoad], exported: Exported, prefix: str
) -> dict[str, int]:
    """Per tenant: its acknowledged records exactly once, all in objects of its own (key
    under ``{prefix}/{tenant}/``, manifest row with its tenant), none of another tenant's
    there, none of its refused ones. Returns the objects per tenant."""
    owner = {s.index: load.tenant for load in loads for s in load.final}
    by_tenant: dict[str, Counter[int]] = {load.tenant: Counter() for load in loads}
    objects: Counter[str] = Counter()
    for obj in exported.objects:
        check(
            obj.tenant in by_tenant,
            "tenants_manifest_tenant",
            f"{obj.key}: export_batches.tenant is {obj.tenant!r}; the client sent only as "
            f"{sorted(by_tenant)}",
        )
        assert obj.tenant is not None
        check(
            obj.key.startswith(f"{prefix}/{obj.tenant}/"),
            "tenants_own_prefix",
            f"{obj.key}: tenant {obj.tenant}'s object is not under {prefix}/{obj.tenant}/",
        )
        for rid in obj.ids:
            sent_as = owner.get(rid >> 16)
            check(
                sent_as == obj.tenant,
                "tenants_no_foreign_records",
                f"record {rid & 0xFFFF} of request {rid >> 16} (sent as {sent_as}) is in "
                f"{obj.tenant}'s object {obj.key}",
            )
        by_tenant[obj.tenant].update(obj.ids)
        objects[obj.tenant] += 1
    for load in loads:
        own = Ledger()
        own.requests = {s.index: s for s in load.final}
        account(own, by_tenant[load.tenant], f"{load.tenant}'s objects")
    return dict(objects)


async def tenants(h: Harness, report: Report) -> None:
    """Two tenants at once, ROLE=all: ``noisy`` over a small ingest bytes limit of its own
    (TENANT_LIMITS_FILE), ``quiet`` unlimited. quiet gets only 200s; noisy gets 200s and
    429s (each with a Retry-After, retried after it), and no more bytes than its bucket
    allows; the per-tenant metrics and events count what each client saw; then the
    accounting invariant, per tenant: every record acknowledged to a tenant is exported
    exactly once, in that tenant's objects only.
    """
    target = await h.target("tenants")
    limits_file = h.workdir / "tenants-limits.json"
    limits_file.write_text(
        json.dumps(
            {
                TEN_NOISY: {
                    "ingest_bytes_per_s": TEN_BYTES_PER_S,
                    "ingest_burst_bytes": TEN_BURST_BYTES,
                }
            }
        )
    )
    settings = {
        "ENABLE_RATE_LIMITING": "true",
        "RATE_LIMIT_RPS": str(TEN_RPS),
        "RATE_LIMIT_BURST": str(int(TEN_RPS)),
        "TENANT_LIMITS_FILE": str(limits_file),
    }
    prefix = BASE_SETTINGS["S3_PREFIX"]
    ledger = Ledger()  # one ledger: record ids unique across both tenants
    loads = [
        TenantLoad(t, Sender(ledger, headers={"X-Scope-OrgID": t})) for t in (TEN_QUIET, TEN_NOISY)
    ]
    quiet, noisy = loads
    stores = Stores(target)
    try:
        service = await h.service(target, "tenants", settings).start()
        t0 = time.monotonic()
        until = t0 + TEN_LOAD_S
        await asyncio.gather(
            *(_tenant_lanes(service, load, until, n) for n, load in enumerate(loads))
        )
        elapsed = time.monotonic() - t0

        # What each client saw.
        check(
            set(quiet.answers) == {200},
            "tenants_quiet_all_200",
            f"quiet (no limit of its own) got {dict(quiet.answers)}",
        )
        check(
            set(noisy.answers) == {200, 429},
            "tenants_noisy_limited",
            f"noisy ({TEN_BYTES_PER_S:.0f} B/s, burst {TEN_BURST_BYTES}) got "
            f"{dict(noisy.answers)}: expected both 200s and 429s",
        )
        _check_429s(noisy.refused, "tenants")
        for sent in noisy.refused:
            # The byte bucket never goes into debt here (every body is under the burst),
            # so the wait is at most the time to refill one whole request, rounded up,
            # plus the service's jitter of up to one second.
            size = noisy.sender.decompressed_size(sent)
            most = math.ceil(min(size, TEN_BURST_BYTES) / TEN_BYTES_PER_S + 1)
            check(
                int(sent.retry_after or 0) <= most,
                "tenants_retry_after_bound",
                f"request {sent.index} ({size} B decompressed) answered 429 with Retry-After "
                f"{sent.retry_after}; {size} B refill in at most {most} s at "
                f"{TEN_BYTES_PER_S:.0f} B/s",
            )
        metered = {
            load.tenant: sum(load.sender.decompressed_size(s) for s in load.acked())
            for load in loads
        }
        allowed = math.floor(TEN_BURST_BYTES + TEN_BYTES_PER_S * elapsed)
        check(
            metered[TEN_NOISY] <= allowed,
            "tenants_noisy_bytes_arithmetic",
            f"noisy was acknowledged {metered[TEN_NOISY]} B (decompressed) in {elapsed:.2f} s; "
            f"its bucket allows {allowed} (burst {TEN_BURST_BYTES} + {TEN_BYTES_PER_S:.0f} B/s)",
        )

        # What the service counted, per tenant.
        metrics = await service.metrics(quiet.sender.client)
        protobuf: dict[str, int] = {}
        for load in loads:
            for signal_name in ("traces", "logs", "metrics"):
                served = metrics.value(
                    "otelworker_tenant_records_accepted_total",
                    tenant=load.tenant,
                    signal=signal_name,
                )
                seen = sum(s.records for s in load.acked() if s.signal == signal_name)
                check(
                    served == seen,
                    "tenants_records_accepted_metric",
                    f"otelworker_tenant_records_accepted_total{{tenant={load.tenant},"
                    f"signal={signal_name}}} is {served:.0f}; the client was acknowledged {seen}",
                )
            # As the byte limit meters them: the decompressed body as sent (for JSON the
            # JSON text, not the protobuf it is staged as).
            payload = protobuf[load.tenant] = sum(
                load.sender.decompressed_size(s) for s in load.acked()
            )
            served_bytes = metrics.value(
                "otelworker_tenant_bytes_accepted_total", tenant=load.tenant
            )
            check(
                served_bytes == payload,
                "tenants_bytes_accepted_metric",
                f"otelworker_tenant_bytes_accepted_total{{tenant={load.tenant}}} is "
                f"{served_bytes:.0f}; the acknowledged bodies are {payload} B decompressed",
            )
            refused = metrics.value("otelworker_tenant_requests_refused_total", tenant=load.tenant)
            check(
                refused == len(load.refused),
                "tenants_refusals_metric",
                f"otelworker_tenant_requests_refused_total{{tenant={load.tenant}}} is "
                f"{refused:.0f}; the client saw {len(load.refused)} x 429",
            )
        by_reason = metrics.value(
            "otelworker_tenant_requests_refused_total", tenant=TEN_NOISY, reason=TEN_REASON
        )
        refused_bytes = metrics.value(
            "otelworker_tenant_bytes_refused_total", tenant=TEN_NOISY, reason=TEN_REASON
        )
        seen_bytes = sum(noisy.sender.decompressed_size(s) for s in noisy.refused)
        check(
            by_reason == len(noisy.refused) and refused_bytes == seen_bytes,
            "tenants_refusals_metric",
            f"otelworker_tenant_requests_refused_total{{tenant=noisy,reason={TEN_REASON}}} is "
            f"{by_reason:.0f} and _bytes_refused_total {refused_bytes:.0f}; the client saw "
            f"{len(noisy.refused)} x 429 of {seen_bytes} B",
        )
        served_429 = metrics.value("otelworker_requests_total", code="429")
        check(
            served_429 == len(noisy.refused),
            "tenants_refusals_metric",
            f"otelworker_requests_total{{code=429}} is {served_429:.0f}; noisy saw "
            f"{len(noisy.refused)}, quiet {quiet.answers[429]}",
        )

        # The accounting invariant, over both, then per tenant.
        accounting = await check_accounting(ledger, stores, per_object=True)
        assert accounting.exported is not None
        objects = _check_tenant_objects(loads, accounting.exported, prefix)
        await service.stop()
        limited = service.events("rate_limited", "limit_exceeded")
        logged = {
            load.tenant: sum(
                int(e.get("count", 1)) for e in limited if e.get("tenant") == load.tenant
            )
            for load in loads
        }
        check(
            logged[TEN_NOISY] == len(noisy.refused)
            and sum(logged.values()) == len(noisy.refused)
            and all(e.get("limit") == "bytes" for e in limited),
            "tenants_logged",
            f"rate_limited/limit_exceeded counts {logged} (limits "
            f"{sorted({str(e.get('limit')) for e in limited})}); the clients saw noisy "
            f"{len(noisy.refused)} x 429, quiet none",
        )
        no_bug_events(service)

        report.add(
            f"quiet {len(quiet.final)} x 200, no 429; noisy {len(noisy.acked())}/"
            f"{len(noisy.final)} acknowledged ({metered[TEN_NOISY]} B <= {allowed} B allowed "
            f"in {elapsed:.1f} s), {len(noisy.refused)} x 429 with Retry-After; each tenant's "
            "records exactly once, in its own objects only"
        )
        for load in loads:
            records = sum(s.records for s in load.acked())
            waits = Counter(s.retry_after for s in load.refused)
            given_up = len(load.final) - len(load.acked())
            report.add(
                f"{load.tenant}: {len(load.acked())} of {len(load.final)} requests acknowledged "
                f"({records} records, {metered[load.tenant]} B as sent, decompressed; "
                f"{protobuf[load.tenant]} B staged), {given_up} given up at the end; "
                f"{len(load.refused)} x 429 (Retry-After: "
                + (", ".join(f"{k} s x {v}" for k, v in sorted(waits.items())) or "none")
                + f"), {load.retries} retried after it; {objects.get(load.tenant, 0)} objects "
                f"under {prefix}/{load.tenant}/"
            )
        report.add(
            f"/metrics per tenant agree (records and bytes accepted, {TEN_REASON} x "
            f"{by_reason:.0f}); log: rate_limited x {logged[TEN_NOISY]} tenant=noisy"
        )
        report.add(accounting.line())
        report.data.update(
            elapsed_s=elapsed,
            quiet_acked=len(quiet.acked()),
            noisy_acked=len(noisy.acked()),
            noisy_refused=len(noisy.refused),
            noisy_bytes=metered[TEN_NOISY],
            noisy_allowed=allowed,
            objects=objects,
        )
    finally:
        for load in loads:
            await load.sender.aclose()
        await stores.close()


# --- 9. the database fails over -------------------------------------------------------------

FAILOVER_READY_S = 30.0  # the stated bound: SIGKILL of the primary to /readyz 200 again


async def failover(h: Harness, report: Report) -> None:
    """SIGKILL the primary under load (OTLP/HTTP and OTLP/gRPC, three signals) and promote
    its synchronous standby; a multi-host DATABASE_URL (target_session_attrs=read-write)
    finds it without a restart. Every 200 is in the manifest exactly once; a 503 in the
    switch is treated as an unanswered request (all or nothing: a commit cut off with its
    connection may have happened); ready again within FAILOVER_READY_S."""
    # The test suite's primary + pg_basebackup standby, from the same binaries.
    from tests.support.replica import ReplicaPair

    assert h.s3 is not None
    pair = ReplicaPair(
        Path(tempfile.mkdtemp(prefix="otelworker-stress-failover-")), synchronous=True
    )
    await asyncio.to_thread(pair.start)
    bucket = await asyncio.to_thread(h.s3.create_bucket, "stress-failover")
    target = Target("failover", pair.multi_host_dsn, bucket, h.s3)
    settings = {
        "LEASE_TIMEOUT_S": "3",
        "STAGING_COMMIT_TIMEOUT_S": "4",
        "UNAVAILABLE_RETRY_AFTER_S": "1",
        "DB_CONNECT_TIMEOUT_S": "2",
    }
    svc = h.service(target, "follower", settings, grpc=True)
    ledger = Ledger()
    http = Sender(ledger, pad=64)
    grpc = GrpcSender(ledger, channels=2)
    stores = Stores(target)
    halt = False
    try:
        await svc.start()
        plan = (
            (("traces", "logs", "metrics")[i % 3], i % 9 + 1, ENCODINGS[i % 2])
            for i in itertools.count()
        )
        loads = [
            asyncio.create_task(http.send_many(svc, plan, concurrency=2, stop=lambda _: halt)),
            asyncio.create_task(grpc.send_many(svc, plan, concurrency=2, stop=lambda _: halt)),
        ]

        async def acked() -> int:
            return len(ledger.with_status(200))

        await wait_until(acked, lambda n: n >= 100, within=60, what="failover_load_under_way")
        killed = time.monotonic()
        await asyncio.to_thread(pair.kill_primary)
        await asyncio.to_thread(pair.promote)
        async with httpx.AsyncClient(timeout=5) as client:

            async def ready() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(f"{svc.url}/readyz")).status_code == 200
                return False

            await wait_until(ready, bool, within=FAILOVER_READY_S, what="failover_ready_again")
        ready_s = time.monotonic() - killed
        at_ready = len(ledger.with_status(200))
        await asyncio.sleep(3)
        halt = True
        await asyncio.gather(*loads)
        check(
            len(ledger.with_status(200)) > at_ready,
            "failover_acked_after",
            "nothing was acknowledged after the service was ready again",
        )
        statuses = ledger.by_status()
        check(
            set(statuses) <= {200, 503},
            "failover_answers",
            f"answers other than 200 and 503: {dict(statuses)}",
        )
        # A 503 in the switch may be a commit cut off with its connection (outcome unknown):
        # held to "all or nothing", like a request with no answer.
        for sent in ledger.with_status(503):
            sent.status = UNKNOWN
        accounting = await check_accounting(ledger, stores, drain_timeout=90)
        no_bug_events(svc)
        await svc.stop()
        slowest = max(s.latency_s for s in ledger.requests.values())
        report.add(
            f"primary SIGKILLed after {at_ready} x 200 and promoted; ready again {ready_s:.2f} s"
            f" after the kill; answers {dict(statuses)}; slowest {slowest:.2f} s"
        )
        report.add(f"{accounting.line()} (503s held to all-or-nothing)")
        report.data.update(
            ready_again_s=round(ready_s, 2),
            answers={str(k): v for k, v in statuses.items()},
            slowest_s=round(slowest, 2),
        )
    finally:
        halt = True
        await http.aclose()
        await grpc.aclose()
        await stores.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(svc.kill)
        await asyncio.to_thread(pair.stop)


SCENARIOS: dict[str, Scenario] = {
    "rate_limit": rate_limit,
    "saturation": saturation,
    "slow_store": slow_store,
    "store_outage": store_outage,
    "sigkill": sigkill,
    "grpc": grpc_transport,
    "big_bodies": big_bodies,
    "tenants": tenants,
    "failover": failover,
}
