"""The forwarding benchmark (issue 21): ROLE=all with one destination beside ROLE=all without.

    python -m loadtest.bench forward                     # 100 and 512 spans, both rows
    python -m loadtest.bench forward --duration 5 --warmup 2 --rounds 1 --forward-sizes 512

Two ``python -m otelworker serve`` processes (as deployed) with ``ROLE=all`` on databases
and buckets of their own (S3 as the ``all`` row has it): ``all`` (no destination) and
``all_fwd`` (``DESTINATIONS_FILE`` naming one OTLP/HTTP destination, the no-op receiver
:mod:`loadtest.noop_receiver` in a third process: it decompresses and counts, keeps
nothing). Each gets the same closed-loop load (:mod:`loadtest.loadgen`, alternated
A/B, B/A, ...) and, beside it, **probes**: the benchmark itself sends a 1-span trace request
every ``--probe-interval-ms`` whose trace id is :data:`~loadtest.noop_receiver.PROBE_MAGIC`
and a sequence number, and stamps the time its 200 arrived; the receiver stamps the time
the probe's span arrived in a forwarded request. Their difference is the
**acknowledgement-to-delivery latency** of a record.

Per row and size (rounds alternated all/all_fwd, then all_fwd/all, and so on):

- **delivered spans/s**: spans the receiver counted during the timed window over its
  length, and over the whole time until every acknowledged span had arrived;
- **service CPU us per acknowledged span**, from the window's start until the queue is
  drained (and, with the destination, every delivery delivered and every probe arrived):
  the service process tree's CPU seconds (psutil, unrounded), as the other rows measure
  it, over the spans acknowledged in the window (probes included), the same quantity in
  both rows. Forwarding's share is the difference between the two rows, its cost the
  ratio of their medians (target: at most 1.25 at 512 spans), shown beside the median of
  each round's own ratio and the ratio with PostgreSQL's CPU added. The receiver's CPU is
  measured too (it shares the two cores) and counted in no per-span figure;
- **ack-to-delivery p50/p99** of every probe of the rounds pooled. A run is at a
  *sustained* rate when at most 5 % of what its window acknowledged was undelivered at the
  window's end (the destination kept up, no backlog): the latency target applies to the
  full load's probes when every round was sustained, and to a paced run after the rounds
  (``--forward-latency-concurrency`` connections, 4) always;
- the at-least-once check: the receiver got at least every acknowledged span, no delivery
  is dead, every acknowledged probe arrived; duplicates (spans beyond the acknowledged) are
  reported.

``--forward-many-row`` adds a third row to the same rounds, ``all_fwd_many``: the same
destination with ``gzip_members: many``, so the cost of compressing a many-member object
again as one member (the default, ``one``) is an A/B in one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import asdict
from typing import Any

import aiohttp
import asyncpg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from loadtest import provision
from loadtest.bench import (
    Context,
    CpuMeter,
    Size,
    _budget,
    _fmt,
    _median,
    _say,
    _wait_drained,
    parse_size,
    settle,
)
from loadtest.loadgen import LoadSpec, percentile, run_in_subprocess
from loadtest.noop_receiver import PROBE_MAGIC, ReceiverProcess

CPU_RATIO_TARGET = 1.25  # forwarding to one destination: at most +25 % CPU per span at 512
P99_TARGET_MS = 2000.0  # ack-to-delivery at a sustained rate
TARGET_SIZE = "512"
ROWS = ("all", "all_fwd")
# --forward-many-row: a third row, the same destination with gzip_members: many (objects
# sent as stored, not compressed again as one member), in the same rounds.
MANY_ROW = "all_fwd_many"
TITLES = {
    "all": "ROLE=all",
    "all_fwd": "ROLE=all + 1 destination",
    MANY_ROW: "ROLE=all + 1 dest. (many)",
}


def probe_body(seq: int) -> bytes:
    now = time.time_ns()
    span = Span(
        trace_id=PROBE_MAGIC + seq.to_bytes(8, "big"),
        span_id=os.urandom(8),
        name="bench-probe",
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=now,
        end_time_unix_nano=now + 1000,
    )
    service = KeyValue(key="service.name", value=AnyValue(string_value="bench-probe"))
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[service]), scope_spans=[ScopeSpans(spans=[span])]
            )
        ]
    )
    return request.SerializeToString()


class Prober:
    """Sends a probe every ``interval_s`` to ``url`` and keeps each acknowledged one's time."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_seq = 1
        self.acked: dict[int, float] = {}  # seq -> time.time() of its 200
        self.refused = 0

    async def run(self, url: str, stop: asyncio.Event) -> dict[int, float]:
        """Probes until ``stop``; the ones acknowledged in this run, by sequence number."""
        mine: dict[int, float] = {}
        headers = {"Content-Type": "application/x-protobuf"}
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                seq = self.next_seq
                self.next_seq += 1
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.post(url, data=probe_body(seq), headers=headers) as answer:
                        await answer.read()
                        if answer.status == 200:
                            mine[seq] = time.time()
                        else:
                            self.refused += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
        self.acked.update(mine)
        return mine


async def _pending_deliveries(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status IN ('pending', 'processing')) AS live,"
            " count(*) FILTER (WHERE status = 'dead') AS dead FROM deliveries"
        )
        return int(row["live"]), int(row["dead"])
    finally:
        await conn.close()


async def _wait_delivered(
    dsn: str, receiver: ReceiverProcess, probes: dict[int, float], limit_s: float, since: int
) -> dict[str, Any]:
    """Until no delivery is pending and every acknowledged probe reached the receiver."""
    deadline = time.monotonic() + limit_s
    while True:
        live, dead = await _pending_deliveries(dsn)
        stats = await asyncio.to_thread(receiver.stats, since)
        missing = [s for s in probes if str(s) not in stats["probes"]]
        if live == 0 and not missing:
            return {"dead": dead, "stats": stats, "note": None}
        if time.monotonic() > deadline:
            return {
                "dead": dead,
                "stats": stats,
                "note": f"not delivered within {limit_s} s: {live} deliveries pending, "
                f"{len(missing)} probes missing",
            }
        await asyncio.sleep(0.1)


def _lags_ms(probes: dict[int, float], stats: dict[str, Any]) -> list[float]:
    arrived = stats["probes"]
    return sorted(
        max(0.0, arrived[str(seq)] - acked) * 1000.0
        for seq, acked in probes.items()
        if str(seq) in arrived
    )


def _latency(lags: list[float], probes: int) -> dict[str, Any]:
    """p50/p99/max of ascending ack-to-delivery lags (ms)."""
    return {
        "probes": probes,
        "arrived": len(lags),
        "p50_ms": None if not lags else round(percentile(lags, 50) or 0.0, 1),
        "p99_ms": None if not lags else round(percentile(lags, 99) or 0.0, 1),
        "max_ms": None if not lags else round(lags[-1], 1),
    }


# A run is at a *sustained* rate when the destination kept up with it: at the window's end
# at most this share of the spans acknowledged in it was still undelivered (at 20 s, 1 s of
# load). Its probes' latency is then the latency at the sustained rate, not at a backlog.
SUSTAINED_BACKLOG = 0.05


class Row:
    def __init__(
        self,
        name: str,
        proc: provision.AppProcess,
        dsn: str,
        pg_pid: int | None,
        receiver_pid: int,
    ) -> None:
        self.name = name
        self.proc = proc
        self.dsn = dsn
        # The receiver's CPU is the destination's, not the service's: measured to show
        # what it takes of the machine's two cores, counted in no per-span figure.
        self.trees = {"service": proc.pid, "postgres": pg_pid, "receiver": receiver_pid}
        self.rate_hint: dict[str, float] = {}


async def _one_run(
    ctx: Context,
    row: Row,
    size: Size,
    label: str,
    duration: float,
    concurrency: int,
    prober: Prober,
    receiver: ReceiverProcess,
) -> dict[str, Any]:
    args = ctx.args
    spec = LoadSpec(
        url=f"{row.proc.url}{size.path}",
        concurrency=concurrency,
        duration_s=duration,
        max_requests=_budget(row.rate_hint.get(size.key, 500.0), duration, concurrency),
        spans=size.records,
        label=f"{row.name}:{size.key}:{label}",
        signal=size.signal,
        pool_mib=args.pool_mib,
    )
    quiet = await settle(args.settle, args.settle_cores) if args.settle > 0 else None
    meter = CpuMeter(row.trees)
    since = prober.next_seq  # this run's probes are numbered from here
    before = await asyncio.to_thread(receiver.stats, since)
    stop = asyncio.Event()
    probing: asyncio.Task[dict[int, float]] | None = None
    started = time.time()

    def on_timing() -> None:
        nonlocal probing, started
        meter.start()
        started = time.time()
        probing = asyncio.create_task(prober.run(f"{row.proc.url}/v1/traces", stop))

    result = await run_in_subprocess(spec, on_timing=on_timing)
    window = meter.stop(result.client_cpu_s)
    window_end = time.time()
    at_window_end = await asyncio.to_thread(receiver.stats, since)
    stop.set()
    probes = await probing if probing is not None else {}
    acked_spans = result.ok * size.records + len(probes)
    drained_note = None
    try:
        dead_rows = await _wait_drained(row.dsn, args.drain_wait, lambda live: None)
    except TimeoutError as exc:
        drained_note, dead_rows = str(exc), -1
    record: dict[str, Any] = {
        "row": row.name,
        "size": size.key,
        "run": label,
        "concurrency": concurrency,
        **{k: v for k, v in asdict(result).items() if k != "extra"},
        "probes_acked": len(probes),
        "cpu_window": window,
        "settle": quiet,
    }
    delivered: dict[str, Any] | None = None
    if row.name != "all":
        delivered = await _wait_delivered(row.dsn, receiver, probes, args.drain_wait, since)
        after = delivered["stats"]
        gained = after["records"]["traces"] - before["records"]["traces"]
        in_window = at_window_end["records"]["traces"] - before["records"]["traces"]
        until = max(after["last_arrival"] - started, 1e-9)
        backlog = max(0.0, 1.0 - in_window / acked_spans) if acked_spans else 0.0
        record["delivered"] = {
            "spans": gained,
            "spans_in_window": in_window,
            "spans_per_s_window": round(in_window / result.elapsed_s, 0),
            "spans_per_s_until_delivered": round(gained / until, 0),
            # Undelivered at the window's end (share of the acknowledged), and how long
            # after the window's end the last span arrived: a backlog, or none.
            "backlog_at_window_end": round(backlog, 4),
            "catch_up_s": round(max(0.0, after["last_arrival"] - window_end), 3),
            "sustained": backlog <= SUSTAINED_BACKLOG,
            "duplicates": max(0, gained - acked_spans),
            "probe_repeats": after["probe_repeats"] - before["probe_repeats"],
            "dead_deliveries": delivered["dead"],
            "note": delivered["note"],
        }
        lags = _lags_ms(probes, after)
        record["latency"] = _latency(lags, len(probes))
        record["_lags"] = lags  # pooled over the rounds; not in the JSON
    full = meter.stop()
    # The CPU seconds from the window's start until everything acknowledged in it is
    # drained (and delivered), over those spans: the same quantity in both rows.
    service_s = full["cpu_s"]["service"] or 0.0
    postgres_s = full["cpu_s"].get("postgres") or 0.0
    record["cpu_to_done"] = full
    record["acked_spans"] = acked_spans
    record["service_cpu_us_per_span"] = (
        round(service_s / acked_spans * 1e6, 3) if acked_spans else None
    )
    record["service_pg_cpu_us_per_span"] = (
        round((service_s + postgres_s) / acked_spans * 1e6, 3) if acked_spans else None
    )
    receiver_s = full["cpu_s"].get("receiver") or 0.0
    record["receiver_cpu_us_per_span"] = (
        round(receiver_s / acked_spans * 1e6, 3) if acked_spans else None
    )
    record["check"] = {
        "drained": drained_note is None and dead_rows == 0,
        "note": drained_note,
        "ok": drained_note is None
        and dead_rows == 0
        and (
            delivered is None
            or (
                delivered["note"] is None
                and delivered["dead"] == 0
                and record["delivered"]["spans"] >= acked_spans
            )
        ),
    }
    if label == "warmup" and result.ok_per_s > 0:
        row.rate_hint[size.key] = result.ok_per_s
    line = (
        f"  {row.name:<8} {label:<9} c={concurrency:<3} {_fmt(result.ok_per_s):>8} req/s"
        f" {_fmt(result.spans_per_s, 0):>8} spans/s  statuses {result.statuses}"
        f"  service {_fmt(record['service_cpu_us_per_span'], 2)} us CPU/span"
    )
    if "delivered" in record:
        d, lat = record["delivered"], record["latency"]
        line += (
            f"; delivered {_fmt(d['spans_per_s_window'], 0)} spans/s in window,"
            f" {_fmt(d['spans_per_s_until_delivered'], 0)} until delivered,"
            f" dup {d['duplicates']}; ack->delivery p50 {_fmt(lat['p50_ms'])} ms"
            f" p99 {_fmt(lat['p99_ms'])} ms ({lat['arrived']}/{lat['probes']} probes);"
            f" backlog at window end {d['backlog_at_window_end']:.1%},"
            f" caught up {d['catch_up_s']:.2f} s after;"
            f" receiver {_fmt(record['receiver_cpu_us_per_span'], 2)} us CPU/span"
        )
    if not record["check"]["ok"]:
        line += f"  CHECK FAILED {record['check']}"
    _say(line)
    return record


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float | None], digits: int = 2) -> float | None:
        present = [v for v in values if v is not None]
        return round(_median(present), digits) if present else None

    out: dict[str, Any] = {
        "runs": len(runs),
        "req_per_s": med([r["ok_per_s"] for r in runs], 1),
        "spans_per_s": med([r["spans_per_s"] for r in runs], 0),
        "service_cpu_us_per_span": med([r["service_cpu_us_per_span"] for r in runs], 3),
        "service_pg_cpu_us_per_span": med([r["service_pg_cpu_us_per_span"] for r in runs], 3),
        "non_200": sum(r["requests"] - r["ok"] for r in runs),
    }
    if runs and "delivered" in runs[0]:
        out["delivered_spans_per_s_window"] = med(
            [r["delivered"]["spans_per_s_window"] for r in runs], 0
        )
        out["delivered_spans_per_s_until_delivered"] = med(
            [r["delivered"]["spans_per_s_until_delivered"] for r in runs], 0
        )
        out["duplicates"] = sum(r["delivered"]["duplicates"] for r in runs)
        out["latency_p50_ms"] = med([r["latency"]["p50_ms"] for r in runs], 1)
        out["latency_p99_ms"] = med([r["latency"]["p99_ms"] for r in runs], 1)
        # Every probe of the rounds together: a p99 of hundreds of probes, not of tens.
        pooled = sorted(lag for r in runs for lag in r["_lags"])
        out["latency_pooled"] = _latency(pooled, sum(r["latency"]["probes"] for r in runs))
        out["sustained"] = all(r["delivered"]["sustained"] for r in runs)
        out["backlog_at_window_end_max"] = max(
            r["delivered"]["backlog_at_window_end"] for r in runs
        )
        out["catch_up_s_max"] = max(r["delivered"]["catch_up_s"] for r in runs)
        out["receiver_cpu_us_per_span"] = med([r["receiver_cpu_us_per_span"] for r in runs], 3)
    return out


async def bench_forward(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    sizes = [parse_size(s) for s in args.forward_sizes.split(",") if s.strip()]
    s3 = await asyncio.to_thread(ctx.s3)
    pg_pid = ctx.pg.postmaster_pid()
    receiver = ReceiverProcess(
        provision.free_port(),
        log_path=ctx.workdir / "noop-receiver.log",
        decode=args.forward_receiver_decode,
    )
    destinations = ctx.workdir / "forward-destinations.yaml"
    yaml_entry = f"  - name: noop\n    endpoint: {receiver.url}\n    signals: [traces]\n"
    if args.forward_gzip_members:
        # many: objects posted as stored (aiohttp, like Go's reader, reads every member);
        # the default, one, compresses a many-member object again as one member.
        yaml_entry += f"    gzip_members: {args.forward_gzip_members}\n"
    destinations.write_text("destinations:\n" + yaml_entry)
    names = [*ROWS, MANY_ROW] if args.forward_many_row else list(ROWS)
    many_file = ctx.workdir / "forward-destinations-many.yaml"
    many_entry = f"  - name: noop\n    endpoint: {receiver.url}\n    signals: [traces]\n"
    many_file.write_text("destinations:\n" + many_entry + "    gzip_members: many\n")
    dsns: list[str] = []
    rows: list[Row] = []
    prober = Prober(args.probe_interval_ms / 1000.0)
    results: dict[str, Any] = {
        "rows": names,
        "destination": {
            "receiver": "loadtest.noop_receiver",
            "decode": args.forward_receiver_decode,
            "file": destinations.read_text(),
        },
        "sizes": {},
    }
    try:
        for name in names:
            bucket = await asyncio.to_thread(s3.create_bucket, f"otelworker-bench-{name}")
            dsns.append(dsn := await ctx.pg.fresh_database(f"otelworker_bench_{name}"))
            settings = {"DATABASE_URL": dsn, "ROLE": "all", "LOG_LEVEL": "INFO"}
            settings.update(s3.service_env(bucket))
            if name == "all_fwd":
                settings["DESTINATIONS_FILE"] = str(destinations)
            elif name == MANY_ROW:
                settings["DESTINATIONS_FILE"] = str(many_file)
            proc = provision.AppProcess(
                "otelworker.app:app",
                settings=settings,
                log_path=ctx.workdir / f"{name}.log",
                entry="serve",
            )
            rows.append(Row(name, proc, dsn, pg_pid, receiver.pid))
        try:
            await receiver.wait_ready_async()
            for row in rows:
                await row.proc.wait_ready_async()
            for size in sizes:
                _say(
                    f"\nforward [{size.key}]: {' vs '.join(TITLES[n] for n in names)};"
                    f" {size.title}, concurrency {args.concurrency}, warm-up {args.warmup} s,"
                    f" {args.rounds} x {args.duration} s, alternating; probes every"
                    f" {args.probe_interval_ms} ms"
                )
                runs: list[dict[str, Any]] = []
                for row in rows:
                    await _one_run(
                        ctx, row, size, "warmup", args.warmup, args.concurrency, prober, receiver
                    )
                for n in range(1, args.rounds + 1):
                    # A/B, then B/A: a drift over the rounds (the machine's other work)
                    # falls on both rows alike.
                    for row in rows if n % 2 else rows[::-1]:  # (A/B/C, then C/B/A)
                        runs.append(
                            await _one_run(
                                ctx,
                                row,
                                size,
                                f"run{n}",
                                args.duration,
                                args.concurrency,
                                prober,
                                receiver,
                            )
                        )
                paced = await _one_run(
                    ctx,
                    rows[1],
                    size,
                    "paced",
                    args.duration,
                    args.forward_latency_concurrency,
                    prober,
                    receiver,
                )
                by_row = {n: _summary([r for r in runs if r["row"] == n]) for n in names}
                base = by_row["all"]["service_cpu_us_per_span"]
                fwd = by_row["all_fwd"]["service_cpu_us_per_span"]
                ratio = round(fwd / base, 3) if base and fwd else None
                base_pg = by_row["all"]["service_pg_cpu_us_per_span"]
                fwd_pg = by_row["all_fwd"]["service_pg_cpu_us_per_span"]
                # Each round's all_fwd over the same round's all: drift-free, a spread.
                paired = sorted(
                    b["service_cpu_us_per_span"] / a["service_cpu_us_per_span"]
                    for a, b in zip(
                        [r for r in runs if r["row"] == "all"],
                        [r for r in runs if r["row"] == "all_fwd"],
                        strict=True,
                    )
                    if a["service_cpu_us_per_span"] and b["service_cpu_us_per_span"]
                )
                entry: dict[str, Any] = {
                    "rows": by_row,
                    "cpu_ratio": ratio,
                    "cpu_ratio_paired": {
                        "median": round(_median(paired), 3) if paired else None,
                        "min": round(paired[0], 3) if paired else None,
                        "max": round(paired[-1], 3) if paired else None,
                    },
                    "cpu_ratio_with_postgres": (
                        round(fwd_pg / base_pg, 3) if base_pg and fwd_pg else None
                    ),
                    "forwarding_cpu_us_per_span": round(fwd - base, 3) if base and fwd else None,
                    "paced": {
                        "req_per_s": paced["ok_per_s"],
                        "spans_per_s": paced["spans_per_s"],
                        "latency": paced.get("latency"),
                        "service_cpu_us_per_span": paced["service_cpu_us_per_span"],
                        "sustained": paced["delivered"]["sustained"],
                    },
                    "verification": {
                        "ok": all(r["check"]["ok"] for r in [*runs, paced]),
                        "failed": [r["check"] for r in [*runs, paced] if not r["check"]["ok"]],
                    },
                    "runs": [*runs, paced],
                }
                if MANY_ROW in by_row:
                    many = by_row[MANY_ROW]["service_cpu_us_per_span"]
                    entry["cpu_ratio_many"] = round(many / base, 3) if base and many else None
                    entry["cpu_ratio_many_paired"] = round(
                        _median(
                            [
                                b["service_cpu_us_per_span"] / a["service_cpu_us_per_span"]
                                for a, b in zip(
                                    [r for r in runs if r["row"] == "all"],
                                    [r for r in runs if r["row"] == MANY_ROW],
                                    strict=True,
                                )
                                if a["service_cpu_us_per_span"] and b["service_cpu_us_per_span"]
                            ]
                        ),
                        3,
                    )
                for run in entry["runs"]:
                    run.pop("_lags", None)
                results["sizes"][size.key] = entry
                _print_size(size, entry)
        finally:
            for row in rows:
                row.proc.stop()
            receiver.stop()
    finally:
        for dsn in dsns:
            await ctx.pg.drop_database(dsn)
    results["targets"] = _targets(results["sizes"])
    results["verification"] = {
        "ok": all(e["verification"]["ok"] for e in results["sizes"].values())
    }
    return results


def _targets(sizes: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    entry = sizes.get(TARGET_SIZE)
    if entry is not None and entry["cpu_ratio"] is not None:
        found.append(
            {
                "what": "service CPU per span, 1 destination over none, 512 spans",
                "target": f"<= {CPU_RATIO_TARGET}",
                "value": entry["cpu_ratio"],
                "met": entry["cpu_ratio"] <= CPU_RATIO_TARGET,
            }
        )
    for key, entry in sizes.items():
        # The full load's rate, when the destination kept up with it (no backlog), is the
        # sustained rate: the target applies to its probes, all rounds pooled. Otherwise
        # (a backlog: the latency grows with the run's length) to the paced run's.
        full = entry["rows"]["all_fwd"]
        p99 = full["latency_pooled"]["p99_ms"]
        if full["sustained"] and p99 is not None:
            found.append(
                {
                    "what": f"ack-to-delivery p99 at the full load (sustained), {key} spans",
                    "target": f"<= {P99_TARGET_MS:.0f} ms",
                    "value": p99,
                    "met": p99 <= P99_TARGET_MS,
                }
            )
        p99 = (entry["paced"]["latency"] or {}).get("p99_ms")
        if p99 is not None:
            found.append(
                {
                    "what": f"ack-to-delivery p99 at the paced rate, {key} spans",
                    "target": f"<= {P99_TARGET_MS:.0f} ms",
                    "value": p99,
                    "met": p99 <= P99_TARGET_MS,
                }
            )
    return found


def _print_size(size: Size, entry: dict[str, Any]) -> None:
    _say(f"\nforward [{size.key}] medians:")
    for name, row in entry["rows"].items():
        text = (
            f"  {TITLES[name]:<26} {_fmt(row['req_per_s']):>8} req/s"
            f" {_fmt(row['spans_per_s'], 0):>9} spans/s acknowledged;"
            f" service {_fmt(row['service_cpu_us_per_span'], 2)} us CPU/span"
            f" (+PostgreSQL {_fmt(row['service_pg_cpu_us_per_span'], 2)})"
        )
        if "delivered_spans_per_s_window" in row:
            pooled = row["latency_pooled"]
            text += (
                f"; delivered {_fmt(row['delivered_spans_per_s_window'], 0)} spans/s"
                f" (window), {_fmt(row['delivered_spans_per_s_until_delivered'], 0)}"
                f" (until delivered); ack->delivery p50 {_fmt(pooled['p50_ms'])} ms,"
                f" p99 {_fmt(pooled['p99_ms'])} ms ({pooled['arrived']} probes pooled;"
                f" per-round medians {_fmt(row['latency_p50_ms'])}/"
                f"{_fmt(row['latency_p99_ms'])}); {'sustained' if row['sustained'] else 'BACKLOG'}"
                f" (backlog at window end <= {row['backlog_at_window_end_max']:.1%}, caught up"
                f" <= {row['catch_up_s_max']:.2f} s); duplicates {row['duplicates']};"
                f" receiver {_fmt(row['receiver_cpu_us_per_span'], 2)} us CPU/span"
            )
        _say(text)
    paced = entry["paced"]
    lat = paced["latency"] or {}
    _say(
        f"  paced (concurrency {entry['runs'][-1]['concurrency']}):"
        f" {_fmt(paced['spans_per_s'], 0)} spans/s, ack->delivery p50 {_fmt(lat.get('p50_ms'))}"
        f" ms, p99 {_fmt(lat.get('p99_ms'))} ms, max {_fmt(lat.get('max_ms'))} ms"
    )
    paired = entry["cpu_ratio_paired"]
    _say(
        f"  forwarding: {_fmt(entry['forwarding_cpu_us_per_span'], 2)} us CPU/span more,"
        f" ratio {_fmt(entry['cpu_ratio'], 3)} (target <= {CPU_RATIO_TARGET} at 512 spans;"
        f" per round {_fmt(paired['median'], 3)} median, {_fmt(paired['min'], 3)}"
        f"-{_fmt(paired['max'], 3)}; with PostgreSQL {_fmt(entry['cpu_ratio_with_postgres'], 3)});"
        f" verification {'ok' if entry['verification']['ok'] else 'FAILED'}"
    )
    if "cpu_ratio_many" in entry:
        _say(
            f"  with gzip_members: many (same rounds): ratio {_fmt(entry['cpu_ratio_many'], 3)}"
            f" (per round {_fmt(entry['cpu_ratio_many_paired'], 3)} median)"
        )


def print_forward(result: dict[str, Any]) -> None:
    _say("\nforward targets:")
    for target in result["targets"]:
        mark = "met" if target["met"] else "MISSED"
        _say(f"  {target['what']}: {target['value']} (target {target['target']}): {mark}")


__all__ = ["bench_forward", "print_forward"]
