"""The door's per-request pieces, alone and side by side in one process (docs/performance.md,
"What limits throughput"): the check and facts (upb's decode and the Python readers
against the compiled ``inspect``), the staging gzip and what was tried instead of it, and
one against two ``send()`` calls for an answer on TCP loopback.

    .venv/bin/python -m loadtest.bench_door [--calls 3000]

Microseconds per call, the median of five passes; the benchmark's own requests
(``loadtest.payloads.build_request``). Not a target: what the profile's shares are made of.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections.abc import Callable

from isal import isal_zlib

from loadtest.payloads import build_request
from otelworker import gzjoin, otlp
from otelworker.wire import compiled


def per_call_us(call: Callable[[], object], calls: int) -> float:
    call()
    passes = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        passes.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(passes)


def _upb_and_readers(data: bytes) -> object:
    message = otlp.decode("traces", data)
    return (
        otlp.count_records("traces", message),
        otlp.payload_time_range("traces", data, message),
        otlp.service_names("traces", message),
    )


def _deflate(data: bytes, level: int) -> bytes:
    deflater = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
    return bytes(deflater.compress(data) + deflater.flush(isal_zlib.Z_SYNC_FLUSH))


def _rows(data: bytes) -> list[tuple[str, Callable[[], object]]]:
    kept = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)
    rows: list[tuple[str, Callable[[], object]]] = [
        ("upb decode + count, names, time range (compiled)", lambda: _upb_and_readers(data)),
        ("staging gzip (gzjoin.piece, ISA-L level 0, the default)", lambda: gzjoin.piece(data, 0)),
        ("staging gzip (gzjoin.piece, ISA-L level 1)", lambda: gzjoin.piece(data, 1)),
        ("ISA-L level 0", lambda: _deflate(data, 0)),
        (
            "ISA-L level 1, one compressor, full flushes",
            lambda: kept.compress(data) + kept.flush(isal_zlib.Z_FULL_FLUSH),
        ),
    ]
    if compiled is not None:
        inspect = compiled.inspect
        rows.insert(1, ("compiled inspect", lambda: inspect("traces", data)))
    return rows


def door(calls: int) -> None:
    for spans in (100, 512):
        data = build_request(spans).SerializeToString()
        print(f"{spans} spans, {len(data):,} bytes")
        for name, call in _rows(data):
            print(f"  {name:<50} {per_call_us(call, calls):8.1f} us")


def sends(calls: int) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer.setblocking(False)
    head, body = b"h" * 180, b"b" * 2

    def drain() -> None:
        try:
            while peer.recv(1 << 16):
                pass
        except BlockingIOError:
            pass

    def two() -> None:
        client.send(head)
        client.send(body)
        drain()

    def one() -> None:
        client.send(head + body)
        drain()

    print("an answer on TCP loopback (TCP_NODELAY), with the reader's recv")
    print(f"  {'head and body, two send() calls':<50} {per_call_us(two, calls):8.1f} us")
    print(f"  {'head and body, one send()':<50} {per_call_us(one, calls):8.1f} us")
    for sock in (client, peer, server):
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per pass")
    args = parser.parse_args()
    door(args.calls)
    sends(args.calls)


if __name__ == "__main__":
    main()
