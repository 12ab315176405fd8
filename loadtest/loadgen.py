"""A low-overhead load generator: HTTP/1.1 on asyncio streams, or OTLP/gRPC on grpc.aio.

A fixed number of keep-alive connections each send one request after another (a
closed loop: concurrency N means N requests in flight). The run stops at a request
count or a duration, whichever comes first. Every request body is built before the
clock starts (see :mod:`loadtest.payloads`), and each request goes out as one
prebuilt buffer, so the client spends its time on sockets, not on protobuf. The
connections are opened before the clock too, one every ``connect_stagger_ms`` (5):
``hypercorn -w N`` shares one listening socket among its workers, and whichever worker
wakes first accepts every connection pending, so 32 connections opened at once all land
on one worker; opened apart, they spread over the workers (at random: the benchmark
prints each process's share of the CPU).

With ``--transport grpc`` (a ``grpc://host:port`` URL) the same bodies go to the
TraceService Export RPC as raw bytes: N calls in flight shared over ``--channels``
channels (one HTTP/2 connection each); an answer counts as the HTTP status it is the
analogue of (:mod:`loadtest.otlp_grpc`: OK 200, RESOURCE_EXHAUSTED 429, ...), and the
status counts are reported by gRPC name.

Per request it records the latency (first byte written to last byte of the response
read) and the status; the summary gives requests/s counting only 200s (acknowledged),
p50/p99 of the 200s, and the status counts.

``--signal logs`` sends ``ExportLogsServiceRequest`` bodies (``--spans`` is then the
log records per request) to the URL given (``/v1/logs``). Prebuilt bodies are bounded in
bytes (``--pool-mib``, 256): when the request bound would need more, that many distinct
bodies are built and sent in turn (a long soak or 1.8 MB logs requests), so a body's ids
repeat every pool's length. ``--report-every S`` prints an ``{"phase": "interval"}``
line every S seconds of the run (requests, 200s, req/s, p50/p99 of that interval's
answers, statuses), for the soak's per-minute figures.

It runs on uvloop (``OTELWORKER_LOADGEN_LOOP=asyncio``: on asyncio's own loop, as before
2026-12-07's fifth session): the generator shares the machine's cores with the server and
PostgreSQL, which no client of a deployment does, so the less CPU it takes the less it
stands between PostgreSQL and a core (on uvloop ~40 µs of CPU a 100-span request against
~58; docs/performance.md, "The load generator on uvloop").

Run it in its own process so that it never shares the server's event loop:
:func:`run_in_subprocess` starts ``python -m loadtest.loadgen`` and reads its JSON
summary; the child prints a ``{"phase": "timing"}`` line when its clock starts, so the
caller can sample CPU counters over exactly the timed window.

    python -m loadtest.loadgen --url http://127.0.0.1:4318/v1/traces \\
        --concurrency 32 --duration 15 --requests 40000
    python -m loadtest.loadgen --url grpc://127.0.0.1:4317 --transport grpc --channels 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loadtest import otlp_grpc
from loadtest.payloads import factory_for


@dataclass(frozen=True)
class LoadSpec:
    url: str
    concurrency: int = 32
    duration_s: float | None = 15.0
    max_requests: int | None = None
    spans: int = 100
    content_type: str = "application/x-protobuf"
    timeout_s: float = 30.0
    label: str = ""
    transport: str = "http"  # or "grpc": url is grpc://host:port
    channels: int = 4  # gRPC: channels (connections) the requests in flight share
    signal: str = "traces"  # or "logs" (``spans`` is then log records per request)
    pool_mib: float = 256.0  # at most this much prebuilt request bytes; cycled when short
    report_every_s: float | None = None  # print an interval line every so many seconds
    connect_stagger_ms: float = 5.0  # HTTP: connections opened before the clock, this apart

    @property
    def request_budget(self) -> int:
        """How many bodies to prebuild: the request bound, or a guess from the duration."""
        if self.max_requests is not None:
            return self.max_requests
        if self.duration_s is None:
            raise ValueError("bound the run by max_requests, duration_s or both")
        return int(self.duration_s * 4000) + self.concurrency


@dataclass
class LoadResult:
    label: str
    url: str
    concurrency: int
    spans_per_request: int
    body_bytes: int
    requests: int
    ok: int
    statuses: dict[str, int]
    errors: dict[str, int]
    elapsed_s: float
    ok_per_s: float
    spans_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    ended_by: str
    client_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadResult:
        return cls(**data)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Response:
    __slots__ = ("close", "status")

    def __init__(self, status: int, close: bool) -> None:
        self.status = status
        self.close = close


async def read_response(reader: asyncio.StreamReader) -> _Response:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    close = b"\r\nconnection: close" in lower
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        length = int(lower[at + 17 : end])
        if length:
            await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif status not in (204, 304) and not 100 <= status < 200:
        await reader.read()  # delimited by the end of the connection
        close = True
    return _Response(status, close)


class _Run:
    def __init__(self, spec: LoadSpec, requests: list[bytes]) -> None:
        self.spec = spec
        self.requests = requests
        parts = urlsplit(spec.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.next = 0
        self.deadline = math.inf
        self.latencies: list[float] = []
        self.statuses: list[int] = []
        self.errors: dict[str, int] = {}
        self.last_done = 0.0
        self.channels: list[Any] = []
        self.opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        # The request bound; ``requests`` may be a smaller pool, sent in turn.
        self.budget = max(spec.request_budget, len(requests)) if requests else 0
        self.on_interval: Callable[[dict[str, Any]], None] | None = None
        self._reported = 0  # intervals reported
        self._seen = 0  # answers reported

    def _take(self) -> bytes | None:
        if self.next >= self.budget or time.perf_counter() >= self.deadline:
            return None
        request = self.requests[self.next % len(self.requests)]
        self.next += 1
        return request

    async def _intervals(self, started: float) -> None:
        """Every ``report_every_s``: the answers completed in that interval."""
        every = self.spec.report_every_s
        assert every is not None
        while True:
            n = self._reported + 1
            await asyncio.sleep(max(0.0, started + n * every - time.perf_counter()))
            self._emit_interval(n, every)

    def _emit_interval(self, n: int, every: float) -> None:
        assert self.on_interval is not None
        self._reported = n
        upto = len(self.statuses)
        statuses = self.statuses[self._seen : upto]
        latencies = self.latencies[self._seen : upto]
        self._seen = upto
        ok = sorted(lat for lat, st in zip(latencies, statuses, strict=True) if st == 200)
        counts: dict[str, int] = {}
        for st in statuses:
            counts[str(st)] = counts.get(str(st), 0) + 1
        p50, p99 = percentile(ok, 50), percentile(ok, 99)
        self.on_interval(
            {
                "interval": n,
                "t_s": round(n * every, 1),
                "requests": len(statuses),
                "ok": len(ok),
                "ok_per_s": round(len(ok) / every, 2),
                "p50_ms": None if p50 is None else round(p50 * 1000, 3),
                "p99_ms": None if p99 is None else round(p99 * 1000, 3),
                "max_ms": round(ok[-1] * 1000, 3) if ok else None,
                "statuses": dict(sorted(counts.items())),
            }
        )

    async def _connection(self, lane: int = 0) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        if lane < len(self.opened):
            reader, writer = self.opened[lane]
        perf = time.perf_counter
        latencies = self.latencies
        statuses = self.statuses
        timeout = self.spec.timeout_s
        try:
            while (request := self._take()) is not None:
                started = perf()
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                    assert reader is not None
                    writer.write(request)
                    async with asyncio.timeout(timeout):
                        await writer.drain()
                        response = await read_response(reader)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    name = type(exc).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                    latencies.append(perf() - started)
                    statuses.append(0)
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    continue
                done = perf()
                latencies.append(done - started)
                statuses.append(response.status)
                self.last_done = done
                if response.close and writer is not None:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _grpc_calls(self, exporter: otlp_grpc.Exporter) -> None:
        perf = time.perf_counter
        latencies = self.latencies
        statuses = self.statuses
        timeout = self.spec.timeout_s
        while (request := self._take()) is not None:
            started = perf()
            answer = await exporter.export(self.spec.signal, request, deadline_s=timeout)
            done = perf()
            latencies.append(done - started)
            statuses.append(answer.status)
            if answer.status == 0:
                self.errors[answer.code] = self.errors.get(answer.code, 0) + 1
            else:
                self.last_done = done

    async def _connect(self) -> None:
        """Connections opened before the clock: gRPC channels; HTTP connections one at a
        time, ``connect_stagger_ms`` apart, so that under ``hypercorn -w N`` (one listening
        socket, whichever idle worker wakes first accepts everything pending) the
        connections spread over the workers instead of all landing on one."""
        if self.spec.transport != "grpc":
            stagger = self.spec.connect_stagger_ms / 1000
            for _ in range(self.spec.concurrency):
                try:
                    pair = await asyncio.open_connection(self.host, self.port)
                except OSError:
                    break  # the lanes connect on first use (and count the error)
                self.opened.append(pair)
                if stagger > 0:
                    await asyncio.sleep(stagger)
            return
        target = otlp_grpc.target_of(self.spec.url)
        count = max(1, min(self.spec.channels, self.spec.concurrency))
        self.channels = [otlp_grpc.channel(target) for _ in range(count)]
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.channels)), 30)

    def _lanes(self) -> list[Any]:
        if self.spec.transport != "grpc":
            return [self._connection(i) for i in range(self.spec.concurrency)]
        exporters = [otlp_grpc.Exporter(c) for c in self.channels]
        return [
            self._grpc_calls(exporters[i % len(exporters)]) for i in range(self.spec.concurrency)
        ]

    async def go(self, on_start: Callable[[], None] | None = None) -> LoadResult:
        try:
            await self._connect()
            if on_start is not None:
                on_start()
            cpu0 = time.process_time()
            started = time.perf_counter()
            if self.spec.duration_s is not None:
                self.deadline = started + self.spec.duration_s
            reporter = None
            if self.spec.report_every_s and self.on_interval is not None:
                reporter = asyncio.ensure_future(self._intervals(started))
            try:
                await asyncio.gather(*self._lanes())
            finally:
                if reporter is not None:
                    reporter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reporter
            every = self.spec.report_every_s
            if reporter is not None and every and self.spec.duration_s is not None:
                # The last interval ends at the deadline: report it if the lanes finished
                # (their last answers in) before its timer fired.
                last = round(self.spec.duration_s / every)
                if self._reported < last:
                    self._emit_interval(last, every)
            finished = time.perf_counter()
            cpu = time.process_time() - cpu0
        finally:
            for chan in self.channels:
                await chan.close()
        ended_by = "duration" if self.next < self.budget else "requests"
        # Requests/s over the window in which answers came back.
        elapsed = (self.last_done or finished) - started
        return self._summary(elapsed, ended_by, cpu)

    def _summary(self, elapsed: float, ended_by: str, cpu: float) -> LoadResult:
        counts: dict[str, int] = {}
        ok_latencies: list[float] = []
        name = otlp_grpc.label if self.spec.transport == "grpc" else str
        for latency, status in zip(self.latencies, self.statuses, strict=True):
            counts[name(status)] = counts.get(name(status), 0) + 1
            if status == 200:
                ok_latencies.append(latency)
        ok_latencies.sort()
        ok = len(ok_latencies)
        rate = ok / elapsed if elapsed > 0 else 0.0

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        body = len(self.requests[0]) if self.requests else 0
        extra: dict[str, Any] = {"signal": self.spec.signal}
        if len(self.requests) < self.budget:
            extra["distinct_bodies"] = len(self.requests)
        return LoadResult(
            label=self.spec.label,
            url=self.spec.url,
            concurrency=self.spec.concurrency,
            spans_per_request=self.spec.spans,
            body_bytes=body,
            requests=len(self.statuses),
            ok=ok,
            statuses=dict(sorted(counts.items())),
            errors=self.errors,
            elapsed_s=round(elapsed, 4),
            ok_per_s=round(rate, 2),
            spans_per_s=round(rate * self.spec.spans, 1),
            p50_ms=ms(percentile(ok_latencies, 50)),
            p90_ms=ms(percentile(ok_latencies, 90)),
            p99_ms=ms(percentile(ok_latencies, 99)),
            max_ms=ms(ok_latencies[-1] if ok_latencies else None),
            mean_ms=ms(sum(ok_latencies) / ok if ok else None),
            ended_by=ended_by,
            client_cpu_s=round(cpu, 3),
            extra=extra,
        )


def build_requests(spec: LoadSpec) -> list[bytes]:
    """Every request of the run, head and body, as one buffer each (before timing); over
    gRPC the bodies alone."""
    parts = urlsplit(spec.url)
    path = parts.path or "/"
    host = parts.netloc
    factory = factory_for(spec.signal, spec.spans)
    # Bounded in bytes: a pool of distinct bodies, sent in turn, when the bound needs more.
    count = spec.request_budget
    room = max(1, int(spec.pool_mib * 2**20 // max(factory.approx_size, 1)))
    count = max(1, min(count, max(room, spec.concurrency)))
    if spec.transport == "grpc":
        return [factory.make() for _ in range(count)]
    out: list[bytes] = []
    for _ in range(count):
        body = factory.make()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {spec.content_type}\r\n"
            f"Content-Length: {len(body)}\r\nUser-Agent: otelworker-loadgen\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


async def run(
    spec: LoadSpec,
    requests: list[bytes] | None = None,
    on_start: Callable[[], None] | None = None,
    on_interval: Callable[[dict[str, Any]], None] | None = None,
) -> LoadResult:
    """Run the load in this event loop (use :func:`run_in_subprocess` against a server)."""
    if requests is None:
        requests = build_requests(spec)
    lane = _Run(spec, requests)
    lane.on_interval = on_interval
    return await lane.go(on_start)


async def run_in_subprocess(
    spec: LoadSpec,
    on_timing: Callable[[], Awaitable[None] | None] | None = None,
    python: str = sys.executable,
    on_interval: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
) -> LoadResult:
    """Run the load from a child process; ``on_timing`` is called when its clock starts,
    ``on_interval`` with each interval line (each awaited when it returns an awaitable)."""
    args = [python, "-m", "loadtest.loadgen", "--url", spec.url, "--json", "-"]
    args += ["--concurrency", str(spec.concurrency), "--spans", str(spec.spans)]
    args += ["--content-type", spec.content_type, "--timeout", str(spec.timeout_s)]
    args += ["--label", spec.label, "--transport", spec.transport]
    args += ["--channels", str(spec.channels), "--signal", spec.signal]
    args += ["--pool-mib", str(spec.pool_mib)]
    args += ["--connect-stagger-ms", str(spec.connect_stagger_ms)]
    if spec.report_every_s:
        args += ["--report-every", str(spec.report_every_s)]
    if spec.duration_s is not None:
        args += ["--duration", str(spec.duration_s)]
    if spec.max_requests is not None:
        args += ["--requests", str(spec.max_requests)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, cwd=os.getcwd()
    )
    assert proc.stdout is not None
    result: LoadResult | None = None
    async for line in proc.stdout:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("phase") == "timing":
            if on_timing is not None:
                started = on_timing()
                if inspect.isawaitable(started):
                    await started
        elif message.get("phase") == "interval":
            if on_interval is not None:
                waited = on_interval(message["interval"])
                if inspect.isawaitable(waited):
                    await waited
        elif message.get("phase") == "done":
            result = LoadResult.from_json(message["result"])
    code = await proc.wait()
    if code != 0 or result is None:
        raise RuntimeError(f"load generator exited with {code} and no result")
    return result


def _print(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", required=True, help="e.g. http://127.0.0.1:4318/v1/traces, grpc://127.0.0.1:4317"
    )
    parser.add_argument("--transport", choices=("http", "grpc"), default=None)
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels (connections)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=None, help="seconds")
    parser.add_argument("--requests", type=int, default=None, help="request count bound")
    parser.add_argument(
        "--spans", type=int, default=100, help="spans per request (log records with logs)"
    )
    parser.add_argument("--signal", choices=("traces", "logs"), default="traces")
    parser.add_argument(
        "--pool-mib", type=float, default=256.0, help="prebuilt bodies at most (cycled)"
    )
    parser.add_argument(
        "--report-every", type=float, default=None, help="seconds between interval lines"
    )
    parser.add_argument(
        "--connect-stagger-ms",
        type=float,
        default=5.0,
        help="HTTP: open the connections before the clock, this many ms apart",
    )
    parser.add_argument("--content-type", default="application/x-protobuf")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 15.0
    if args.transport is None:
        args.transport = "grpc" if args.url.startswith("grpc://") else "http"
    spec = LoadSpec(
        url=args.url,
        concurrency=args.concurrency,
        duration_s=args.duration,
        max_requests=args.requests,
        spans=args.spans,
        content_type=args.content_type,
        timeout_s=args.timeout,
        label=args.label,
        transport=args.transport,
        channels=args.channels,
        signal=args.signal,
        pool_mib=args.pool_mib,
        report_every_s=args.report_every,
        connect_stagger_ms=args.connect_stagger_ms,
    )
    requests = build_requests(spec)
    machine = args.json == "-"
    on_start = (lambda: _print({"phase": "timing"})) if machine else None
    on_interval = (
        (lambda m: _print({"phase": "interval", "interval": m}))
        if machine
        else (lambda m: print(json.dumps(m), flush=True))
    )
    if os.environ.get("OTELWORKER_LOADGEN_LOOP", "uvloop") == "uvloop":
        import uvloop

        result = uvloop.run(run(spec, requests, on_start, on_interval))
    else:
        result = asyncio.run(run(spec, requests, on_start, on_interval))
    del requests
    if machine:
        _print({"phase": "done", "result": asdict(result)})
    else:
        print(
            f"{result.ok_per_s:.1f} req/s acknowledged ({result.spans_per_s:.0f} spans/s), "
            f"p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, statuses {result.statuses}, "
            f"errors {result.errors}, {result.elapsed_s} s, ended by {result.ended_by}"
        )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(asdict(result), fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
