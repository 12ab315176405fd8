"""A no-op OTLP/HTTP destination for the forwarding benchmark: counts, keeps nothing.

    python -m loadtest.noop_receiver --port 4320

``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs`` (protobuf, gzip or identity) are
answered 200 with an empty body once the body is read, decompressed (ISA-L, every gzip
member) and counted: its records (data points and log records by decoding the request;
spans by a shallow decode that stops at each span's bytes, ~5x cheaper: this process
shares the machine's cores with the service it measures, and the benchmark's spans are
what it counts) and the arrival time of every **probe** span it carries. A probe is a
span whose trace id starts with :data:`PROBE_MAGIC` followed by an 8-byte sequence number
(the benchmark sends them beside the load and stamps each one's acknowledgement time); the
receiver finds them by that byte string in the decompressed body, without walking the
spans.

``GET /stats`` answers JSON: requests, bytes, records per signal, the first arrival
(``time.time()``) of each probe seen (``?since=N``: of probes N and up) and how many
probes arrived more than once. ``GET /readyz`` answers 200. aiohttp's server in one
process, so that the destination's CPU never counts as the service's (it still shares the
cores: the reason it does as little as it can).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from isal import igzip
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

# 8 bytes no random trace id is likely to start with (2^-64), then 8 bytes of sequence.
PROBE_MAGIC = b"\xf0\x0d\xfa\xceBNCH"


def _span_counter() -> Any:
    """ExportTraceServiceRequest's wire shape down to ScopeSpans, each span left as bytes
    (field 1 resource_spans, 2 scope_spans, 2 spans): the spans counted, not decoded."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="loadtest_span_count.proto", package="loadtest_span_count", syntax="proto3"
    )
    field = descriptor_pb2.FieldDescriptorProto
    shape = [
        ("Scope", "spans", 2, field.TYPE_BYTES, ""),
        ("Resource", "scopes", 2, field.TYPE_MESSAGE, ".loadtest_span_count.Scope"),
        ("Request", "resources", 1, field.TYPE_MESSAGE, ".loadtest_span_count.Resource"),
    ]
    for message, name, number, kind, type_name in shape:
        entry = proto.message_type.add(name=message).field.add(
            name=name, number=number, label=field.LABEL_REPEATED, type=kind
        )
        if type_name:
            entry.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.Request"))


_SpanCount = _span_counter()


def count_spans(body: bytes) -> int:
    """The spans in an ExportTraceServiceRequest, as many as a full decode counts."""
    request = _SpanCount.FromString(body)
    return sum(len(s.spans) for r in request.resources for s in r.scopes)


def count_records(signal_name: str, body: bytes, *, full: bool = False) -> int:
    if signal_name == "traces":
        if not full:
            return count_spans(body)
        traces = ExportTraceServiceRequest.FromString(body)
        return sum(len(s.spans) for r in traces.resource_spans for s in r.scope_spans)
    if signal_name == "logs":
        logs = ExportLogsServiceRequest.FromString(body)
        return sum(len(s.log_records) for r in logs.resource_logs for s in r.scope_logs)
    metrics = ExportMetricsServiceRequest.FromString(body)
    points = 0
    for resource in metrics.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                if kind is not None:
                    points += len(getattr(metric, kind).data_points)
    return points


def probe_ids(body: bytes) -> list[int]:
    """The sequence numbers of the probe trace ids in a decoded body (each span once)."""
    found: list[int] = []
    at = body.find(PROBE_MAGIC)
    while at >= 0:
        found.append(int.from_bytes(body[at + 8 : at + 16], "big"))
        at = body.find(PROBE_MAGIC, at + 16)
    return found


class Receiver:
    def __init__(self, full_decode: bool = False) -> None:
        self.full_decode = full_decode
        self.requests = 0
        self.bytes = 0
        self.records = {"traces": 0, "metrics": 0, "logs": 0}
        self.probes: dict[int, float] = {}
        self.probe_repeats = 0
        self.last_arrival = 0.0

    async def export(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.time()
        # aiohttp's own decompression (zlib) is off (see app()): ISA-L reads every member
        # of a gzip body at about twice zlib's speed.
        if request.headers.get("Content-Encoding", "").lower() == "gzip" or (
            body[:2] == b"\x1f\x8b"
        ):
            body = bytes(igzip.decompress(body))  # type: ignore[no-untyped-call]
        signal_name = request.match_info["signal"]
        records = count_records(signal_name, body, full=self.full_decode)
        self.requests += 1
        self.bytes += len(body)
        self.records[signal_name] += records
        self.last_arrival = arrived
        # A span id can repeat in a probe's body only if the probe's span is in it twice.
        for seq in set(probe_ids(body)):
            if seq in self.probes:
                self.probe_repeats += 1
            else:
                self.probes[seq] = arrived
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(self, request: web.Request) -> web.Response:
        # ?since=N: the probes numbered N and up only (the benchmark polls this while a
        # service catches up; the whole run's probes would cost the receiver ever more CPU
        # on the cores the service is measured on).
        since = int(request.query.get("since", "0"))
        out = {
            "requests": self.requests,
            "bytes": self.bytes,
            "records": self.records,
            "probe_repeats": self.probe_repeats,
            "last_arrival": self.last_arrival,
            "probes": {str(k): v for k, v in self.probes.items() if k >= since},
        }
        return web.json_response(out)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=256 * 1024 * 1024, handler_args={"auto_decompress": False}
        )
        app.router.add_post("/v1/{signal:traces|metrics|logs}", self.export)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/readyz", self.ready)
        return app


class ReceiverProcess:
    """``python -m loadtest.noop_receiver`` as a process on a local port (as AppProcess)."""

    app = "loadtest.noop_receiver"

    def __init__(self, port: int, *, log_path: str | Path, decode: str = "shallow") -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadtest.noop_receiver",
                "--port",
                str(port),
                "--decode",
                decode,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=os.getcwd(),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"noop receiver exited; see {self.log_path}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/readyz", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"noop receiver not ready within {timeout} s")
            time.sleep(0.05)

    async def wait_ready_async(self, limit_s: float = 30.0) -> None:
        import asyncio

        await asyncio.to_thread(self.wait_ready, limit_s)

    def stats(self, since: int = 0) -> dict[str, Any]:
        url = f"{self.url}/stats?since={since}"
        with urllib.request.urlopen(url, timeout=30) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.noop_receiver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4320)
    parser.add_argument(
        "--decode",
        choices=("shallow", "full"),
        default="shallow",
        help="spans: counted by a shallow decode (default) or by decoding every span",
    )
    args = parser.parse_args(argv)
    app = Receiver(full_decode=args.decode == "full").app()
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
