"""The verify scenarios: each starts the real service with small limits, pushes it into
one overload or failure, and checks invariants against what the stores hold.

Every scenario ends with the accounting invariant (:func:`check_accounting`): once
``ingestion_queue`` has drained, the records answered 200 are exactly the records in the
objects that ``export_batches`` lists (none missing, none twice), records answered
202/429 are absent, and an unanswered request is stored whole or not at all. The
``grpc`` scenario sends over OTLP/gRPC, each answer counted as its HTTP analogue (OK 200,
OK with partial_success 202, RESOURCE_EXHAUSTED 429: :mod:`loadtest.otlp_grpc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from loadtest.stress_env import (
    ENCODINGS,
    UNKNOWN,
    GrpcSender,
    Harness,
    Ledger,
    Sender,
    Sent,
    Service,
    Stores,
    account,
    check,
    check_accounting,
    mixed_plan,
    no_bug_events,
    wait_until,
)
from loadtest.stress_proxy import TcpProxy

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
        "MAX_ATTEMPTS": "200",
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
        retried = await wait_until(
            stores.failed_rows,
            lambda rows: any(r["attempts"] >= 2 for r in rows),
            within=30,
            what="outage_rows_retried",
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
            f"(reason {failed.get('reason')}), rows failed with attempts up to "
            f"{max(r['attempts'] for r in retried)} ({retried[0]['last_error'][:60]!r})"
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


SCENARIOS: dict[str, Scenario] = {
    "rate_limit": rate_limit,
    "saturation": saturation,
    "slow_store": slow_store,
    "store_outage": store_outage,
    "sigkill": sigkill,
    "grpc": grpc_transport,
}
