"""Benchmarks: durable ingest against a no-op baseline, and drain against ingest.

    python -m loadtest.bench ingest   # durable ingest vs a no-op endpoint: target >= 0.6x
    python -m loadtest.bench drain    # drain spans/s vs durable ingest spans/s: target >= 1.5x
    python -m loadtest.bench all      # both (the default; `make bench`)
    python -m loadtest.bench all --json bench.json --duration 15 --rounds 2 --items 20000
    python -m loadtest.bench ingest --transports http   # skip the gRPC row

**ingest** starts PostgreSQL (see :mod:`loadtest.provision`), the service as a real
process (``python -m hypercorn otelworker.app:app``, ROLE=ingress) and a no-op Starlette
endpoint on hypercorn (:mod:`loadtest.noop_app`). The same load (100-span OTLP protobuf
trace requests, concurrency 32, keep-alive) goes from a separate load-generator
process to each in turn, A/B/A/B after a warm-up of each, so that drift on a shared
machine falls on both. The gRPC row is a second ROLE=ingress process with
GRPC_ENABLED=true (its own database) taking the same requests over OTLP/gRPC
(TraceService/Export, ``concurrency`` calls in flight over ``--grpc-channels``
channels), in the same rounds (A/B/C), its ratio also to the no-op HTTP baseline.
After every durable run (HTTP or gRPC) the rows in ``ingestion_queue`` are counted
against the acknowledgements the generator saw (200, or OK: the durable claim), then
truncated so that every run starts from the same table, as it would with a worker
draining it.

**drain** fills ``ingestion_queue`` with N items of 100 spans (COPY, not HTTP), starts
the service with ROLE=worker and an S3 server (moto's unless S3_ENDPOINT_URL is set),
and measures spans/s from readiness until the queue is empty; then checks the manifest
(``export_batches``) and the bucket against what was staged. Its ratio is to durable
ingest spans/s measured in the same run (by the ingest benchmark under ``all``, by a
durable-only ingest run under ``drain``; the HTTP row, or the gRPC row when
``--transports grpc`` left HTTP out).

During every timed window the CPU time of each process (service, PostgreSQL, load
generator, the rest of the machine) is sampled, to show what the run was bound by
and how busy the machine was with other work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from loadtest import provision
from loadtest.loadgen import LoadResult, LoadSpec, run_in_subprocess
from loadtest.payloads import TraceRequestFactory

INGEST_TARGET = 0.6
DRAIN_TARGET = 1.5
# With ROLE=ingress nothing drains the queue; the default cap (1000 items) would turn
# the benchmark into a test of the 429 path. The overflow path is the stress harness's.
NO_BACKLOG_CAP = "1000000000"


# --- machine and CPU accounting ------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _tree_cpu(pid: int | None, children: bool = True) -> dict[int, float]:
    """CPU seconds (user+system) of a process and (by default) its descendants, by pid."""
    if pid is None:
        return {}
    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if children else [root]
    except psutil.Error:
        return out
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
    return out


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


@dataclass
class CpuMeter:
    """CPU seconds used by named process trees over a window, and by the whole machine.

    Names in ``alone`` count their process only, not its children (the benchmark's own
    process, whose children are the processes measured under their own names).
    """

    trees: dict[str, int | None]
    alone: frozenset[str] = frozenset()
    _start: dict[str, dict[int, float]] = field(default_factory=dict)
    _busy0: float = 0.0
    _wall0: float = 0.0

    def start(self) -> None:
        self._start = {
            name: _tree_cpu(pid, name not in self.alone) for name, pid in self.trees.items()
        }
        self._busy0 = _machine_busy()
        self._wall0 = time.monotonic()

    def stop(self, client_cpu_s: float | None = None) -> dict[str, Any]:
        wall = time.monotonic() - self._wall0
        busy = _machine_busy() - self._busy0
        used: dict[str, float | None] = {}
        for name, pid in self.trees.items():
            if pid is None:
                used[name] = None
                continue
            before = self._start.get(name, {})
            now = _tree_cpu(pid, name not in self.alone)
            used[name] = sum(v - before.get(p, 0.0) for p, v in now.items())
        if client_cpu_s is not None:
            used["loadgen"] = client_cpu_s
        known = sum(v for v in used.values() if v is not None)
        report: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "cores": len(os.sched_getaffinity(0)),
            "machine_busy_cores": round(busy / wall, 2) if wall > 0 else None,
        }
        for name, value in used.items():
            report[f"{name}_cores"] = None if value is None else round(value / wall, 2)
        report["other_cores"] = round(max(0.0, busy - known) / wall, 2) if wall > 0 else None
        return report


# --- helpers ------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _cpu_text(cpu: dict[str, Any]) -> str:
    parts = []
    for key, value in cpu.items():
        if key.endswith("_cores") and value is not None:
            parts.append(f"{key.removesuffix('_cores')} {value:.2f}")
    text = "cores: " + ", ".join(parts)
    if cpu.get("service_cpu_us_per_request") is not None:
        text += f"; service {cpu['service_cpu_us_per_request']} us CPU/request"
    if cpu.get("service_cpu_us_per_item") is not None:
        text += f"; service {cpu['service_cpu_us_per_item']} us CPU/item"
    return text


def _say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    pg: provision.PostgresHandle
    results: dict[str, Any]
    _s3: provision.S3Handle | None = None

    def s3(self) -> provision.S3Handle:
        if self._s3 is None:
            self._s3 = provision.start_s3()
        return self._s3

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.stop()
        self.pg.stop()


async def settle(max_wait_s: float, below_cores: float) -> dict[str, Any]:
    """Wait (at most ``max_wait_s``) until the machine's other work falls below ``below_cores``.

    Called between runs, when the benchmark's own processes are idle, so what is busy
    is someone else's: on a shared machine this lowers the noise without hiding it
    (each run still reports the other load it ran beside).
    """
    started = time.monotonic()
    busy = float("nan")
    while True:
        before = _machine_busy()
        await asyncio.sleep(1.0)
        busy = _machine_busy() - before
        waited = time.monotonic() - started
        if busy < below_cores or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "busy_cores_before": round(busy, 2)}


async def _measure(
    spec: LoadSpec, trees: dict[str, int | None], args: argparse.Namespace | None = None
) -> tuple[LoadResult, dict[str, Any]]:
    quiet = await settle(args.settle, args.settle_cores) if args and args.settle > 0 else None
    meter = CpuMeter(trees)
    result = await run_in_subprocess(spec, on_timing=meter.start)
    cpu = meter.stop(result.client_cpu_s)
    if quiet is not None:
        cpu["settle"] = quiet
    for name in ("service", "postgres"):
        cores = cpu.get(f"{name}_cores")
        if cores is not None and result.ok:
            cpu[f"{name}_cpu_us_per_request"] = round(cores * cpu["wall_s"] / result.ok * 1e6)
    return result, cpu


def _budget(rate: float, duration: float, concurrency: int) -> int:
    """Request bodies to prebuild: twice what the warm-up rate needs, within bounds."""
    return int(min(max(rate * duration * 2, 2000), duration * 5000)) + concurrency


async def _count_staged(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(record_count), 0) AS r FROM ingestion_queue"
        )
        return int(row["n"]), int(row["r"])
    finally:
        await conn.close()


async def _truncate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE ingestion_queue")
    finally:
        await conn.close()


def _run_line(kind: str, label: str, result: LoadResult, cpu: dict[str, Any]) -> str:
    """One run: ``statuses`` by HTTP status, or by gRPC code name for the gRPC row."""
    return (
        f"  {kind:<7} {label:<9} {_fmt(result.ok_per_s):>9} req/s {_fmt(result.spans_per_s, 0):>9}"
        f" spans/s  p50 {_fmt(result.p50_ms):>6} ms  p99 {_fmt(result.p99_ms):>6} ms"
        f"  statuses {result.statuses}  {_cpu_text(cpu)}"
    )


# --- ingest --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str  # "durable" (OTLP/HTTP), "grpc" (OTLP/gRPC, durable too) or "noop"
    process: provision.AppProcess
    trees: dict[str, int | None]
    dsn: str | None = None  # the durable targets' database (rows counted after each run)
    grpc_port: int | None = None
    rate_hint: float = 1000.0
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def transport(self) -> str:
        return "grpc" if self.grpc_port is not None else "http"

    @property
    def url(self) -> str:
        if self.grpc_port is not None:
            return f"grpc://127.0.0.1:{self.grpc_port}"
        return f"{self.process.url}/v1/traces"


@contextlib.contextmanager
def _processes(*procs: provision.AppProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()


async def _ingest_runs(
    ctx: Context, targets: list[Target]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Warm up each target, then alternate timed runs; check and clear staged rows."""
    args = ctx.args
    staged_ok = True
    checks: list[dict[str, Any]] = []

    async def one(target: Target, label: str, duration: float) -> dict[str, Any]:
        nonlocal staged_ok
        spec = LoadSpec(
            url=target.url,
            concurrency=args.concurrency,
            duration_s=duration,
            max_requests=_budget(target.rate_hint, duration, args.concurrency),
            spans=args.spans,
            label=f"{target.name}:{label}",
            transport=target.transport,
            channels=args.grpc_channels,
        )
        result, cpu = await _measure(spec, target.trees, args)
        record: dict[str, Any] = {"target": target.name, "run": label, **asdict(result), "cpu": cpu}
        if result.ended_by == "requests":
            record["note"] = "request budget ran out before the duration; rate is still valid"
        if target.dsn is not None:
            rows, spans = await _count_staged(target.dsn)
            check = {
                "target": target.name,
                "run": label,
                # an HTTP 200, or a gRPC OK (without partial_success)
                "acknowledged_200": result.ok,
                "rows": rows,
                "spans": spans,
                "expected_spans": result.ok * args.spans,
                # Every 200 is a row. A request that timed out at the client may still
                # have committed, so rows may exceed the 200s; never fall short.
                "ok": rows >= result.ok and spans >= result.ok * args.spans,
                "exact": rows == result.ok,
            }
            checks.append(check)
            staged_ok = staged_ok and bool(check["ok"])
            record["staged_rows"] = rows
            await _truncate(target.dsn)
        if label == "warmup" and result.ok_per_s > 0:
            target.rate_hint = result.ok_per_s
        _say(_run_line(target.name, label, result, cpu))
        return record

    for target in targets:
        await one(target, "warmup", args.warmup)
    for n in range(1, args.rounds + 1):
        for target in targets:
            target.runs.append(await one(target, f"run{n}", args.duration))
    verification = {"ok": staged_ok, "runs": checks}
    return verification, [run for t in targets for run in t.runs]


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": len(runs),
        "req_per_s": round(_median([r["ok_per_s"] for r in runs]), 1),
        "spans_per_s": round(_median([r["spans_per_s"] for r in runs]), 0),
        "p50_ms": round(_median([r["p50_ms"] for r in runs if r["p50_ms"] is not None]), 2),
        "p99_ms": round(_median([r["p99_ms"] for r in runs if r["p99_ms"] is not None]), 2),
        "non_200": sum(r["requests"] - r["ok"] for r in runs),
        "service_cpu_us_per_request": round(
            _median(
                [
                    r["cpu"]["service_cpu_us_per_request"]
                    for r in runs
                    if r["cpu"].get("service_cpu_us_per_request") is not None
                ]
            )
        ),
        "other_cores": round(_median([r["cpu"]["other_cores"] for r in runs]), 2),
    }


def _durable_settings(dsn: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "ROLE": "ingress",
        "STAGING_MAX_BACKLOG": NO_BACKLOG_CAP,
        "LOG_LEVEL": "INFO",
    }


def _durable_process(
    ctx: Context, dsn: str, log_name: str, grpc_port: int | None = None, port: int | None = None
) -> provision.AppProcess:
    settings = _durable_settings(dsn)
    if grpc_port is not None:
        settings.update(provision.grpc_settings(grpc_port))
    return provision.AppProcess(
        "otelworker.app:app", settings=settings, log_path=ctx.workdir / log_name, port=port
    )


def _per_round(runs: list[dict[str, Any]], name: str) -> list[float]:
    """``name``'s req/s over the no-op's, round by round (warm-ups are not in ``runs``)."""
    mine = [r for r in runs if r["target"] == name]
    noop = [r for r in runs if r["target"] == "noop"]
    return [
        round(a["ok_per_s"] / b["ok_per_s"], 3)
        for a, b in zip(mine, noop, strict=True)
        if b["ok_per_s"]
    ]


async def bench_ingest(
    ctx: Context, *, baseline: bool = True, transports: tuple[str, ...] = ("http", "grpc")
) -> dict[str, Any]:
    args = ctx.args
    pg_pid = ctx.pg.postmaster_pid()
    dsns: list[str] = []
    targets: list[Target] = []
    procs: list[provision.AppProcess] = []
    try:
        if "http" in transports:
            dsns.append(dsn := await ctx.pg.fresh_database("otelworker_bench"))
            durable = _durable_process(ctx, dsn, "ingest-service.log")
            procs.append(durable)
            trees = {"service": durable.pid, "postgres": pg_pid}
            targets.append(Target("durable", durable, trees, dsn=dsn))
        if baseline:
            noop = provision.AppProcess("loadtest.noop_app:app", log_path=ctx.workdir / "noop.log")
            procs.append(noop)
            targets.append(Target("noop", noop, {"service": noop.pid, "postgres": pg_pid}))
        if "grpc" in transports:
            dsns.append(dsn := await ctx.pg.fresh_database("otelworker_bench_grpc"))
            http_port, grpc_port = provision.free_ports(2)
            grpc_proc = _durable_process(ctx, dsn, "ingest-grpc-service.log", grpc_port, http_port)
            procs.append(grpc_proc)
            trees = {"service": grpc_proc.pid, "postgres": pg_pid}
            targets.append(Target("grpc", grpc_proc, trees, dsn=dsn, grpc_port=grpc_port))
        with _processes(*procs):
            for proc in procs:
                await proc.wait_ready_async()
            names = {"durable": "durable (HTTP)", "grpc": "durable (gRPC)", "noop": "no-op"}
            title = " vs ".join(names[t.name] for t in targets)
            if len(targets) > 1:
                title += ", " + "/".join("ABC"[: len(targets)]) + " alternating"
            grpc_note = f" (gRPC: {args.grpc_channels} channels)" if "grpc" in transports else ""
            _say(
                f"ingest: {title}; {args.spans}-span protobuf requests, concurrency "
                f"{args.concurrency}{grpc_note}, warm-up {args.warmup} s, "
                f"{args.rounds} x {args.duration} s"
            )
            verification, runs = await _ingest_runs(ctx, targets)
    finally:
        for dsn in dsns:
            await ctx.pg.drop_database(dsn)

    out: dict[str, Any] = {
        "role": "ingress",
        "concurrency": args.concurrency,
        "spans_per_request": args.spans,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "transports": list(transports),
    }
    if "http" in transports:
        out["durable"] = _summarise([r for r in runs if r["target"] == "durable"])
    if "grpc" in transports:
        out["grpc"] = _summarise([r for r in runs if r["target"] == "grpc"])
        out["grpc"]["channels"] = args.grpc_channels
    out["verification"] = verification
    out["runs"] = runs
    if baseline:
        out["noop"] = _summarise([r for r in runs if r["target"] == "noop"])
        if "http" in transports:
            out["ratio_per_round"] = _per_round(runs, "durable")
            out["ratio"] = round(out["durable"]["req_per_s"] / out["noop"]["req_per_s"], 3)
            out["target"] = INGEST_TARGET
            out["met"] = out["ratio"] >= INGEST_TARGET
        if "grpc" in transports:
            out["grpc_ratio_per_round"] = _per_round(runs, "grpc")
            out["grpc_ratio"] = round(out["grpc"]["req_per_s"] / out["noop"]["req_per_s"], 3)
    return out


def ingest_spans_per_s(ingest: dict[str, Any]) -> float:
    """The drain ratio's reference: durable HTTP ingest, else gRPC when HTTP was skipped."""
    row = ingest.get("durable") or ingest["grpc"]
    return float(row["spans_per_s"])


def _row_line(title: str, row: dict[str, Any]) -> str:
    return (
        f"{title}: {_fmt(row['req_per_s'])} req/s ({_fmt(row['spans_per_s'], 0)} spans/s), "
        f"p50 {_fmt(row['p50_ms'])} ms, p99 {_fmt(row['p99_ms'])} ms (median of {row['runs']} "
        f"runs); service {row['service_cpu_us_per_request']} us CPU/request"
    )


def _print_ingest(result: dict[str, Any]) -> None:
    _say()
    if "durable" in result:
        _say(_row_line("durable ingest ", result["durable"]))
    if "grpc" in result:
        _say(_row_line("durable gRPC   ", result["grpc"]))
    if "noop" in result:
        _say(_row_line("no-op baseline ", result["noop"]))
    if "ratio" in result:
        verdict = "met" if result["met"] else "MISSED"
        _say(
            f"ratio durable/no-op: {result['ratio']:.2f}x (per round "
            f"{', '.join(f'{r:.2f}' for r in result['ratio_per_round'])}; "
            f"target >= {INGEST_TARGET}x: {verdict})"
        )
    if "grpc_ratio" in result:
        _say(
            f"ratio gRPC/no-op   : {result['grpc_ratio']:.2f}x (per round "
            f"{', '.join(f'{r:.2f}' for r in result['grpc_ratio_per_round'])}; the no-op is "
            "HTTP; for comparison, not a target)"
        )
    v = result["verification"]
    for name, what in (("durable", "200"), ("grpc", "OK")):
        checks = [c for c in v["runs"] if c.get("target", "durable") == name]
        if not checks:
            continue
        acked = sum(c["acknowledged_200"] for c in checks)
        rows = sum(c["rows"] for c in checks)
        ok = all(c["ok"] for c in checks)
        verdict = "OK" if ok else "FAILED: an acknowledged request has no row"
        title = "durable claim  " if name == "durable" else "gRPC claim     "
        _say(
            f"{title}: {rows:,} rows staged for {acked:,} acknowledged ({what}) requests "
            f"over {len(checks)} runs: {verdict}"
        )


# --- drain -------------------------------------------------------------------------------


async def prefill(dsn: str, items: int, spans: int, chunk: int = 1000) -> float:
    """COPY ``items`` trace payloads of ``spans`` spans into the queue; returns seconds.

    Staged as the door stages them (migration 0003): gzip at the default level, with the
    facts the flush needs, so the drain measures what it does for real traffic.
    """
    from otelworker import otlp
    from otelworker.compression import compress
    from otelworker.settings import Compression
    from otelworker.staging.database import migrate

    factory = TraceRequestFactory(spans)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        started = time.monotonic()
        left = items
        while left > 0:
            n = min(chunk, left)
            records = []
            for _ in range(n):
                raw = factory.make()
                message = otlp.decode("traces", raw)
                low, high = otlp.time_range("traces", message) or (None, None)
                names = sorted(otlp.service_names("traces", message))
                stored = compress(raw, Compression.GZIP, 1)
                records.append(("traces", stored, spans, "gzip", len(raw), low, high, names))
            await conn.copy_records_to_table(
                "ingestion_queue",
                records=records,
                columns=[
                    "signal",
                    "payload",
                    "record_count",
                    "payload_encoding",
                    "raw_bytes",
                    "min_time_ns",
                    "max_time_ns",
                    "service_names",
                ],
            )
            left -= n
        await conn.execute("ANALYZE ingestion_queue")
        return time.monotonic() - started
    finally:
        await conn.close()


async def _wait_drained(dsn: str, limit_s: float, on_poll: Callable[[int], None]) -> int:
    """Poll until no row is pending, processing or failed; returns dead rows left."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + limit_s
        while True:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status <> 'dead') AS live,"
                " count(*) FILTER (WHERE status = 'dead') AS dead FROM ingestion_queue"
            )
            on_poll(int(row["live"]))
            if row["live"] == 0:
                return int(row["dead"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not drained within {limit_s} s ({row['live']} left)")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def bench_drain(ctx: Context, ingest_spans_per_s: float) -> dict[str, Any]:
    args = ctx.args
    s3 = await asyncio.to_thread(ctx.s3)
    bucket = await asyncio.to_thread(s3.create_bucket, "otelworker-bench")
    dsn = await ctx.pg.fresh_database("otelworker_bench")
    try:
        _say(f"drain: pre-filling {args.items:,} items of {args.spans} spans (COPY)")
        fill_s = await prefill(dsn, args.items, args.spans)
        _say(f"  pre-filled in {fill_s:.1f} s; starting the service: ROLE=worker, S3 {s3.source}")
        quiet = await settle(args.settle, args.settle_cores) if args.settle > 0 else None
        settings = {"DATABASE_URL": dsn, "ROLE": "worker", "LOG_LEVEL": "INFO"}
        settings.update(s3.service_env(bucket))
        worker = provision.AppProcess(
            "otelworker.app:app", settings=settings, log_path=ctx.workdir / "drain-service.log"
        )
        meter = CpuMeter(
            {
                "service": worker.pid,
                "postgres": ctx.pg.postmaster_pid(),
                # moto's server threads live in this process
                "bench_and_s3": os.getpid() if s3.source == "moto" else None,
            },
            alone=frozenset({"bench_and_s3"}),
        )
        with _processes(worker):
            await worker.wait_ready_async()
            ready_wall = time.time()
            meter.start()
            progress: list[tuple[float, int]] = []
            dead = await _wait_drained(
                dsn,
                limit_s=max(600.0, args.items / 20),
                on_poll=lambda live: progress.append((time.time() - ready_wall, live)),
            )
            cpu = meter.stop()
            seen_empty_wall = time.time()
            if quiet is not None:
                cpu["settle"] = quiet
        manifest = await _manifest_facts(dsn)
        objects = await asyncio.to_thread(_count_objects, s3, bucket)
    finally:
        await ctx.pg.drop_database(dsn)
        if s3.source == "env":
            await asyncio.to_thread(s3.delete_bucket, bucket)

    # The drain ends at the last manifest commit (the DB clock is this machine's clock).
    last = manifest["last_created_at"]
    end_wall = last.timestamp() if last is not None else seen_empty_wall
    elapsed = max(end_wall - ready_wall, 1e-6)
    spans = manifest["records"]
    rate = spans / elapsed
    if cpu.get("service_cores") is not None and manifest["items"]:
        per_item = cpu["service_cores"] * cpu["wall_s"] / manifest["items"]
        cpu["service_cpu_us_per_item"] = round(per_item * 1e6)
    ratio = rate / ingest_spans_per_s if ingest_spans_per_s else float("nan")
    expected_spans = args.items * args.spans
    ok = (
        manifest["items"] == args.items
        and spans == expected_spans
        and dead == 0
        and objects == manifest["batches"]
    )
    return {
        "items": args.items,
        "spans_per_item": args.spans,
        "prefill_s": round(fill_s, 2),
        "elapsed_s": round(elapsed, 3),
        "spans_per_s": round(rate, 0),
        "items_per_s": round(manifest["items"] / elapsed, 1),
        "batches": manifest["batches"],
        "mean_items_per_batch": round(manifest["items"] / max(manifest["batches"], 1), 2),
        "compressed_mib": round(manifest["compressed_bytes"] / 2**20, 1),
        "raw_mib": round(manifest["raw_bytes"] / 2**20, 1),
        "objects_in_bucket": objects,
        "dead_rows": dead,
        "s3": s3.source,
        "cpu": cpu,
        "progress": [(round(t, 2), n) for t, n in progress[:: max(1, len(progress) // 50)]],
        "verification": {
            "ok": ok,
            "manifest_items": manifest["items"],
            "manifest_spans": spans,
            "expected_spans": expected_spans,
        },
        "ingest_spans_per_s": round(ingest_spans_per_s, 0),
        "ratio": round(ratio, 3),
        "target": DRAIN_TARGET,
        "met": ratio >= DRAIN_TARGET,
    }


async def _manifest_facts(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS batches, coalesce(sum(item_count), 0) AS items,"
            " coalesce(sum(record_count), 0) AS records,"
            " coalesce(sum(compressed_bytes), 0) AS compressed_bytes,"
            " coalesce(sum(raw_bytes), 0) AS raw_bytes, max(created_at) AS last_created_at"
            " FROM export_batches"
        )
        facts = {k: int(v) for k, v in row.items() if k != "last_created_at"}
        facts["last_created_at"] = row["last_created_at"]
        return facts
    finally:
        await conn.close()


def _count_objects(s3: provision.S3Handle, bucket: str) -> int:
    paginator = s3.client().get_paginator("list_objects_v2")
    return sum(page.get("KeyCount", 0) for page in paginator.paginate(Bucket=bucket))


def _print_drain(result: dict[str, Any]) -> None:
    v = result["verification"]
    _say(
        f"drain          : {_fmt(result['spans_per_s'], 0)} spans/s ({_fmt(result['items_per_s'])}"
        f" items/s), {result['items']:,} items in {result['elapsed_s']:.1f} s, "
        f"{result['batches']:,} objects of {result['mean_items_per_batch']} items "
        f"({result['raw_mib']} MiB -> {result['compressed_mib']} MiB)  {_cpu_text(result['cpu'])}"
    )
    _say(
        f"drain check    : manifest {v['manifest_spans']:,} spans / {v['manifest_items']:,} items"
        f" (expected {v['expected_spans']:,}), {result['objects_in_bucket']:,} objects, "
        f"{result['dead_rows']} dead: {'OK' if v['ok'] else 'FAILED'}"
    )
    verdict = "met" if result["met"] else "MISSED"
    _say(
        f"ratio drain/ingest: {result['ratio']:.2f}x ({_fmt(result['spans_per_s'], 0)} / "
        f"{_fmt(result['ingest_spans_per_s'], 0)} spans/s; target >= {DRAIN_TARGET}x: {verdict})"
    )


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", nargs="?", default="all", choices=["ingest", "drain", "all"])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per timed run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up per target")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per target (A/B/A/B)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--transports",
        metavar="LIST",
        help="durable ingest rows to measure, comma-separated from http,grpc (default: both; "
        "under `drain` alone: http, the drain ratio's reference)",
    )
    parser.add_argument(
        "--grpc-channels",
        type=int,
        default=4,
        metavar="N",
        help="gRPC row: channels (connections) the concurrent calls share (default 4)",
    )
    parser.add_argument("--spans", type=int, default=100, help="spans per request / item")
    parser.add_argument("--items", type=int, default=20_000, help="drain: items pre-filled")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument(
        "--settle",
        type=float,
        default=20.0,
        help="before each timed run, wait up to this many seconds for the machine to go "
        "quiet (0: do not wait)",
    )
    parser.add_argument(
        "--settle-cores",
        type=float,
        default=0.3,
        help="'quiet': other work below this many cores over one second",
    )
    parser.add_argument(
        "--workdir", help="service logs and the embedded PostgreSQL (default: a temp dir)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is missed (not only on loss)"
    )
    args = parser.parse_args(argv)
    default = "http" if args.command == "drain" else "http,grpc"
    chosen = [t.strip() for t in (args.transports or default).split(",") if t.strip()]
    unknown = sorted(set(chosen) - {"http", "grpc"})
    if unknown or not chosen:
        parser.error(f"--transports takes http, grpc or both, not {args.transports!r}")
    args.transports = tuple(t for t in ("http", "grpc") if t in chosen)
    if args.grpc_channels < 1:
        parser.error("--grpc-channels must be at least 1")
    return args


async def amain(args: argparse.Namespace, workdir: Path) -> int:
    results: dict[str, Any] = {
        "command": "python -m loadtest.bench " + shlex.join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    _say(f"machine: {json.dumps(results['machine'])}; logs in {workdir}")
    pg = await asyncio.to_thread(provision.start_postgres, workdir)
    ctx = Context(args, workdir, pg, results)
    results["postgres"] = pg.source
    ok = True
    try:
        ingest: dict[str, Any] | None = None
        if args.command in ("ingest", "all"):
            ingest = await bench_ingest(ctx, baseline=True, transports=args.transports)
            results["ingest"] = ingest
            _print_ingest(ingest)
            ok = ok and ingest["verification"]["ok"]
            if args.strict and not ingest.get("met", True):
                ok = False
        if args.command in ("drain", "all"):
            if ingest is None:
                ingest = await bench_ingest(ctx, baseline=False, transports=args.transports)
                results["ingest"] = ingest
                _print_ingest(ingest)
                ok = ok and ingest["verification"]["ok"]
            _say()
            drain = await bench_drain(ctx, ingest_spans_per_s(ingest))
            results["drain"] = drain
            _print_drain(drain)
            ok = ok and drain["verification"]["ok"]
            if args.strict and not drain["met"]:
                ok = False
    finally:
        await asyncio.to_thread(ctx.close)
        results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        if args.json:
            text = json.dumps(results, indent=2, default=str) + "\n"
            await asyncio.to_thread(Path(args.json).write_text, text)
            _say(f"figures written to {args.json}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="otelworker-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(amain(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
