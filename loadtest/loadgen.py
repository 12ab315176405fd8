"""A low-overhead load generator: HTTP/1.1 on asyncio streams, or OTLP/gRPC on grpc.aio.

A fixed number of keep-alive connections each send one request after another (a
closed loop: concurrency N means N requests in flight). The run stops at a request
count or a duration, whichever comes first. Every request body is built before the
clock starts (see :mod:`loadtest.payloads`), and each request goes out as one
prebuilt buffer, so the client spends its time on sockets, not on protobuf.

With ``--transport grpc`` (a ``grpc://host:port`` URL) the same bodies go to the
TraceService Export RPC as raw bytes: N calls in flight shared over ``--channels``
channels (one HTTP/2 connection each); an answer counts as the HTTP status it is the
analogue of (:mod:`loadtest.otlp_grpc`: OK 200, RESOURCE_EXHAUSTED 429, ...), and the
status counts are reported by gRPC name.

Per request it records the latency (first byte written to last byte of the response
read) and the status; the summary gives requests/s counting only 200s (acknowledged),
p50/p99 of the 200s, and the status counts.

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
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loadtest import otlp_grpc
from loadtest.payloads import TraceRequestFactory


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

    def _take(self) -> bytes | None:
        if self.next >= len(self.requests) or time.perf_counter() >= self.deadline:
            return None
        request = self.requests[self.next]
        self.next += 1
        return request

    async def _connection(self) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
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
            answer = await exporter.export("traces", request, deadline_s=timeout)
            done = perf()
            latencies.append(done - started)
            statuses.append(answer.status)
            if answer.status == 0:
                self.errors[answer.code] = self.errors.get(answer.code, 0) + 1
            else:
                self.last_done = done

    async def _connect(self) -> None:
        """gRPC: the channels connected before the clock (HTTP connects on first use)."""
        if self.spec.transport != "grpc":
            return
        target = otlp_grpc.target_of(self.spec.url)
        count = max(1, min(self.spec.channels, self.spec.concurrency))
        self.channels = [otlp_grpc.channel(target) for _ in range(count)]
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.channels)), 30)

    def _lanes(self) -> list[Any]:
        if self.spec.transport != "grpc":
            return [self._connection() for _ in range(self.spec.concurrency)]
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
            await asyncio.gather(*self._lanes())
            finished = time.perf_counter()
            cpu = time.process_time() - cpu0
        finally:
            for chan in self.channels:
                await chan.close()
        ended_by = "duration" if self.next < len(self.requests) else "requests"
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
        )


def build_requests(spec: LoadSpec) -> list[bytes]:
    """Every request of the run, head and body, as one buffer each (before timing); over
    gRPC the bodies alone."""
    parts = urlsplit(spec.url)
    path = parts.path or "/"
    host = parts.netloc
    factory = TraceRequestFactory(spec.spans)
    if spec.transport == "grpc":
        return [factory.make() for _ in range(spec.request_budget)]
    out: list[bytes] = []
    for _ in range(spec.request_budget):
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
) -> LoadResult:
    """Run the load in this event loop (use :func:`run_in_subprocess` against a server)."""
    if requests is None:
        requests = build_requests(spec)
    return await _Run(spec, requests).go(on_start)


async def run_in_subprocess(
    spec: LoadSpec,
    on_timing: Callable[[], None] | None = None,
    python: str = sys.executable,
) -> LoadResult:
    """Run the load from a child process; ``on_timing`` is called when its clock starts."""
    args = [python, "-m", "loadtest.loadgen", "--url", spec.url, "--json", "-"]
    args += ["--concurrency", str(spec.concurrency), "--spans", str(spec.spans)]
    args += ["--content-type", spec.content_type, "--timeout", str(spec.timeout_s)]
    args += ["--label", spec.label, "--transport", spec.transport]
    args += ["--channels", str(spec.channels)]
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
                on_timing()
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
    parser.add_argument("--spans", type=int, default=100, help="spans per request")
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
    )
    requests = build_requests(spec)
    machine = args.json == "-"
    on_start = (lambda: _print({"phase": "timing"})) if machine else None
    result = asyncio.run(run(spec, requests, on_start))
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
