"""``--mode stress``: aggressive load against the real service, watched every second.

The load comes from a child process (:mod:`loadtest.stress_load`) so that it never
competes with this process's S3 server thread for the GIL: over OTLP/HTTP or, with
``--transport grpc``, over OTLP/gRPC to the service's GRPC_PORT (GRPC_ENABLED=true).
This process samples ``GET /metrics`` (staging backlog, buffer depth), the queue table
and the service's RSS every second, prints a progress line on stderr, waits for the
drain after the load, checks the accounting invariant record by record, and writes
``loadtest/reports/stress-<time>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from loadtest import otlp_grpc
from loadtest.stress_env import (
    Harness,
    InvariantBroken,
    Ledger,
    Service,
    Stores,
    Target,
    account,
    check,
    no_bug_events,
)
from loadtest.stress_load import Schedule, percentile

#: The product defaults, plus what a run on a laptop needs. ``--set KEY=VALUE`` adds more.
STRESS_SETTINGS = {"LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "10"}


@dataclass
class Tick:
    t: float
    phase: str
    backlog: float | None
    buffer: float | None
    queue_rows: int | None
    rss_mb: float
    sent: int
    statuses: dict[str, int]


def _settings(pairs: list[str]) -> dict[str, str]:
    out = dict(STRESS_SETTINGS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {pair!r}")
        out[key.strip().upper().removeprefix("OTEL_")] = value
    return out


class Watcher:
    """Samples the service once a second; keeps the last load progress for the line."""

    def __init__(self, service: Any, stores: Stores, client: httpx.AsyncClient) -> None:
        self.service = service
        self.stores = stores
        self.client = client
        self.ticks: list[Tick] = []
        self.phase = "start"
        self.loading = asyncio.Event()  # set when the load's timed phase begins
        self.t0 = time.monotonic()
        self.sent = 0
        self.statuses: dict[str, int] = {}
        self.peak_rss = 0
        self.baseline_rss = service.rss()

    async def sample(self) -> Tick:
        backlog = buffer = None
        rows = None
        with contextlib.suppress(Exception):
            metrics = await self.service.metrics(self.client)
            backlog = metrics.value("otelworker_staging_backlog_items")
            buffer = metrics.value("otelworker_buffer_items")
        with contextlib.suppress(Exception):
            status = await self.stores.queue_status()
            rows = sum(n for s, n in status.items() if s != "dead")
        rss = self.service.rss()
        self.peak_rss = max(self.peak_rss, rss)
        tick = Tick(
            round(time.monotonic() - self.t0, 3),
            self.phase,
            backlog,
            buffer,
            rows,
            round(rss / 2**20, 1),
            self.sent,
            dict(self.statuses),
        )
        self.ticks.append(tick)
        return tick

    async def run(self) -> None:
        while True:
            tick = await self.sample()
            mix = " ".join(f"{k}:{v}" for k, v in sorted(self.statuses.items()))
            rate = 0.0
            if len(self.ticks) >= 2:
                a, b = self.ticks[-2], self.ticks[-1]
                rate = (b.sent - a.sent) / max(b.t - a.t, 1e-6)
            line = (
                f"\r[{self.phase:<5}] {tick.t:6.1f} s  sent {self.sent:>7}  {rate:7.0f} req/s  "
                f"[{mix}]  backlog {_num(tick.backlog)}  queue {_num(tick.queue_rows)}  "
                f"buffer {_num(tick.buffer)}  rss {tick.rss_mb:.0f} MB"
            )
            sys.stderr.write(line[:200].ljust(120))
            sys.stderr.flush()
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - self.t0 - tick.t)))


def _num(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.0f}"


async def _load(
    args: argparse.Namespace, service: Service, out: Path, watcher: Watcher
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "loadtest.stress_load", "--url", service.url,
        "--duration", str(args.duration), "--concurrency", str(args.concurrency),
        "--signals", args.signals, "--records", str(args.records), "--pad", str(args.pad),
        "--encoding", args.encoding, "--out", str(out), "--transport", args.transport,
    ]  # fmt: skip
    if args.transport == "grpc":
        cmd += ["--grpc-target", service.grpc_target, "--channels", str(args.grpc_channels)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    async for raw in proc.stdout:
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if message.get("phase") == "timing":
            watcher.t0 = time.monotonic()
            watcher.ticks.clear()
            watcher.phase = "load"
            watcher.loading.set()
        elif message.get("phase") == "progress":
            watcher.sent = message["sent"]
            watcher.statuses = message["statuses"]
    code = await proc.wait()
    if code != 0:
        raise RuntimeError(f"the load generator exited with {code}")
    return await asyncio.to_thread(_read_json, out)


def _read_json(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _write_report(report: dict[str, Any], report_dir: Path, stamp: str) -> tuple[Path, Path | None]:
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / f"stress-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    if not report["timeline"]:
        return json_path, None
    from loadtest.stress_report import chart

    png_path = report_dir / f"stress-{stamp}.png"
    chart(report, png_path)
    return json_path, png_path


def _ledger(result: dict[str, Any]) -> Ledger:
    sched = result["schedule"]
    schedule = Schedule(tuple(sched["signals"]), tuple(sched["encodings"]), sched["records"])
    ledger = Ledger()
    for k, status in enumerate(result["statuses"], start=1):
        sent = ledger.new(schedule.signal(k), schedule.records, schedule.encoding(k))
        sent.status = status
    return ledger


async def run_stress(args: argparse.Namespace) -> int:
    report_dir = Path(args.report_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.workdir) if args.workdir else report_dir / f"stress-{stamp}"
    settings = _settings(args.set)
    harness = Harness(workdir / "logs", keep=args.keep)
    report: dict[str, Any] = {
        "mode": "stress",
        "started": datetime.now().isoformat(timespec="seconds"),
        "config": {
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "signals": args.signals,
            "records_per_request": args.records,
            "pad_bytes_per_record": args.pad,
            "encoding": args.encoding,
            "transport": args.transport,
            "grpc_channels": args.grpc_channels if args.transport == "grpc" else None,
            "service_settings": settings,
        },
        "machine": {"cpus": os.cpu_count()},
    }
    failure: str | None = None
    watcher: Watcher | None = None
    pair: Any = None
    grpc = args.transport == "grpc"
    if grpc and settings.get("GRPC_ENABLED", "true").strip().lower() not in ("1", "true", "yes"):
        raise SystemExit("--transport grpc needs the service's gRPC server: drop GRPC_ENABLED")
    try:
        await asyncio.to_thread(harness.start)
        report["machine"]["stores"] = harness.describe()
        if args.failover_at is not None:
            # A primary and its synchronous standby of the run's own (tests/support/replica.py).
            from tests.support.replica import ReplicaPair

            assert harness.s3 is not None
            pair = ReplicaPair(
                Path(tempfile.mkdtemp(prefix="otelworker-stress-failover-")), synchronous=True
            )
            await asyncio.to_thread(pair.start)
            bucket = await asyncio.to_thread(harness.s3.create_bucket, "stress-failover")
            target = Target("stress", pair.multi_host_dsn, bucket, harness.s3)
        else:
            target = await harness.target("stress")
        # The product defaults, not the verify scenarios' small limits.
        service = harness.service(target, "stress", settings, base={}, grpc=grpc)
        await service.start()
        where = (
            f"OTLP/gRPC at {service.grpc_target} over {args.grpc_channels} channels"
            if grpc
            else "OTLP/HTTP"
        )
        print(
            f"stress: {harness.describe()}; service {service.url} (log {service.log_path}); "
            f"{args.duration:.0f} s at concurrency {args.concurrency}, {args.records} records "
            f"per request, signals {args.signals}, encoding {args.encoding}, {where}",
            file=sys.stderr,
            flush=True,
        )
        stores = Stores(target)
        async with httpx.AsyncClient(timeout=10) as client:
            watcher = Watcher(service, stores, client)
            ticker = asyncio.create_task(watcher.run())
            failing_over = None
            if pair is not None:
                failing_over = asyncio.create_task(
                    _fail_over(pair, args.failover_at, service, client, watcher, report)
                )
            try:
                out = workdir / "load-result.json"
                result = await _load(args, service, out, watcher)
                if failing_over is not None:
                    await failing_over
                load_end = float(result["elapsed_s"])  # the last answer, on the watcher's clock
                watcher.phase = "drain"
                drained = False
                if not args.no_accounting:
                    try:
                        await stores.wait_drained(args.drain_timeout)
                        drained = True
                    except InvariantBroken as exc:
                        failure = str(exc)
                drain_s = time.monotonic() - watcher.t0 - load_end
            finally:
                if failing_over is not None and not failing_over.done():
                    failing_over.cancel()
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                sys.stderr.write("\n")
            await watcher.sample()
            metrics = await service.metrics(client)
        ledger = _ledger(result)
        report["load"] = _load_summary(result, ledger)
        if pair is not None:
            # A 503 in the switch may be a commit cut off with its connection (outcome
            # unknown): held to all-or-nothing, like a request with no answer.
            for sent in ledger.with_status(503):
                sent.status = 0
        report["service"] = {
            "baseline_rss_mb": round(watcher.baseline_rss / 2**20, 1),
            "peak_rss_mb": round(watcher.peak_rss / 2**20, 1),
            "records_exported": metrics.value("otelworker_records_exported_total"),
            "batches": metrics.value("otelworker_batches_flushed_total"),
            "polling_pauses": metrics.value("otelworker_polling_pauses_total"),
            "batch_failures": metrics.value("otelworker_batch_failures_total"),
        }
        report["drain"] = {
            "drained": drained,
            "seconds_after_load": round(drain_s, 2),
            "load_end_s": round(load_end, 2),
        }
        if drained and failure is None:
            try:
                report["accounting"] = await _accounting(ledger, stores)
            except InvariantBroken as exc:
                failure = str(exc)
        await stores.close()
        await service.stop()
        try:
            no_bug_events(service)
            check(
                ledger.records(200) > 0,
                "some_records_acknowledged",
                "no request was acknowledged (HTTP 200, gRPC OK without partial_success)",
            )
        except InvariantBroken as exc:
            failure = failure or str(exc)
    except Exception as exc:
        failure = failure or f"error {type(exc).__name__}: {exc}"
    finally:
        await harness.close()
        if pair is not None:
            await asyncio.to_thread(pair.stop)
    report["timeline"] = [asdict(t) for t in watcher.ticks] if watcher else []
    if "load" in report:
        report["series"] = result["series"]
    report["result"] = "PASS" if failure is None else f"FAIL: {failure}"
    json_path, png_path = await asyncio.to_thread(_write_report, report, report_dir, stamp)
    _print_summary(report, json_path, png_path)
    return 0 if failure is None else 1


async def _fail_over(
    pair: Any,
    at_s: float,
    service: Service,
    client: httpx.AsyncClient,
    watcher: Watcher,
    report: dict[str, Any],
) -> None:
    """``at_s`` into the load: SIGKILL the primary, promote the standby, time /readyz."""
    await watcher.loading.wait()
    await asyncio.sleep(max(0.0, at_s - (time.monotonic() - watcher.t0)))
    killed = time.monotonic()
    await asyncio.to_thread(pair.kill_primary)
    await asyncio.to_thread(pair.promote)
    ready_s: float | None = None
    while time.monotonic() - killed < 120:
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(f"{service.url}/readyz", timeout=5)).status_code == 200:
                ready_s = time.monotonic() - killed
                break
        await asyncio.sleep(0.1)
    report["failover"] = {
        "at_s": round(killed - watcher.t0, 2),
        "ready_again_s": round(ready_s, 2) if ready_s is not None else None,
        "note": "503s held to all-or-nothing in the accounting (outcome unknown)",
    }
    check(ready_s is not None, "failover_ready_again", "not ready 120 s after the failover")


def _load_summary(result: dict[str, Any], ledger: Ledger) -> dict[str, Any]:
    statuses: Counter[str] = Counter(str(s) for s in result["statuses"])
    elapsed = max(result["elapsed_s"], 1e-9)
    lat = sorted(result["latencies"])
    ok_lat = sorted(
        x for x, s in zip(result["latencies"], result["statuses"], strict=True) if s == 200
    )

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(v * 1000, 2)

    acked_records = ledger.records(200)
    summary: dict[str, Any] = {
        "requests": len(result["statuses"]),
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(result["statuses"]) / elapsed, 1),
        "acked_requests_per_s": round(statuses.get("200", 0) / elapsed, 1),
        "records_per_s": round(acked_records / elapsed, 1),
        "acked_records": acked_records,
        "statuses": dict(sorted(statuses.items())),
        "errors": result["errors"],
        "body_bytes": result["body_bytes"],
        "latency_ms": {q: ms(lat, float(q[1:])) for q in ("p50", "p95", "p99")}
        | {"max": round(lat[-1] * 1000, 2) if lat else None},
        "latency_ms_200": {q: ms(ok_lat, float(q[1:])) for q in ("p50", "p95", "p99")},
    }
    if result.get("transport") == "grpc":
        # ``statuses`` keeps the HTTP analogues the ledger counts by; this is how they read.
        summary["grpc_codes"] = {
            otlp_grpc.label(int(k)): v for k, v in sorted(statuses.items(), key=lambda i: i[0])
        }
    return summary


async def _accounting(ledger: Ledger, stores: Stores) -> dict[str, Any]:
    status = await stores.queue_status()
    check(not status.get("dead"), "no_dead_rows", f"{status.get('dead')} rows are dead")
    t0 = time.monotonic()
    exported = await stores.exported()
    _, unknown_whole = account(ledger, exported.counts, "the manifest's objects")
    return {
        "result": "acked records exactly once in the manifest's objects; refused ones absent",
        "acked_records": ledger.records(200),
        "exported_records": exported.records,
        "objects": exported.objects_read,
        "object_bytes": exported.bytes_read,
        "orphans": exported.orphans,
        "unanswered_requests": len(ledger.with_status(0)),
        "unanswered_stored": unknown_whole,
        "check_s": round(time.monotonic() - t0, 2),
    }


def _print_summary(report: dict[str, Any], json_path: Path, png_path: Path | None) -> None:
    load = report.get("load")
    print(f"stress: {report['result']}")
    if load:
        lat = load["latency_ms"]
        print(
            f"  load     {load['requests']} requests in {load['elapsed_s']} s: "
            f"{load['requests_per_s']} req/s, {load['acked_requests_per_s']} acked req/s, "
            f"{load['records_per_s']} records/s acknowledged"
        )
        print(
            f"  latency  p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, "
            f"max {lat['max']} ms"
        )
        if "grpc_codes" in load:
            mix = ", ".join(f"{k}: {v}" for k, v in load["grpc_codes"].items())
        else:
            mix = ", ".join(
                f"{k if k != '0' else 'no answer'}: {v}" for k, v in load["statuses"].items()
            )
        errors = f" (errors {load['errors']})" if load["errors"] else ""
        print(f"  {'gRPC' if 'grpc_codes' in load else 'statuses'} {mix}{errors}")
    failover = report.get("failover")
    if failover:
        print(
            f"  failover primary SIGKILLed {failover['at_s']} s into the load, standby promoted;"
            f" ready again {failover['ready_again_s']} s after the kill"
        )
    timeline = report.get("timeline") or []
    if timeline:
        backlog = [t["backlog"] for t in timeline if t["backlog"] is not None]
        buffer = [t["buffer"] for t in timeline if t["buffer"] is not None]
        rows = [t["queue_rows"] for t in timeline if t["queue_rows"] is not None]
        print(
            f"  backlog  max {_num(max(backlog, default=None))} (admission gauge), queue rows max "
            f"{_num(max(rows, default=None))}; buffer max {_num(max(buffer, default=None))}"
        )
        step = max(1, len(timeline) // 12)
        shown = timeline[::step]
        print(
            "  over time (s: backlog/buffer): "
            + "  ".join(f"{t['t']:.0f}: {_num(t['backlog'])}/{_num(t['buffer'])}" for t in shown)
        )
    service = report.get("service")
    if service:
        print(
            f"  service  peak RSS {service['peak_rss_mb']} MB (at start "
            f"{service['baseline_rss_mb']} MB); {service['batches']:.0f} batches, "
            f"{service['polling_pauses']:.0f} polling pauses, "
            f"{service['batch_failures']:.0f} batch failures"
        )
    drain = report.get("drain")
    if drain:
        state = "drained" if drain["drained"] else "NOT drained"
        print(f"  drain    {state} {drain['seconds_after_load']} s after the last answer")
    acc = report.get("accounting")
    if acc:
        print(
            f"  accounting {acc['acked_records']} acked records in {acc['objects']} objects, "
            f"exactly once ({acc['check_s']} s to check); {acc['orphans']} orphan objects"
        )
    print(f"  report   {json_path}" + (f"\n  chart    {png_path}" if png_path else ""))
