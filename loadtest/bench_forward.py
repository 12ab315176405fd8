"""The forwarding benchmark (issue 21): ROLE=all with one destination beside ROLE=all without.

    python -m loadtest.bench forward                     # 100 and 512 spans, both rows
    python -m loadtest.bench forward --duration 5 --warmup 2 --rounds 1 --forward-sizes 512

Two ``python -m hypercorn otelworker.app:app`` processes with ``ROLE=all`` on databases
and buckets of their own (S3 as the ``all`` row has it): ``all`` (no destination) and
``all_fwd`` (``DESTINATIONS_FILE`` naming one OTLP/HTTP destination, the no-op receiver
:mod:`loadtest.noop_receiver` in a third process: it decompresses, decodes and counts,
keeps nothing). Each gets the same closed-loop load (:mod:`loadtest.loadgen`, alternated
A/B/A/B) and, beside it, **probes**: the benchmark itself sends a 1-span trace request
every ``--probe-interval-ms`` whose trace id is :data:`~loadtest.noop_receiver.PROBE_MAGIC`
and a sequence number, and stamps the time its 200 arrived; the receiver stamps the time
the probe's span arrived in a forwarded request. Their difference is the
**acknowledgement-to-delivery latency** of a record.

Per row and size:

- **delivered spans/s**: spans the receiver counted during the timed window over its
  length, and over the whole time until every acknowledged span had arrived;
- **service CPU us per acknowledged span**, from the window's start until the queue is
  drained (and, with the destination, every delivery delivered and every probe arrived):
  the service process tree's CPU (psutil), as the other rows measure it. Forwarding's
  share is the difference between the two rows, its cost the ratio (target: at most
  1.25 at 512 spans);
- **ack-to-delivery p50/p99** under the full load, and in a paced run after the rounds
  (``--forward-latency-concurrency`` connections, 4: a rate the service sustains without a
  backlog, where the target p99 <= 2 s applies);
- the at-least-once check: the receiver got at least every acknowledged span, no delivery
  is dead, every acknowledged probe arrived; duplicates (spans beyond the acknowledged) are
  reported.
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
TITLES = {"all": "ROLE=all", "all_fwd": "ROLE=all + 1 destination"}


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
    dsn: str, receiver: ReceiverProcess, probes: dict[int, float], limit_s: float
) -> dict[str, Any]:
    """Until no delivery is pending and every acknowledged probe reached the receiver."""
    deadline = time.monotonic() + limit_s
    while True:
        live, dead = await _pending_deliveries(dsn)
        stats = await asyncio.to_thread(receiver.stats)
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


def _latency(probes: dict[int, float], stats: dict[str, Any]) -> dict[str, Any]:
    arrived = stats["probes"]
    lags = sorted(
        max(0.0, arrived[str(seq)] - acked) * 1000.0
        for seq, acked in probes.items()
        if str(seq) in arrived
    )
    return {
        "probes": len(probes),
        "arrived": len(lags),
        "p50_ms": None if not lags else round(percentile(lags, 50) or 0.0, 1),
        "p99_ms": None if not lags else round(percentile(lags, 99) or 0.0, 1),
        "max_ms": None if not lags else round(lags[-1], 1),
    }


class Row:
    def __init__(self, name: str, proc: provision.AppProcess, dsn: str, pg_pid: int | None):
        self.name = name
        self.proc = proc
        self.dsn = dsn
        self.trees = {"service": proc.pid, "postgres": pg_pid}
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
    before = await asyncio.to_thread(receiver.stats)
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
    at_window_end = await asyncio.to_thread(receiver.stats)
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
    if row.name == "all_fwd":
        delivered = await _wait_delivered(row.dsn, receiver, probes, args.drain_wait)
        after = delivered["stats"]
        gained = after["records"]["traces"] - before["records"]["traces"]
        in_window = at_window_end["records"]["traces"] - before["records"]["traces"]
        until = max(after["last_arrival"] - started, 1e-9)
        record["delivered"] = {
            "spans": gained,
            "spans_in_window": in_window,
            "spans_per_s_window": round(in_window / result.elapsed_s, 0),
            "spans_per_s_until_delivered": round(gained / until, 0),
            "duplicates": max(0, gained - acked_spans),
            "probe_repeats": after["probe_repeats"] - before["probe_repeats"],
            "dead_deliveries": delivered["dead"],
            "note": delivered["note"],
        }
        record["latency"] = _latency(probes, after)
    full = meter.stop()
    service_s = (full.get("service_cores") or 0.0) * full["wall_s"]
    record["cpu_to_done"] = full
    record["acked_spans"] = acked_spans
    record["service_cpu_us_per_span"] = (
        round(service_s / acked_spans * 1e6, 3) if acked_spans else None
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
            f" p99 {_fmt(lat['p99_ms'])} ms ({lat['arrived']}/{lat['probes']} probes)"
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
    return out


async def bench_forward(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    sizes = [parse_size(s) for s in args.forward_sizes.split(",") if s.strip()]
    s3 = await asyncio.to_thread(ctx.s3)
    pg_pid = ctx.pg.postmaster_pid()
    receiver = ReceiverProcess(provision.free_port(), log_path=ctx.workdir / "noop-receiver.log")
    destinations = ctx.workdir / "forward-destinations.yaml"
    entry = f"  - name: noop\n    endpoint: {receiver.url}\n    signals: [traces]\n"
    if args.forward_gzip_members:
        # many: objects posted as stored (aiohttp, like Go's reader, reads every member);
        # the default, one, compresses a many-member object again as one member.
        entry += f"    gzip_members: {args.forward_gzip_members}\n"
    destinations.write_text("destinations:\n" + entry)
    dsns: list[str] = []
    rows: list[Row] = []
    prober = Prober(args.probe_interval_ms / 1000.0)
    results: dict[str, Any] = {
        "rows": list(ROWS),
        "destination": {"receiver": "loadtest.noop_receiver", "file": destinations.read_text()},
        "sizes": {},
    }
    try:
        for name in ROWS:
            bucket = await asyncio.to_thread(s3.create_bucket, f"otelworker-bench-{name}")
            dsns.append(dsn := await ctx.pg.fresh_database(f"otelworker_bench_{name}"))
            settings = {"DATABASE_URL": dsn, "ROLE": "all", "LOG_LEVEL": "INFO"}
            settings.update(s3.service_env(bucket))
            if name == "all_fwd":
                settings["DESTINATIONS_FILE"] = str(destinations)
            proc = provision.AppProcess(
                "otelworker.app:app", settings=settings, log_path=ctx.workdir / f"{name}.log"
            )
            rows.append(Row(name, proc, dsn, pg_pid))
        try:
            await receiver.wait_ready_async()
            for row in rows:
                await row.proc.wait_ready_async()
            for size in sizes:
                _say(
                    f"\nforward [{size.key}]: {' vs '.join(TITLES[n] for n in ROWS)};"
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
                    for row in rows:
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
                by_row = {n: _summary([r for r in runs if r["row"] == n]) for n in ROWS}
                base = by_row["all"]["service_cpu_us_per_span"]
                fwd = by_row["all_fwd"]["service_cpu_us_per_span"]
                ratio = round(fwd / base, 3) if base and fwd else None
                entry: dict[str, Any] = {
                    "rows": by_row,
                    "cpu_ratio": ratio,
                    "forwarding_cpu_us_per_span": round(fwd - base, 3) if base and fwd else None,
                    "paced": {
                        "req_per_s": paced["ok_per_s"],
                        "spans_per_s": paced["spans_per_s"],
                        "latency": paced.get("latency"),
                        "service_cpu_us_per_span": paced["service_cpu_us_per_span"],
                    },
                    "verification": {
                        "ok": all(r["check"]["ok"] for r in [*runs, paced]),
                        "failed": [r["check"] for r in [*runs, paced] if not r["check"]["ok"]],
                    },
                    "runs": [*runs, paced],
                }
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
        p99 = (entry["paced"]["latency"] or {}).get("p99_ms")
        if p99 is not None:
            found.append(
                {
                    "what": f"ack-to-delivery p99 at a sustained rate, {key} spans",
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
        )
        if "delivered_spans_per_s_window" in row:
            text += (
                f"; delivered {_fmt(row['delivered_spans_per_s_window'], 0)} spans/s"
                f" (window), {_fmt(row['delivered_spans_per_s_until_delivered'], 0)}"
                f" (until delivered); ack->delivery p50 {_fmt(row['latency_p50_ms'])} ms,"
                f" p99 {_fmt(row['latency_p99_ms'])} ms; duplicates {row['duplicates']}"
            )
        _say(text)
    paced = entry["paced"]
    lat = paced["latency"] or {}
    _say(
        f"  paced (concurrency {entry['runs'][-1]['concurrency']}):"
        f" {_fmt(paced['spans_per_s'], 0)} spans/s, ack->delivery p50 {_fmt(lat.get('p50_ms'))}"
        f" ms, p99 {_fmt(lat.get('p99_ms'))} ms, max {_fmt(lat.get('max_ms'))} ms"
    )
    _say(
        f"  forwarding: {_fmt(entry['forwarding_cpu_us_per_span'], 2)} us CPU/span more,"
        f" ratio {_fmt(entry['cpu_ratio'], 3)} (target <= {CPU_RATIO_TARGET} at 512 spans);"
        f" verification {'ok' if entry['verification']['ok'] else 'FAILED'}"
    )


def print_forward(result: dict[str, Any]) -> None:
    _say("\nforward targets:")
    for target in result["targets"]:
        mark = "met" if target["met"] else "MISSED"
        _say(f"  {target['what']}: {target['value']} (target {target['target']}): {mark}")


__all__ = ["bench_forward", "print_forward"]
