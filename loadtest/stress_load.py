"""The stress-mode load generator, run as its own process (``python -m loadtest.stress_load``).

A closed loop: ``--concurrency`` lanes each send one request after another until
``--duration`` has passed. Over HTTP (``--transport http``) each lane is a keep-alive
connection on asyncio streams; over gRPC (``--transport grpc``) the lanes share
``--channels`` grpc.aio channels (one connection each) and call the Export RPCs with the
same protobuf bodies, an answer counted as the HTTP status it is the analogue of (see
:mod:`loadtest.otlp_grpc`: OK 200, OK with partial_success 202, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, no answer 0). Request ``k`` (from 1) has a
signal and an encoding fixed by :func:`schedule`, ``--records`` records whose ids are
``k << 16 | n`` (see :mod:`loadtest.stress_records`), so the parent can rebuild what each
request carried from its index alone.

It prints JSON lines on stdout: ``{"phase": "timing"}`` when the clock starts, a
``{"phase": "progress", ...}`` line every second, and ``{"phase": "done", "result": PATH}``
after writing the result file: the status and latency of every request and a per-second
series (answers by status, records acknowledged, latency percentiles).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc

from loadtest import otlp_grpc
from loadtest.loadgen import read_response
from loadtest.stress_records import SIGNALS, Template

CONTENT_TYPES = {"json": "application/json"}


def parse_mix(text: str) -> list[tuple[str, int]]:
    """``traces=3,logs=2,metrics=1`` -> [(signal, weight)]."""
    out: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in SIGNALS:
            raise ValueError(f"unknown signal {name!r} in --signals (use {', '.join(SIGNALS)})")
        out.append((name, int(weight or 1)))
    if not out or sum(w for _, w in out) <= 0:
        raise ValueError("--signals needs at least one signal with a positive weight")
    return out


@dataclass(frozen=True)
class Schedule:
    """What request k carries: the signal mix interleaved, the encoding in turn."""

    signals: tuple[str, ...]
    encodings: tuple[str, ...]
    records: int

    @classmethod
    def build(cls, mix: str, encoding: str, records: int) -> Schedule:
        weights = parse_mix(mix)
        # Interleave by weight (traces=3,logs=1 -> t l t t ...), not in blocks.
        total = sum(w for _, w in weights)
        order = sorted(((i + 0.5) / w, name) for name, w in weights for i in range(w) if w > 0)
        signals = tuple(name for _, name in order)
        assert len(signals) == total
        encodings = ("protobuf", "gzip", "json") if encoding == "mix" else (encoding,)
        return cls(signals, encodings, records)

    def signal(self, k: int) -> str:
        return self.signals[k % len(self.signals)]

    def encoding(self, k: int) -> str:
        return self.encodings[(k // len(self.signals)) % len(self.encodings)]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank of a sorted list."""
    if not values:
        return None
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


async def _read_status(reader: asyncio.StreamReader) -> tuple[int, bool]:
    response = await read_response(reader)
    return response.status, response.close


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url = urlsplit(args.url)
        self.transport = args.transport
        self.grpc_target = args.grpc_target
        self.channels = max(1, min(args.channels, args.concurrency))
        self.schedule = Schedule.build(args.signals, args.encoding, args.records)
        self.templates = {
            s: Template(s, args.records, args.pad) for s in set(self.schedule.signals)
        }
        self.concurrency = args.concurrency
        self.duration = args.duration
        self.timeout = args.timeout
        self.next = 1
        self.deadline = math.inf
        self.t0 = 0.0
        # per request (index k - 1): status (0: no answer) and latency; -1 until answered
        self.status: list[int] = []
        self.latency: list[float] = []
        self.done_at: list[float] = []
        self.errors: Counter[str] = Counter()
        self.in_flight = 0
        self.label = otlp_grpc.label if self.transport == "grpc" else str
        self._channels: list[grpc.aio.Channel] = []

    def body_sizes(self) -> dict[str, int]:
        return {s: t.size for s, t in self.templates.items()}

    def request(self, k: int) -> bytes:
        signal = self.schedule.signal(k)
        encoding = self.schedule.encoding(k)
        template = self.templates[signal]
        headers = ""
        if encoding == "json":
            body = template.make_json(k)
            content_type = "application/json"
        else:
            body = template.make(k)
            content_type = "application/x-protobuf"
            if encoding == "gzip":
                body = gzip.compress(body, compresslevel=1)
                headers = "Content-Encoding: gzip\r\n"
        head = (
            f"POST /v1/{signal} HTTP/1.1\r\nHost: {self.url.netloc}\r\n"
            f"Content-Type: {content_type}\r\n{headers}Content-Length: {len(body)}\r\n"
            "User-Agent: otelworker-stress\r\n\r\n"
        )
        return head.encode() + body

    def grpc_request(self, k: int) -> tuple[str, bytes, bool]:
        """Request k over gRPC: (signal, protobuf body, gzip message compression)."""
        signal = self.schedule.signal(k)
        return signal, self.templates[signal].make(k), self.schedule.encoding(k) == "gzip"

    def _take(self) -> int | None:
        if time.monotonic() >= self.deadline:
            return None
        k = self.next
        self.next += 1
        self.status.append(-1)
        self.latency.append(0.0)
        self.done_at.append(0.0)
        return k

    async def _lane(self) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        host, port = self.url.hostname or "127.0.0.1", self.url.port or 80
        while (k := self._take()) is not None:
            data = self.request(k)
            started = time.monotonic()
            self.in_flight += 1
            try:
                async with asyncio.timeout(self.timeout):
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    assert reader is not None
                    writer.write(data)
                    await writer.drain()
                    status, close = await _read_status(reader)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.errors[type(exc).__name__] += 1
                status, close = 0, True
            finally:
                self.in_flight -= 1
            now = time.monotonic()
            self.status[k - 1] = status
            self.latency[k - 1] = now - started
            self.done_at[k - 1] = now - self.t0
            if close and writer is not None:
                writer.close()
                reader = writer = None
            if status == 0:
                await asyncio.sleep(0.05)  # the service may be gone; do not spin
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _grpc_lane(self, exporter: otlp_grpc.Exporter) -> None:
        while (k := self._take()) is not None:
            signal, body, gzipped = self.grpc_request(k)
            started = time.monotonic()
            self.in_flight += 1
            try:
                answer = await exporter.export(signal, body, deadline_s=self.timeout, gzip=gzipped)
            finally:
                self.in_flight -= 1
            now = time.monotonic()
            self.status[k - 1] = answer.status
            self.latency[k - 1] = now - started
            self.done_at[k - 1] = now - self.t0
            if answer.status == 0:
                self.errors[answer.code] += 1
                await asyncio.sleep(0.05)  # the service may be gone; do not spin

    async def _lanes(self) -> None:
        if self.transport != "grpc":
            await asyncio.gather(*(self._lane() for _ in range(self.concurrency)))
            return
        exporters = [otlp_grpc.Exporter(c) for c in self._channels]
        await asyncio.gather(
            *(self._grpc_lane(exporters[i % len(exporters)]) for i in range(self.concurrency))
        )

    async def _connect(self) -> None:
        """gRPC: every channel connected before the clock starts (HTTP connects lazily)."""
        if self.transport != "grpc":
            return
        self._channels = [otlp_grpc.channel(self.grpc_target) for _ in range(self.channels)]
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self._channels)), 30)

    async def _progress(self) -> None:
        seen = 0
        while True:
            await asyncio.sleep(1.0)
            answered = [s for s in self.status[seen:] if s >= 0]
            counts = Counter(self.label(s) for s in self.status if s >= 0)
            _emit(
                {
                    "phase": "progress",
                    "t": round(time.monotonic() - self.t0, 3),
                    "sent": len(self.status),
                    "statuses": dict(counts),
                    "in_flight": self.in_flight,
                    "new": len(answered),
                }
            )

    async def run(self) -> None:
        for k in range(1, 4):  # warm the templates' code paths before the clock
            if self.transport == "grpc":
                self.grpc_request(k)
            else:
                self.request(k)
        try:
            await self._connect()
            _emit({"phase": "timing"})
            self.t0 = time.monotonic()
            self.deadline = self.t0 + self.duration
            progress = asyncio.create_task(self._progress())
            await self._lanes()
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        finally:
            for chan in self._channels:
                await chan.close()

    def result(self) -> dict[str, object]:
        records = self.schedule.records
        seconds = max(1, math.ceil(max(self.done_at, default=0.0)))
        series = []
        for sec in range(seconds):
            series.append({"t": sec, "statuses": Counter(), "latencies": [], "ok_latencies": []})
        for status, latency, at in zip(self.status, self.latency, self.done_at, strict=True):
            bucket = series[min(int(at), seconds - 1)]
            bucket["statuses"][str(status)] += 1  # type: ignore[index]
            bucket["latencies"].append(latency)  # type: ignore[attr-defined]
            if status == 200:
                bucket["ok_latencies"].append(latency)  # type: ignore[attr-defined]
        out_series = []
        for bucket in series:
            lat = sorted(bucket["latencies"])  # type: ignore[call-overload]
            statuses = dict(bucket["statuses"])  # type: ignore[call-overload]
            ok = statuses.get("200", 0)
            out_series.append(
                {
                    "t": bucket["t"],
                    "requests": len(lat),
                    "acked": ok,
                    "records_acked": ok * records,
                    "statuses": statuses,
                    "p50_ms": _ms(percentile(lat, 50)),
                    "p95_ms": _ms(percentile(lat, 95)),
                    "p99_ms": _ms(percentile(lat, 99)),
                }
            )
        return {
            "transport": self.transport,
            "status_labels": {str(s): self.label(s) for s in sorted(set(self.status))},
            "schedule": {
                "signals": list(self.schedule.signals),
                "encodings": list(self.schedule.encodings),
                "records": records,
            },
            "body_bytes": self.body_sizes(),
            "statuses": self.status,
            "latencies": [round(x, 6) for x in self.latency],
            "errors": dict(self.errors),
            "elapsed_s": max(self.done_at, default=0.0),
            "series": out_series,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def _emit(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the service base URL")
    parser.add_argument("--transport", choices=("http", "grpc"), default="http")
    parser.add_argument("--grpc-target", help="host:port of the service's OTLP/gRPC server")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels for the lanes")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--signals", default="traces=3,logs=2,metrics=1")
    parser.add_argument("--records", type=int, default=50)
    parser.add_argument("--pad", type=int, default=64)
    parser.add_argument("--encoding", default="protobuf")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", required=True, help="the result file (JSON)")
    args = parser.parse_args(argv)
    if args.transport == "grpc":
        if not args.grpc_target:
            parser.error("--transport grpc needs --grpc-target HOST:PORT")
        if args.encoding not in ("protobuf", "gzip"):
            parser.error("--transport grpc sends protobuf only (--encoding protobuf or gzip)")
    load = Load(args)
    asyncio.run(load.run())
    with open(args.out, "w") as fh:
        json.dump(load.result(), fh)
    _emit({"phase": "done", "result": args.out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
