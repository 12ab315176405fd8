"""Benchmarks: durable ingest beside a no-op baseline and a peer, drain against ingest, soak.

    python -m loadtest.bench ingest   # every row at every size; targets printed with ratios
    python -m loadtest.bench drain    # drain spans/s vs durable ingest spans/s: target >= 1.5x
    python -m loadtest.bench all      # both (the default; `make bench`)
    python -m loadtest.bench soak     # ROLE=all at a steady load, per-minute figures (`make soak`)
    python -m loadtest.bench forward  # ROLE=all with one destination vs without (bench_forward)
    python -m loadtest.bench compact  # OTLP objects to Parquet, its size, a query (bench_compact)
    python -m loadtest.bench all --json bench.json --duration 15 --rounds 2 --items 20000
    python -m loadtest.bench ingest --duration 5 --rounds 1 --sizes 100   # quick, one size
    python -m loadtest.bench ingest --rows durable,noop,rotel --sizes 512
    python -m loadtest.bench ingest --transports http   # skip the gRPC row
    python -m loadtest.bench soak --minutes 10 --connections 8 --spans 100

**ingest** starts PostgreSQL (see :mod:`loadtest.provision`) and every row's server as a
real process on a local port, then sends each the same load from a separate
load-generator process (:mod:`loadtest.loadgen`: prebuilt OTLP/protobuf requests,
``--concurrency`` keep-alive connections, closed loop). The rows (``--rows``, default all
but ``all_2p``):

- ``durable``: ``python -m otelworker serve`` (uvicorn + httptools + uvloop; every
  otelworker row is served so, ``SERVICE_ENTRY``), ROLE=ingress, the backlog cap lifted
  (nothing drains; the 429 path is the stress harness's);
- ``noop``: a no-op Starlette endpoint on hypercorn (:mod:`loadtest.noop_app`), the
  yardstick every 1-process ratio is taken to;
- ``noop_uv``: the same no-op on uvicorn + httptools + uvloop, serve's server: each
  1-process row's ratio to it is printed beside (what durability costs on that server);
- ``grpc``: a second ROLE=ingress process with GRPC_ENABLED=true (its own database) taking
  the same requests over OTLP/gRPC (``concurrency`` calls in flight over
  ``--grpc-channels`` channels), at the first traces size only; its ratio is to the no-op
  HTTP baseline;
- ``all``: ROLE=all, the way most users run it: ingest and drain on the same cores to an
  S3 server (moto's, as the drain benchmark uses, unless S3_ENDPOINT_URL is set), with the
  DEFAULT ``STAGING_MAX_BACKLOG``, so a drain that cannot keep up shows as 429s (only 200s
  count as throughput);
- ``rotel``: rotel (``rotel-agent start --exporter blackhole``, from the ``rotel`` wheel)
  with its OTLP/HTTP receiver on a local port: a collector that keeps nothing, the peer a
  user would weigh us against, not a pass mark;
- ``noop_2p`` and ``durable_2p``: the no-op under ``hypercorn -w 2`` and ROLE=ingress
  under ``serve --processes 2``, the 2-process ratio taken to the 2-process no-op; ``all_2p``
  (ROLE=all, ``-w 2``) on request.

Request sizes (``--sizes``, default ``100,512,logs8192``): 100-span and 512-span trace
requests (26 KB and 130 KB) and a logs request of 8,192 records (1.8 MB, the Collector's
default batch). For each size every row is warmed up, then the timed runs alternate
(A/B/C/.../A/B/C/...) so that drift on a shared machine falls on all rows.

After every run of a durable row the rows in ``ingestion_queue`` are counted against the
acknowledgements the generator saw (200, or OK: the durable claim), then truncated so
that every run starts from the same table. After every ``all`` run the benchmark waits
until the queue is drained and checks that the manifest (``export_batches``) gained at
least the records acknowledged and that no row went dead.

During every timed window the CPU time of each process (service, PostgreSQL, load
generator, the rest of the machine) is sampled, and PostgreSQL's WAL position
(``pg_current_wal_insert_lsn()``) is read at both ends. Each row reports req/s,
spans (records)/s, p50/p99, **CPU microseconds per span of the service plus PostgreSQL**
(for ``all`` from the start of the window until the queue is drained, so the drain of
what the window acknowledged is paid for), and **WAL bytes written per span** (for
``all`` also until drained). ``pg_stat_wal.wal_bytes`` exists on the embedded
PostgreSQL 16, but each backend flushes its WAL counters to it only when idle and at
most every 1-10 s, so over an 8-second window it lags; the LSN difference is exact.

**drain** fills ``ingestion_queue`` with N items of 100 spans (COPY, not HTTP), starts
the service with ROLE=worker and an S3 server (moto's unless S3_ENDPOINT_URL is set),
and measures spans/s from readiness until the queue is empty; then checks the manifest
(``export_batches``) and the bucket against what was staged. Its ratio is to durable
ingest spans/s measured in the same run (by the ingest benchmark under ``all``, by a
durable-only ingest run under ``drain``; the HTTP row, or the gRPC row when
``--transports grpc`` left HTTP out).

**soak** runs ROLE=all (default backlog, S3 as above) at a steady ``--connections``
closed-loop connections of ``--spans``-span requests for ``--minutes`` and prints per
minute: acked req/s, p50, p99, live rows in ``ingestion_queue``, its on-disk size
(``pg_total_relation_size``, partitions included), dead tuples (``n_dead_tup``), the
service's RSS. Then the targets: every minute's p99 <= 5x its p50; on-disk queue <= 256 MB;
every minute's acked rate within 10 % of the first minute's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import psutil

from loadtest import provision
from loadtest.loadgen import LoadResult, LoadSpec, run_in_subprocess
from loadtest.payloads import TraceRequestFactory

INGEST_TARGET = 0.9
DRAIN_TARGET = 1.5
# With ROLE=ingress nothing drains the queue; the default cap (1000 items) would turn
# the benchmark into a test of the 429 path. The overflow path is the stress harness's.
NO_BACKLOG_CAP = "1000000000"
DEFAULT_SIZES = "100,512,logs8192"
# The throughput issue's targets: (row, size, reference row, ratio, what).
# Issue 22's: every otelworker row under `serve` (uvicorn + httptools + uvloop), the
# hypercorn Starlette no-op still the yardstick; the 512-span ROLE=all row also >= rotel.
TARGETS = (
    ("durable", "100", "noop", 0.9, "ROLE=ingress, 1 process, 100 spans"),
    ("all", "100", "noop", 0.6, "ROLE=all, 1 process, 100 spans"),
    ("all", "512", "noop", 0.45, "ROLE=all, 1 process, 512 spans"),
)
# Rows whose req/s must also reach rotel's (row, size): reported with the targets.
ROTEL_TARGETS = (("all", "512"),)
# How every otelworker row is served: `python -m otelworker serve` (provision.AppProcess).
SERVICE_ENTRY = "serve"
# The soak's targets.
SOAK_P99_OVER_P50 = 5.0
SOAK_MAX_QUEUE_BYTES = 256 * 10**6
SOAK_RATE_TOLERANCE = 0.10


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
        # The CPU seconds themselves: per-span figures divide these, not the rounded cores.
        report["cpu_s"] = {n: None if v is None else round(v, 4) for n, v in used.items()}
        # How the service's CPU fell on its processes (hypercorn -w N: is the load spread?)
        pid = self.trees.get("service")
        if pid is not None and wall > 0:
            before = self._start.get("service", {})
            split = [
                round((v - before.get(p, 0.0)) / wall, 2)
                for p, v in _tree_cpu(pid).items()
                if v - before.get(p, 0.0) > 0.01 * wall
            ]
            if len(split) > 1:
                report["service_split"] = sorted(split, reverse=True)
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
    if cpu.get("service_split"):
        text += f" (service by process {'/'.join(f'{c:.2f}' for c in cpu['service_split'])})"
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


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class WalMeter:
    """WAL bytes PostgreSQL wrote over a window: ``pg_current_wal_insert_lsn()`` at each end.

    The whole server's WAL (every database; the other rows' servers are idle while one
    row runs). ``pg_stat_wal.wal_bytes`` is the same quantity, but each backend adds its
    share there only when it goes idle and at most once a second (up to 10 s late), so
    it lags a short window; the LSN difference does not.
    """

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self._conn: asyncpg.Connection | None = None
        self._start = 0

    async def _position(self) -> int:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.admin_dsn)
        return _lsn(await self._conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))

    async def start(self) -> None:
        self._start = await self._position()

    async def stop(self) -> int:
        return await self._position() - self._start

    async def stat_wal_available(self) -> bool:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.admin_dsn)
        try:
            await self._conn.fetchval("SELECT wal_bytes FROM pg_stat_wal")
            return True
        except asyncpg.PostgresError:
            return False

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _budget(rate: float, duration: float, concurrency: int) -> int:
    """Requests the run may send at most: well above what the warm-up rate needs.

    Only a bound: the generator prebuilds at most ``--pool-mib`` of distinct bodies and
    sends them in turn when the run needs more (large requests, fast rows)."""
    return int(max(rate * duration * 4, duration * 20_000)) + concurrency


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
    text = (
        f"  {kind:<10} {label:<9} {_fmt(result.ok_per_s):>9} req/s {_fmt(result.spans_per_s, 0):>9}"
        f" spans/s  p50 {_fmt(result.p50_ms):>6} ms  p99 {_fmt(result.p99_ms):>6} ms"
        f"  statuses {result.statuses}  {_cpu_text(cpu)}"
    )
    if cpu.get("cpu_us_per_span") is not None:
        text += f"; svc+pg {cpu['cpu_us_per_span']:.2f} us CPU/span"
    if cpu.get("wal_bytes_per_span") is not None:
        text += f"; WAL {cpu['wal_bytes_per_span']:.1f} B/span"
    return text


# --- sizes and rows ---------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A request size: ``100`` (100-span trace requests), ``logs8192`` (8,192 log records)."""

    key: str
    signal: str  # "traces" or "logs"
    records: int

    @property
    def path(self) -> str:
        return f"/v1/{self.signal}"

    @property
    def unit(self) -> str:
        return "records" if self.signal == "logs" else "spans"

    @property
    def title(self) -> str:
        what = "log records" if self.signal == "logs" else "spans"
        return f"{self.records:,} {what} per request"


def parse_size(text: str) -> Size:
    match = re.fullmatch(r"(logs|traces)?(\d+)", text.strip().lower())
    if not match or int(match.group(2)) < 1:
        raise ValueError(f"a size is N (spans), tracesN or logsN, not {text!r}")
    signal = match.group(1) or "traces"
    records = int(match.group(2))
    return Size(f"logs{records}" if signal == "logs" else str(records), signal, records)


ROW_ORDER = (
    "durable",
    "durable_base",
    "noop",
    "noop_uv",
    "grpc",
    "all",
    "all_base",
    "rotel",
    "noop_2p",
    "durable_2p",
    "all_2p",
)
DEFAULT_ROWS = ("durable", "noop", "noop_uv", "grpc", "all", "rotel", "noop_2p", "durable_2p")
ROW_ALIASES = {
    "ingress": "durable",
    "http": "durable",
    "noop1": "noop",
    "noop_serve": "noop_uv",
    "uvicorn": "noop_uv",
    "noop2": "noop_2p",
    "ingress2": "durable_2p",
    "durable2": "durable_2p",
    "all2": "all_2p",
}
ROW_TITLES = {
    "durable": "ROLE=ingress (HTTP)",
    "durable_base": "ROLE=ingress, base tree",
    "noop": "no-op",
    "noop_uv": "no-op, uvicorn",
    "grpc": "ROLE=ingress (gRPC)",
    "all": "ROLE=all (+S3)",
    "all_base": "ROLE=all, base tree",
    "rotel": "rotel (blackhole)",
    "noop_2p": "no-op, 2 proc",
    "durable_2p": "ROLE=ingress, 2 proc",
    "all_2p": "ROLE=all, 2 proc",
}
# Which rows count staged rows after a run (``ingress``), or wait for the drain and check
# the manifest (``all``).
ROW_KIND = {
    "durable": "ingress",
    "durable_base": "ingress",
    "grpc": "ingress",
    "durable_2p": "ingress",
    "all": "all",
    "all_base": "all",
    "all_2p": "all",
    "noop": "baseline",
    "noop_uv": "baseline",
    "noop_2p": "baseline",
    "rotel": "peer",
}
# Every ratio's yardstick: 1-process rows to the 1-process no-op, 2-process to 2-process.
ROW_BASELINE = {name: ("noop_2p" if name.endswith("_2p") else "noop") for name in ROW_ORDER}
# The same rows beside the no-op on serve's own server (uvicorn + httptools + uvloop): what
# durability costs on it, the HTTP server's cost taken out.
SERVER_BASELINE = "noop_uv"


def parse_rows(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_ROWS
    chosen: set[str] = set()
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        name = ROW_ALIASES.get(name, name)
        if name not in ROW_ORDER:
            raise ValueError(f"unknown row {part!r} (rows: {', '.join(ROW_ORDER)})")
        chosen.add(name)
    return tuple(r for r in ROW_ORDER if r in chosen)


# --- ingest --------------------------------------------------------------------------------


class Served(Protocol):
    url: str

    @property
    def pid(self) -> int: ...

    async def wait_ready_async(self, limit_s: float = ...) -> None: ...

    def stop(self, timeout: float = ...) -> int: ...


@dataclass
class Target:
    name: str  # a row of ROW_ORDER: "durable", "noop", "grpc", "all", "rotel", ...
    process: Served
    trees: dict[str, int | None]
    dsn: str | None = None  # the durable rows' database (rows counted / drain checked)
    grpc_port: int | None = None
    alone: frozenset[str] = frozenset()
    rate_hint: dict[str, float] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    manifest_records: int = 0  # ROLE=all: records in export_batches before the next run

    @property
    def kind(self) -> str:
        return ROW_KIND[self.name]

    @property
    def transport(self) -> str:
        return "grpc" if self.grpc_port is not None else "http"

    def url(self, size: Size) -> str:
        if self.grpc_port is not None:
            return f"grpc://127.0.0.1:{self.grpc_port}"
        return f"{self.process.url}{size.path}"

    def serves(self, size: Size, first_traces: Size | None) -> bool:
        # The gRPC row at the first traces size only: it is there to compare transports.
        return self.name != "grpc" or size == first_traces


@contextlib.contextmanager
def _processes(*procs: Served) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()


async def _drained_manifest(target: Target, limit_s: float) -> dict[str, Any]:
    """ROLE=all: wait until no live row is left; the records the manifest gained."""
    assert target.dsn is not None
    started = time.monotonic()
    note = None
    try:
        dead = await _wait_drained(target.dsn, limit_s, lambda live: None)
    except TimeoutError as exc:
        note = str(exc)
        dead = -1
    facts = await _manifest_facts(target.dsn)
    gained = facts["records"] - target.manifest_records
    target.manifest_records = facts["records"]
    return {
        "drained_in_s": round(time.monotonic() - started, 2),
        "dead_rows": dead,
        "manifest_records_gained": gained,
        "note": note,
    }


def _per_span(cpu: dict[str, Any], records: int, wal_bytes: int) -> None:
    """Service + PostgreSQL CPU and WAL bytes per acknowledged span (record), in ``cpu``."""
    if records <= 0:
        return
    used = [cpu.get(f"{name}_cores") for name in ("service", "postgres")]
    if all(u is not None for u in used):
        seconds = sum(u for u in used if u is not None) * cpu["wall_s"]
        cpu["cpu_us_per_span"] = round(seconds / records * 1e6, 3)
    cpu["wal_bytes"] = wal_bytes
    cpu["wal_bytes_per_span"] = round(wal_bytes / records, 2)


async def _one_run(
    ctx: Context, target: Target, size: Size, label: str, duration: float, wal: WalMeter
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One timed (or warm-up) run of ``target`` at ``size``; its record and its check."""
    args = ctx.args
    spec = LoadSpec(
        url=target.url(size),
        concurrency=args.concurrency,
        duration_s=duration,
        max_requests=_budget(target.rate_hint.get(size.key, 1000.0), duration, args.concurrency),
        spans=size.records,
        label=f"{target.name}:{size.key}:{label}",
        transport=target.transport,
        channels=args.grpc_channels,
        signal=size.signal,
        pool_mib=args.pool_mib,
    )
    quiet = await settle(args.settle, args.settle_cores) if args.settle > 0 else None
    meter = CpuMeter(target.trees, alone=target.alone)

    async def on_timing() -> None:
        meter.start()
        await wal.start()

    result = await run_in_subprocess(spec, on_timing=on_timing)
    cpu = meter.stop(result.client_cpu_s)
    wal_bytes = await wal.stop()
    if quiet is not None:
        cpu["settle"] = quiet
    for name in ("service", "postgres"):
        cores = cpu.get(f"{name}_cores")
        if cores is not None and result.ok:
            cpu[f"{name}_cpu_us_per_request"] = round(cores * cpu["wall_s"] / result.ok * 1e6)
    acked_records = result.ok * size.records
    record: dict[str, Any] = {
        "target": target.name,
        "size": size.key,
        "run": label,
        **asdict(result),
        "cpu": cpu,
    }
    if result.ended_by == "requests":
        record["note"] = "request budget ran out before the duration; rate is still valid"
    check: dict[str, Any] | None = None
    if target.kind == "ingress" and target.dsn is not None:
        _per_span(cpu, acked_records, wal_bytes)
        rows, spans = await _count_staged(target.dsn)
        check = {
            "target": target.name,
            "size": size.key,
            "run": label,
            # an HTTP 200, or a gRPC OK (without partial_success)
            "acknowledged_200": result.ok,
            "rows": rows,
            "spans": spans,
            "expected_spans": acked_records,
            # Every 200 is a row. A request that timed out at the client may still
            # have committed, so rows may exceed the 200s; never fall short.
            "ok": rows >= result.ok and spans >= acked_records,
            "exact": rows == result.ok,
        }
        record["staged_rows"] = rows
        await _truncate(target.dsn)
    elif target.kind == "all":
        # The window's figures, then the same meters on until what it acknowledged is
        # exported: the CPU and WAL per span of ingest plus drain.
        record["cpu_window"] = dict(cpu)
        drained = await _drained_manifest(target, limit_s=args.drain_wait)
        full = meter.stop()
        wal_full = await wal.stop()
        for key in ("service_cores", "postgres_cores", "bench_and_s3_cores", "wall_s"):
            cpu[f"to_drained_{key}"] = full.get(key)
        # per span: service + PostgreSQL CPU from the window's start to the drained queue
        to_drained = {**full}
        _per_span(to_drained, acked_records, wal_full)
        cpu["cpu_us_per_span"] = to_drained.get("cpu_us_per_span")
        cpu["wal_bytes"] = wal_full
        cpu["wal_bytes_per_span"] = to_drained.get("wal_bytes_per_span")
        cpu["window_wal_bytes"] = wal_bytes
        gained = drained["manifest_records_gained"]
        check = {
            "target": target.name,
            "size": size.key,
            "run": label,
            "acknowledged_200": result.ok,
            "expected_spans": acked_records,
            "manifest_spans_gained": gained,
            "dead_rows": drained["dead_rows"],
            "drained_in_s": drained["drained_in_s"],
            # Every acknowledged record is exported (timed-out requests may add more).
            "ok": drained["note"] is None and drained["dead_rows"] == 0 and gained >= acked_records,
            "exact": gained == acked_records,
            "note": drained["note"],
        }
        record["drain_after"] = drained
    else:
        _per_span(cpu, acked_records, wal_bytes)
    if label == "warmup" and result.ok_per_s > 0:
        target.rate_hint[size.key] = result.ok_per_s
    _say(_run_line(target.name, label, result, cpu))
    return record, check


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str, scale: int | None = 2) -> float | None:
        values = [r["cpu"][key] for r in runs if r["cpu"].get(key) is not None]
        if not values:
            return None
        value = _median(values)
        return round(value) if scale is None else round(value, scale)

    statuses: dict[str, int] = {}
    for r in runs:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    p50 = [r["p50_ms"] for r in runs if r["p50_ms"] is not None]
    p99 = [r["p99_ms"] for r in runs if r["p99_ms"] is not None]
    return {
        "runs": len(runs),
        "req_per_s": round(_median([r["ok_per_s"] for r in runs]), 1),
        "spans_per_s": round(_median([r["spans_per_s"] for r in runs]), 0),
        "p50_ms": round(_median(p50), 2) if p50 else None,
        "p99_ms": round(_median(p99), 2) if p99 else None,
        "non_200": sum(r["requests"] - r["ok"] for r in runs),
        "statuses": dict(sorted(statuses.items())),
        "service_cpu_us_per_request": med("service_cpu_us_per_request", None),
        "postgres_cpu_us_per_request": med("postgres_cpu_us_per_request", None),
        "cpu_us_per_span": med("cpu_us_per_span", 3),
        "wal_bytes_per_span": med("wal_bytes_per_span", 2),
        "service_cores": med("service_cores"),
        "postgres_cores": med("postgres_cores"),
        "other_cores": round(_median([r["cpu"]["other_cores"] for r in runs]), 2),
        "body_bytes": runs[0]["body_bytes"] if runs else None,
        "service_split_per_run": [
            r["cpu"]["service_split"] for r in runs if r["cpu"].get("service_split")
        ],
    }


def _durable_settings(dsn: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "ROLE": "ingress",
        "STAGING_MAX_BACKLOG": NO_BACKLOG_CAP,
        "LOG_LEVEL": "INFO",
    }


def _durable_process(
    ctx: Context,
    dsn: str,
    log_name: str,
    grpc_port: int | None = None,
    port: int | None = None,
    processes: int = 1,
    cwd: str | None = None,
) -> provision.AppProcess:
    settings = _durable_settings(dsn)
    if grpc_port is not None:
        settings.update(provision.grpc_settings(grpc_port))
    extra = ["-w", str(processes)] if processes > 1 else None
    return provision.AppProcess(
        "otelworker.app:app",
        settings=settings,
        log_path=ctx.workdir / log_name,
        port=port,
        extra_args=extra,
        cwd=cwd,
        entry=SERVICE_ENTRY,
    )


def _per_round(runs: list[dict[str, Any]], name: str, reference: str = "noop") -> list[float]:
    """``name``'s req/s over ``reference``'s, round by round (warm-ups are not in ``runs``)."""
    mine = [r for r in runs if r["target"] == name]
    ref = [r for r in runs if r["target"] == reference]
    return [
        round(a["ok_per_s"] / b["ok_per_s"], 3)
        for a, b in zip(mine, ref, strict=False)
        if b["ok_per_s"]
    ]


async def _start_targets(
    ctx: Context, rows: tuple[str, ...], dsns: list[str], procs: list[Served]
) -> list[Target]:
    """Every row's server (not yet ready); databases in ``dsns``, processes in ``procs``."""
    pg_pid = ctx.pg.postmaster_pid()
    targets: list[Target] = []
    for name in rows:
        trees: dict[str, int | None]
        if name in ("durable", "durable_2p", "durable_base"):
            dsns.append(dsn := await ctx.pg.fresh_database("otelworker_bench"))
            n = 2 if name == "durable_2p" else 1
            log = {"durable": "ingest-service.log", "durable_2p": "ingest-2p-service.log"}.get(
                name, "ingest-base-service.log"
            )
            cwd = None
            if name == "durable_base":
                if not ctx.args.base_tree:
                    raise SystemExit("the durable_base row needs --base-tree PATH")
                cwd = ctx.args.base_tree  # its otelworker/ is imported first (sys.path[0])
            durable = _durable_process(ctx, dsn, log, processes=n, cwd=cwd)
            procs.append(durable)
            trees = {"service": durable.pid, "postgres": pg_pid}
            targets.append(Target(name, durable, trees, dsn=dsn))
        elif name in ("noop", "noop_2p"):
            n = 2 if name == "noop_2p" else 1
            noop = provision.AppProcess(
                "loadtest.noop_app:app",
                log_path=ctx.workdir / ("noop.log" if n == 1 else "noop-2p.log"),
                extra_args=["-w", "2"] if n > 1 else None,
            )
            procs.append(noop)
            targets.append(Target(name, noop, {"service": noop.pid, "postgres": pg_pid}))
        elif name == "noop_uv":
            # The same Starlette no-op on the server `serve` runs on.
            noop = provision.AppProcess(
                "loadtest.noop_app:app", log_path=ctx.workdir / "noop-uv.log", entry="uvicorn"
            )
            procs.append(noop)
            targets.append(Target(name, noop, {"service": noop.pid, "postgres": pg_pid}))
        elif name == "grpc":
            dsns.append(dsn := await ctx.pg.fresh_database("otelworker_bench_grpc"))
            http_port, grpc_port = provision.free_ports(2)
            grpc_proc = _durable_process(ctx, dsn, "ingest-grpc-service.log", grpc_port, http_port)
            procs.append(grpc_proc)
            trees = {"service": grpc_proc.pid, "postgres": pg_pid}
            targets.append(Target("grpc", grpc_proc, trees, dsn=dsn, grpc_port=grpc_port))
        elif name in ("all", "all_2p", "all_base"):
            s3 = await asyncio.to_thread(ctx.s3)
            base = name == "all_base"
            bucket = await asyncio.to_thread(
                s3.create_bucket, "otelworker-bench-all-base" if base else "otelworker-bench-all"
            )
            dsns.append(dsn := await ctx.pg.fresh_database("otelworker_bench_all"))
            n = 2 if name == "all_2p" else 1
            if base and not ctx.args.base_tree:
                raise SystemExit("the all_base row needs --base-tree PATH")
            # The default STAGING_MAX_BACKLOG: a drain that cannot keep up shows as 429s.
            settings = {"DATABASE_URL": dsn, "ROLE": "all", "LOG_LEVEL": "INFO"}
            settings.update(s3.service_env(bucket))
            proc = provision.AppProcess(
                "otelworker.app:app",
                settings=settings,
                log_path=ctx.workdir
                / (
                    "all-base-service.log"
                    if base
                    else "all-service.log"
                    if n == 1
                    else "all-2p-service.log"
                ),
                extra_args=["-w", "2"] if n > 1 else None,
                cwd=ctx.args.base_tree if base else None,
                entry=SERVICE_ENTRY,
            )
            procs.append(proc)
            trees = {
                "service": proc.pid,
                "postgres": pg_pid,
                # moto's server threads live in this process
                "bench_and_s3": os.getpid() if s3.source == "moto" else None,
            }
            targets.append(Target(name, proc, trees, dsn=dsn, alone=frozenset({"bench_and_s3"})))
        elif name == "rotel":
            binary = provision.rotel_binary()
            if binary is None:
                _say(
                    "rotel: no rotel-agent binary (pip install rotel, or ROTEL_AGENT=path); "
                    "row skipped"
                )
                continue
            rotel = provision.RotelProcess(binary, log_path=ctx.workdir / "rotel.log")
            procs.append(rotel)
            ctx.results.setdefault("peers", {})["rotel"] = {
                "binary": binary,
                "version": rotel.version(),
                "args": rotel.args,
            }
            targets.append(Target("rotel", rotel, {"service": rotel.pid, "postgres": pg_pid}))
    return targets


def _size_result(
    size: Size, names: list[str], runs: list[dict[str, Any]], checks: list[dict[str, Any]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"signal": size.signal, "records_per_request": size.records}
    out["rows"] = {n: _summarise([r for r in runs if r["target"] == n]) for n in names}
    ratios: dict[str, Any] = {}
    for name in names:
        row = out["rows"][name]
        entry: dict[str, Any] = {}
        base = ROW_BASELINE[name]
        if base in names and name != base:
            ref = out["rows"][base]["req_per_s"]
            entry["vs"] = base
            entry["ratio"] = round(row["req_per_s"] / ref, 3) if ref else None
            entry["per_round"] = _per_round(runs, name, base)
        if SERVER_BASELINE in names and base == "noop" and ROW_KIND[name] != "baseline":
            ref = out["rows"][SERVER_BASELINE]["req_per_s"]
            entry["vs_server_noop"] = round(row["req_per_s"] / ref, 3) if ref else None
            entry["per_round_server_noop"] = _per_round(runs, name, SERVER_BASELINE)
        if "rotel" in names and name != "rotel":
            ref = out["rows"]["rotel"]["req_per_s"]
            entry["vs_rotel"] = round(row["req_per_s"] / ref, 3) if ref else None
        if entry:
            ratios[name] = entry
    out["ratios"] = ratios
    out["verification"] = {"ok": all(c["ok"] for c in checks), "runs": checks}
    out["runs"] = runs
    return out


async def bench_ingest(
    ctx: Context,
    *,
    baseline: bool = True,
    transports: tuple[str, ...] = ("http", "grpc"),
    rows: tuple[str, ...] | None = None,
    sizes: list[Size] | None = None,
) -> dict[str, Any]:
    """Every row at every size, alternated within a size; legacy keys from the main size.

    ``baseline=False`` (``drain`` alone): the durable rows only, at ``--spans``.
    """
    args = ctx.args
    if sizes is None:
        sizes = [parse_size(str(args.spans))]
    if rows is None:
        rows = DEFAULT_ROWS
    picked = [r for r in rows if baseline or (ROW_KIND[r] == "ingress" and not r.endswith("_2p"))]
    if "http" not in transports:
        picked = [r for r in picked if r != "durable"]
    if "grpc" not in transports:
        picked = [r for r in picked if r != "grpc"]
    first_traces = next((s for s in sizes if s.signal == "traces"), None)
    dsns: list[str] = []
    procs: list[Served] = []
    wal = WalMeter(ctx.pg.admin_dsn)
    by_size: dict[str, dict[str, Any]] = {}
    try:
        targets = await _start_targets(ctx, tuple(picked), dsns, procs)
        with _processes(*procs):
            for proc in procs:
                await proc.wait_ready_async()
            ctx.results.setdefault("postgres_wal", {})[
                "pg_stat_wal"
            ] = await wal.stat_wal_available()
            for size in sizes:
                present = [t for t in targets if t.serves(size, first_traces)]
                if size.signal != "traces":
                    present = [t for t in present if t.transport == "http"]
                names = [t.name for t in present]
                title = " vs ".join(ROW_TITLES[n] for n in names)
                grpc_note = f" (gRPC: {args.grpc_channels} channels)" if "grpc" in names else ""
                _say(
                    f"\ningest [{size.key}]: {title}; {size.title} (protobuf), concurrency "
                    f"{args.concurrency}{grpc_note}, warm-up {args.warmup} s, {args.rounds} x "
                    f"{args.duration} s, alternating"
                )
                runs: list[dict[str, Any]] = []
                checks: list[dict[str, Any]] = []
                for target in present:
                    _rec, check = await _one_run(ctx, target, size, "warmup", args.warmup, wal)
                    if check is not None:
                        checks.append(check)
                for n in range(1, args.rounds + 1):
                    for target in present:
                        rec, check = await _one_run(
                            ctx, target, size, f"run{n}", args.duration, wal
                        )
                        runs.append(rec)
                        if check is not None:
                            checks.append(check)
                by_size[size.key] = _size_result(size, names, runs, checks)
                _print_size(size, by_size[size.key])
    finally:
        await wal.close()
        for dsn in dsns:
            await ctx.pg.drop_database(dsn)

    # The legacy keys (durable, noop, ratio, met, ...) are the --spans size's (100 unless
    # given); without it among the sizes, the first size's, and no legacy target.
    spans_size = next((s for s in sizes if s.key == str(args.spans)), None)
    main = spans_size or sizes[0]
    chosen = by_size[main.key]
    out: dict[str, Any] = {
        "role": "ingress",
        "concurrency": args.concurrency,
        "spans_per_request": main.records,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "transports": list(transports),
        "rows": picked,
        "main_size": main.key,
    }
    for name in ("durable", "grpc", "noop"):
        if name in chosen["rows"]:
            out[name] = chosen["rows"][name]
    if "grpc" in out:
        out["grpc"]["channels"] = args.grpc_channels
    every_check = [c for s in by_size.values() for c in s["verification"]["runs"]]
    out["verification"] = {"ok": all(c["ok"] for c in every_check), "runs": every_check}
    out["runs"] = chosen["runs"]
    if "noop" in chosen["rows"]:
        for name, prefix in (("durable", ""), ("grpc", "grpc_")):
            entry = chosen["ratios"].get(name)
            if entry is None or entry.get("ratio") is None:
                continue
            out[f"{prefix}ratio_per_round"] = entry["per_round"]
            out[f"{prefix}ratio"] = entry["ratio"]
        if "ratio" in out and spans_size is not None:
            out["target"] = INGEST_TARGET
            out["met"] = out["ratio"] >= INGEST_TARGET
    out["sizes"] = by_size
    out["targets"] = _targets(by_size)
    return out


def _targets(by_size: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for row, size, ref, want, what in TARGETS:
        ratios = by_size.get(size, {}).get("ratios", {}).get(row)
        if not ratios or ratios.get("vs") != ref or ratios.get("ratio") is None:
            continue
        rotel = ratios.get("vs_rotel")
        met = ratios["ratio"] >= want
        if (row, size) in ROTEL_TARGETS:
            met = met and rotel is not None and rotel >= 1.0
        found.append(
            {
                "what": what,
                "row": row,
                "size": size,
                "reference": ref,
                "target": want,
                "ratio": ratios["ratio"],
                "per_round": ratios["per_round"],
                "vs_rotel": rotel,
                "rotel_target": 1.0 if (row, size) in ROTEL_TARGETS else None,
                "vs_server_noop": ratios.get("vs_server_noop"),
                "met": met,
            }
        )
    return found


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


def _print_size(size: Size, result: dict[str, Any]) -> None:
    """One size's table: every row's medians, its ratios, its checks."""
    unit = size.unit
    _say()
    _say(
        f"[{size.key}] {size.title}; medians of "
        f"{result['rows'][next(iter(result['rows']))]['runs']} timed rounds"
    )
    head = (
        f"  {'row':<21} {'req/s':>9} {unit + '/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'non-200':>8} {'us CPU/' + unit[:-1]:>13} {'WAL B/' + unit[:-1]:>12} "
        f"{'vs no-op':>9} {'vs rotel':>9}"
    )
    _say(head)
    for name, row in result["rows"].items():
        ratio = result["ratios"].get(name, {})
        vs = "-"
        if ratio.get("ratio") is not None:
            vs = f"{ratio['ratio']:.2f}x" + ("²" if ratio.get("vs") == "noop_2p" else "")
        vs_rotel = f"{ratio['vs_rotel']:.2f}x" if ratio.get("vs_rotel") is not None else "-"
        _say(
            f"  {ROW_TITLES[name]:<21} {_fmt(row['req_per_s']):>9}"
            f" {_fmt(row['spans_per_s'], 0):>11}"
            f" {_fmt(row['p50_ms']):>8} {_fmt(row['p99_ms']):>8} {row['non_200']:>8,}"
            f" {_fmt(row['cpu_us_per_span'], 2):>13} {_fmt(row['wal_bytes_per_span'], 1):>12}"
            f" {vs:>9} {vs_rotel:>9}"
        )
    notes = []
    if any(r.get("vs") == "noop_2p" for r in result["ratios"].values()):
        notes.append("² to the 2-process no-op")
    cpu_note = "us CPU is service + PostgreSQL"
    if any(ROW_KIND[n] == "all" for n in result["rows"]):
        cpu_note += ", for ROLE=all until the queue is drained (WAL too)"
    notes += [cpu_note, "WAL is PostgreSQL's, all databases"]
    _say(f"  ({'; '.join(notes)})")
    for name in result["rows"]:
        if ROW_KIND[name] in ("baseline", "peer"):
            continue
        per = result["ratios"].get(name, {}).get("per_round")
        if per:
            ref = result["ratios"][name]["vs"]
            _say(f"  {name}/{ref} per round: {', '.join(f'{r:.2f}' for r in per)}")
        server = result["ratios"].get(name, {})
        if server.get("vs_server_noop") is not None:
            _say(
                f"  {name}/{SERVER_BASELINE}: {server['vs_server_noop']:.2f}x (per round "
                f"{', '.join(f'{r:.2f}' for r in server['per_round_server_noop'])})"
            )
    for name, row in result["rows"].items():
        if row.get("service_split_per_run") and name.endswith("_2p"):
            split = ", ".join("/".join(f"{c:.2f}" for c in s) for s in row["service_split_per_run"])
            _say(f"  {name} service cores by process, per run: {split}")
    _print_checks(result["verification"]["runs"], f"[{size.key}] ")


def _print_checks(checks: list[dict[str, Any]], prefix: str = "") -> None:
    for name in ROW_ORDER:
        mine = [c for c in checks if c.get("target", "durable") == name]
        if not mine:
            continue
        acked = sum(c["acknowledged_200"] for c in mine)
        ok = all(c["ok"] for c in mine)
        what = "OK" if name == "grpc" else "200"
        if ROW_KIND[name] == "all":
            gained = sum(c["manifest_spans_gained"] for c in mine)
            expected = sum(c["expected_spans"] for c in mine)
            dead = sum(max(0, c["dead_rows"]) for c in mine)
            notes = [c["note"] for c in mine if c.get("note")]
            verdict = "OK" if ok else "FAILED: an acknowledged record is not in the manifest"
            _say(
                f"{prefix}{name} claim: manifest gained {gained:,} records for {expected:,} "
                f"acknowledged over {len(mine)} runs, {dead} dead rows: {verdict}"
                + (f" ({'; '.join(notes)})" if notes else "")
            )
            continue
        rows = sum(c["rows"] for c in mine)
        verdict = "OK" if ok else "FAILED: an acknowledged request has no row"
        _say(
            f"{prefix}{name} claim: {rows:,} rows staged for {acked:,} acknowledged ({what}) "
            f"requests over {len(mine)} runs: {verdict}"
        )


def _print_ingest(result: dict[str, Any]) -> None:
    _say()
    _say(f"summary at {result['main_size']} (the drain's reference and the legacy figures):")
    if "durable" in result:
        _say(_row_line("durable ingest ", result["durable"]))
    if "grpc" in result:
        _say(_row_line("durable gRPC   ", result["grpc"]))
    if "noop" in result:
        _say(_row_line("no-op baseline ", result["noop"]))
    if "ratio" in result:
        verdict = "met" if result.get("met") else "MISSED"
        target = f"target >= {INGEST_TARGET}x: {verdict}" if "met" in result else "no target"
        _say(
            f"ratio durable/no-op: {result['ratio']:.2f}x (per round "
            f"{', '.join(f'{r:.2f}' for r in result['ratio_per_round'])}; {target})"
        )
    if "grpc_ratio" in result:
        _say(
            f"ratio gRPC/no-op   : {result['grpc_ratio']:.2f}x (per round "
            f"{', '.join(f'{r:.2f}' for r in result['grpc_ratio_per_round'])}; the no-op is "
            "HTTP; for comparison, not a target)"
        )
    checks = result["verification"]["runs"]
    for name, what in (("durable", "200"), ("grpc", "OK")):
        mine = [c for c in checks if c.get("target", "durable") == name]
        if not mine:
            continue
        acked = sum(c["acknowledged_200"] for c in mine)
        rows = sum(c["rows"] for c in mine)
        ok = all(c["ok"] for c in mine)
        verdict = "OK" if ok else "FAILED: an acknowledged request has no row"
        title = "durable claim  " if name == "durable" else "gRPC claim     "
        _say(
            f"{title}: {rows:,} rows staged for {acked:,} acknowledged ({what}) requests "
            f"over {len(mine)} runs, all sizes: {verdict}"
        )
    others = [c for c in checks if c.get("target") not in ("durable", "grpc")]
    if others:
        _print_checks(others)
    if result.get("targets"):
        _say()
        _say("targets (medians of alternated rounds, this run):")
    for t in result.get("targets", []):
        verdict = "met" if t["met"] else "MISSED"
        rotel = f"; {t['vs_rotel']:.2f}x rotel" if t.get("vs_rotel") is not None else ""
        if t.get("rotel_target"):
            rotel += f" (target >= {t['rotel_target']}x)"
        if t.get("vs_server_noop") is not None:
            rotel += f"; {t['vs_server_noop']:.2f}x the uvicorn no-op"
        _say(
            f"  {t['what']:<36}: {t['ratio']:.2f}x {t['reference']} (per round "
            f"{', '.join(f'{r:.2f}' for r in t['per_round'])}; target >= {t['target']}x: "
            f"{verdict}){rotel}"
        )
    sizes = result.get("sizes", {})
    peer = [
        (key, s["rows"]["rotel"], s["ratios"]) for key, s in sizes.items() if "rotel" in s["rows"]
    ]
    if peer:
        _say("rotel beside us (req/s; ours as a fraction of rotel's; a peer, not a pass mark):")
    for key, rotel, ratios in peer:
        ours = ", ".join(
            f"{name} {ratio['vs_rotel']:.2f}x"
            for name, ratio in ratios.items()
            if ratio.get("vs_rotel") is not None and not name.startswith("noop")
        )
        _say(
            f"  [{key}] rotel {_fmt(rotel['req_per_s'])} req/s, {_fmt(rotel['spans_per_s'], 0)}"
            f" /s, p50 {_fmt(rotel['p50_ms'])} ms, p99 {_fmt(rotel['p99_ms'])} ms, "
            f"{_fmt(rotel['cpu_us_per_span'], 2)} us CPU/span; {ours}"
        )


# --- drain -------------------------------------------------------------------------------


async def prefill(dsn: str, items: int, spans: int, chunk: int = 1000) -> float:
    """COPY ``items`` trace payloads of ``spans`` spans into the queue; returns seconds.

    Staged as the door stages them (migrations 0003, 0005): gzip at the default level, with
    the facts the flush needs and the stored bytes' checksum, so the drain measures what it
    does for real traffic.
    """
    from otelworker import otlp
    from otelworker.compression import checksum, compress
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
                stored = compress(raw, Compression.GZIP)
                records.append(
                    ("traces", stored, spans, "gzip", len(raw), low, high, names, checksum(stored))
                )
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
                    "payload_crc",
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
            "otelworker.app:app",
            settings=settings,
            log_path=ctx.workdir / "drain-service.log",
            entry=SERVICE_ENTRY,
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


# --- soak --------------------------------------------------------------------------------

# ingestion_queue and (if it is partitioned) its partitions: heap, TOAST and indexes.
QUEUE_FACTS = """
WITH parts AS (
    SELECT relid FROM pg_partition_tree('ingestion_queue')
    UNION SELECT 'ingestion_queue'::regclass
)
SELECT
    (SELECT count(*) FROM ingestion_queue) AS rows,
    (SELECT count(*) FROM ingestion_queue WHERE status <> 'dead') AS live,
    (SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM parts) AS disk_bytes,
    (SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables
        WHERE relid IN (SELECT relid FROM parts)) AS dead_tuples,
    (SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables
        WHERE relid IN (SELECT relid FROM parts)) AS autovacuums
"""


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (hypercorn's parent and workers)."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


async def bench_soak(ctx: Context) -> dict[str, Any]:
    """ROLE=all at a steady closed-loop load; per-interval figures; the soak's targets."""
    args = ctx.args
    s3 = await asyncio.to_thread(ctx.s3)
    bucket = await asyncio.to_thread(s3.create_bucket, "otelworker-soak")
    dsn = await ctx.pg.fresh_database("otelworker_soak")
    pg_pid = ctx.pg.postmaster_pid()
    settings = {"DATABASE_URL": dsn, "ROLE": "all", "LOG_LEVEL": "INFO"}
    settings.update(s3.service_env(bucket))
    service = provision.AppProcess(
        "otelworker.app:app",
        settings=settings,
        log_path=ctx.workdir / "soak-service.log",
        entry=SERVICE_ENTRY,
    )
    trees: dict[str, int | None] = {
        "service": service.pid,
        "postgres": pg_pid,
        "bench_and_s3": os.getpid() if s3.source == "moto" else None,
    }
    duration = args.minutes * 60.0
    spec = LoadSpec(
        url=f"{service.url}/v1/traces",
        concurrency=args.connections,
        duration_s=duration,
        spans=args.spans,
        label="soak",
        pool_mib=args.pool_mib,
        report_every_s=args.interval,
    )
    minutes: list[dict[str, Any]] = []
    wal = WalMeter(ctx.pg.admin_dsn)
    conn: asyncpg.Connection | None = None
    try:
        with _processes(service):
            await service.wait_ready_async()
            conn = await asyncpg.connect(dsn)
            _say(
                f"soak: ROLE=all (default STAGING_MAX_BACKLOG, S3 {s3.source}), "
                f"{args.connections} connections (closed loop), {args.spans}-span requests, "
                f"{args.minutes:g} min, a line every {args.interval:g} s"
            )
            meter = CpuMeter(trees, alone=frozenset({"bench_and_s3"}))

            async def on_timing() -> None:
                meter.start()
                await wal.start()

            async def on_interval(m: dict[str, Any]) -> None:
                assert conn is not None
                cpu = meter.stop()
                wal_bytes = await wal.stop()
                meter.start()
                await wal.start()
                facts = {k: int(v) for k, v in (await conn.fetchrow(QUEUE_FACTS)).items()}
                rss = _tree_rss(service.pid)
                line = {
                    **m,
                    **facts,
                    "service_rss_bytes": rss,
                    "service_cores": cpu.get("service_cores"),
                    "postgres_cores": cpu.get("postgres_cores"),
                    "bench_and_s3_cores": cpu.get("bench_and_s3_cores"),
                    "other_cores": cpu.get("other_cores"),
                    "wal_bytes": wal_bytes,
                }
                if m["ok"]:
                    seconds = sum(
                        (cpu.get(f"{k}_cores") or 0.0) * cpu["wall_s"]
                        for k in ("service", "postgres")
                    )
                    line["cpu_us_per_span"] = round(seconds / (m["ok"] * args.spans) * 1e6, 3)
                    line["wal_bytes_per_span"] = round(wal_bytes / (m["ok"] * args.spans), 1)
                minutes.append(line)
                others = {k: v for k, v in m["statuses"].items() if k != "200"}
                ratio = (
                    m["p99_ms"] / m["p50_ms"] if m["p50_ms"] and m["p99_ms"] is not None else None
                )
                _say(
                    f"  min {m['interval']:>2} (t={m['t_s']:>5.0f} s): "
                    f"{_fmt(m['ok_per_s']):>7} acked req/s"
                    f"{f' (non-200: {others})' if others else ''}, "
                    f"p50 {_fmt(m['p50_ms'])} ms, p99 {_fmt(m['p99_ms'])} ms "
                    f"(p99/p50 {_fmt(ratio)}), live rows {facts['live']:,}, queue on disk "
                    f"{_mb(facts['disk_bytes'])}, dead tuples {facts['dead_tuples']:,} "
                    f"(autovacuums {facts['autovacuums']}), service RSS {_mb(rss)}, cores: "
                    f"service {_fmt(cpu.get('service_cores'), 2)}, pg "
                    f"{_fmt(cpu.get('postgres_cores'), 2)}, moto+bench "
                    f"{_fmt(cpu.get('bench_and_s3_cores'), 2)}, other "
                    f"{_fmt(cpu.get('other_cores'), 2)}; WAL {_mb(wal_bytes)}"
                )

            result = await run_in_subprocess(spec, on_timing=on_timing, on_interval=on_interval)
            _say(
                f"  whole run: {_fmt(result.ok_per_s)} acked req/s, p50 {_fmt(result.p50_ms)} ms,"
                f" p99 {_fmt(result.p99_ms)} ms, max {_fmt(result.max_ms)} ms, statuses "
                f"{result.statuses}, errors {result.errors}"
            )
            started = time.monotonic()
            dead = await _wait_drained(dsn, args.drain_wait, lambda live: None)
            drained_s = time.monotonic() - started
            manifest = await _manifest_facts(dsn)
            end_facts = dict(await conn.fetchrow(QUEUE_FACTS))
    finally:
        if conn is not None:
            await conn.close()
        await wal.close()
        await ctx.pg.drop_database(dsn)
        if s3.source == "env":
            await asyncio.to_thread(s3.delete_bucket, bucket)

    acked_spans = result.ok * args.spans
    verification = {
        "ok": manifest["records"] >= acked_spans and dead == 0,
        "acknowledged_200": result.ok,
        "expected_spans": acked_spans,
        "manifest_spans": manifest["records"],
        "dead_rows": dead,
        "drained_in_s": round(drained_s, 2),
    }
    full = [m for m in minutes if m["t_s"] <= duration + 1e-6]
    targets = _soak_targets(full)
    return {
        "minutes": args.minutes,
        "connections": args.connections,
        "spans_per_request": args.spans,
        "interval_s": args.interval,
        "s3": s3.source,
        "result": asdict(result),
        "per_interval": minutes,
        "queue_after_drain": {k: int(v) for k, v in end_facts.items()},
        "verification": verification,
        "targets": targets,
    }


def _soak_targets(minutes: list[dict[str, Any]]) -> dict[str, Any]:
    if not minutes:
        return {"ok": False, "note": "no complete interval"}
    ratios = [
        (m["p99_ms"] / m["p50_ms"]) if m.get("p50_ms") and m.get("p99_ms") is not None else None
        for m in minutes
    ]
    worst_ratio = max((r for r in ratios if r is not None), default=float("nan"))
    stalls_ok = all(r is not None and r <= SOAK_P99_OVER_P50 for r in ratios)
    max_disk = max(m["disk_bytes"] for m in minutes)
    first = minutes[0]["ok_per_s"]
    drift = [abs(m["ok_per_s"] - first) / first if first else float("inf") for m in minutes]
    rate_ok = all(d <= SOAK_RATE_TOLERANCE for d in drift)
    return {
        "p99_within_5x_p50": {"met": stalls_ok, "worst_ratio": round(worst_ratio, 2)},
        "queue_on_disk_max_bytes": {"met": max_disk <= SOAK_MAX_QUEUE_BYTES, "max": max_disk},
        "rate_within_10pct_of_first": {
            "met": rate_ok,
            "first_ok_per_s": first,
            "worst_drift": round(max(drift), 3),
            "last_drift": round(drift[-1], 3),
        },
        "rss_bytes": {
            "first": minutes[0]["service_rss_bytes"],
            "last": minutes[-1]["service_rss_bytes"],
            "max": max(m["service_rss_bytes"] for m in minutes),
        },
        "ok": stalls_ok and max_disk <= SOAK_MAX_QUEUE_BYTES and rate_ok,
    }


def _print_soak(result: dict[str, Any]) -> None:
    v = result["verification"]
    t = result["targets"]
    _say()
    _say(
        f"soak check     : manifest {v['manifest_spans']:,} spans for {v['expected_spans']:,} "
        f"acknowledged ({v['acknowledged_200']:,} requests), {v['dead_rows']} dead rows, drained "
        f"{v['drained_in_s']} s after the load: {'OK' if v['ok'] else 'FAILED'}"
    )
    if "ok" in t and "p99_within_5x_p50" not in t:
        _say(f"soak targets   : {t.get('note')}")
        return

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    stall = t["p99_within_5x_p50"]
    disk = t["queue_on_disk_max_bytes"]
    rate = t["rate_within_10pct_of_first"]
    rss = t["rss_bytes"]
    _say(
        f"soak target    : every interval p99 <= {SOAK_P99_OVER_P50:g}x its p50: worst "
        f"{stall['worst_ratio']}x: {verdict(stall['met'])}"
    )
    _say(
        f"soak target    : queue on disk <= {_mb(SOAK_MAX_QUEUE_BYTES)}: max {_mb(disk['max'])}: "
        f"{verdict(disk['met'])}"
    )
    _say(
        f"soak target    : acked rate within {SOAK_RATE_TOLERANCE:.0%} of the first interval's "
        f"({_fmt(rate['first_ok_per_s'])} req/s): worst {rate['worst_drift']:.1%}, last "
        f"{rate['last_drift']:.1%}: {verdict(rate['met'])}"
    )
    _say(
        f"service RSS    : first {_mb(rss['first'])}, last {_mb(rss['last'])}, "
        f"max {_mb(rss['max'])}"
    )


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="all",
        choices=["ingest", "drain", "all", "soak", "forward", "compact"],
        help="`forward` alone: the forwarding rows only (loadtest/bench_forward.py)",
    )
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
        "--rows",
        metavar="LIST",
        help=f"ingest rows, comma-separated from {','.join(ROW_ORDER)} (aliases: ingress, "
        f"noop2, ingress2, all2; default: {','.join(DEFAULT_ROWS)})",
    )
    parser.add_argument(
        "--base-tree",
        metavar="PATH",
        help="the durable_base and all_base rows: ROLE=ingress / ROLE=all served from another "
        "checkout (e.g. `git worktree add /tmp/base HEAD~1`), beside `durable` / `all` in the "
        "same run: an A/B of a code change by CPU us per span",
    )
    parser.add_argument(
        "--sizes",
        metavar="LIST",
        help=f"ingest request sizes: N (N-span traces), tracesN or logsN (N log records); "
        f"default {DEFAULT_SIZES} (with --spans other than 100: that many spans)",
    )
    parser.add_argument(
        "--grpc-channels",
        type=int,
        default=4,
        metavar="N",
        help="gRPC row: channels (connections) the concurrent calls share (default 4)",
    )
    parser.add_argument(
        "--spans", type=int, default=100, help="spans per request / item (drain, soak)"
    )
    parser.add_argument("--items", type=int, default=20_000, help="drain: items pre-filled")
    parser.add_argument(
        "--pool-mib",
        type=float,
        default=256.0,
        help="prebuilt request bodies per run at most, MiB (sent in turn when a run needs more)",
    )
    parser.add_argument(
        "--drain-wait",
        type=float,
        default=300.0,
        help="ROLE=all rows and soak: seconds to wait for the queue to drain after a run",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: minutes of load")
    parser.add_argument(
        "--connections", type=int, default=8, help="soak: connections (closed loop)"
    )
    parser.add_argument(
        "--interval", type=float, default=60.0, help="soak: seconds per reported interval"
    )
    parser.add_argument(
        "--forward-sizes",
        default="100,512",
        metavar="LIST",
        help="forward: trace request sizes in spans (default 100,512)",
    )
    parser.add_argument(
        "--probe-interval-ms",
        type=float,
        default=50.0,
        help="forward: one ack-to-delivery probe request this often during each run",
    )
    parser.add_argument(
        "--forward-latency-concurrency",
        type=int,
        default=4,
        metavar="N",
        help="forward: connections of the paced run that measures latency at a sustained rate",
    )
    parser.add_argument(
        "--forward-gzip-members",
        choices=("one", "many"),
        help="forward: the destination's gzip_members (default: the destinations file's"
        " default, one)",
    )
    parser.add_argument(
        "--forward-many-row",
        action="store_true",
        help="forward: a third row in the same rounds, the destination with gzip_members:"
        " many (what the recompression to one member costs, A/B in one run)",
    )
    parser.add_argument(
        "--forward-receiver-decode",
        choices=("shallow", "full"),
        default="shallow",
        help="forward: the no-op receiver counts spans by a shallow decode (default) or by"
        " decoding every span (as before 2026-12-07: ~1 us per span more of the receiver's"
        " CPU on the cores the service is measured on)",
    )
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
    try:
        args.rows = parse_rows(args.rows)
        text = args.sizes or (DEFAULT_SIZES if args.spans == 100 else str(args.spans))
        sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if not sizes:
        parser.error("--sizes names no size")
    args.sizes = list(dict.fromkeys(sizes))
    if not args.rows:
        parser.error("--rows names no row")
    if args.minutes <= 0 or args.connections < 1 or args.interval <= 0:
        parser.error("--minutes, --connections and --interval must be positive")
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
        if args.command == "soak":
            soak = await bench_soak(ctx)
            results["soak"] = soak
            _print_soak(soak)
            ok = soak["verification"]["ok"]
            if args.strict and not soak["targets"].get("ok"):
                ok = False
            return 0 if ok else 1
        ingest: dict[str, Any] | None = None
        if args.command in ("ingest", "all"):
            ingest = await bench_ingest(
                ctx, baseline=True, transports=args.transports, rows=args.rows, sizes=args.sizes
            )
            results["ingest"] = ingest
            _print_ingest(ingest)
            ok = ok and ingest["verification"]["ok"]
            if args.strict and not all(t["met"] for t in ingest.get("targets", [])):
                ok = False
            if args.strict and not ingest.get("met", True):
                ok = False
        if args.command in ("drain", "all"):
            if ingest is None or not ({"durable", "grpc"} & set(ingest)):
                ingest = await bench_ingest(ctx, baseline=False, transports=args.transports)
                results.setdefault("ingest", ingest)
                _print_ingest(ingest)
                ok = ok and ingest["verification"]["ok"]
            _say()
            drain = await bench_drain(ctx, ingest_spans_per_s(ingest))
            results["drain"] = drain
            _print_drain(drain)
            ok = ok and drain["verification"]["ok"]
            if args.strict and not drain["met"]:
                ok = False
        if args.command in ("forward", "all"):
            from loadtest.bench_forward import bench_forward, print_forward

            _say()
            forward = await bench_forward(ctx)
            results["forward"] = forward
            print_forward(forward)
            ok = ok and forward["verification"]["ok"]
            if args.strict and not all(t["met"] for t in forward["targets"]):
                ok = False
        if args.command in ("compact", "all"):
            from loadtest.bench_compact import bench_compact, print_compact

            _say()
            # The baseline: ROLE=ingress's CPU per span at 512 spans measured in this run
            # (`all`), else the figure of the last full run (bench_compact's default).
            ingress_512 = (
                (results.get("ingest", {}).get("sizes", {}).get("512", {}).get("rows", {}))
                .get("durable", {})
                .get("cpu_us_per_span")
            )
            compact = await asyncio.to_thread(
                bench_compact, **({"ingress_us_per_span": ingress_512} if ingress_512 else {})
            )
            results["compact"] = compact
            print_compact(compact)
            if args.strict and not all(t["met"] for t in compact["targets"]):
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
