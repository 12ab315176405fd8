"""Hostile and broken clients: deep nesting, early refusals on kept-alive connections,
clients that leave mid-body. None of them may cost a 500, a stalled connection, a reset or
a traceback; nothing already accepted may be lost.

The connection tests speak raw HTTP/1.1 over one socket, so that "the same connection" is
exactly that, and a body can be sent in as many separate writes as a JS exporter would.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import zstandard
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otelworker import otlp
from otelworker.ingress.admission import InflightBytes
from tests.support import payloads
from tests.support.payloads import ENCODERS, unstage
from tests.support.server import FRONTS, RunningService, front_as, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, params=FRONTS)
def front(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test against both entries: the bare hypercorn one and serve's uvicorn front."""
    with front_as(request.param):
        yield request.param


PROTOBUF = "application/x-protobuf"
JSON = "application/json"
LIMIT = 256 * 1024
PROMPT_S = 3.0  # an answer later than this is a stall
CODECS = ENCODERS


# --- a raw HTTP/1.1 connection --------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, svc: RunningService) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send_head(self, path: str, headers: dict[str, str], method: str = "POST") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()

    async def send_chunks(self, body: bytes, writes: int, *, end: bool = True) -> None:
        """The body as ``writes`` chunks, each in its own write (and TCP segment)."""
        size = max(1, -(-len(body) // writes))
        for i in range(0, len(body), size):
            piece = body[i : i + size]
            self.writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await self.writer.drain()
            await asyncio.sleep(0.002)  # pacing, so the writes are separate segments
        if end:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()

    async def read_answer(self) -> Answer:
        async with asyncio.timeout(PROMPT_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                if line:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Answer(int(status_line.split()[1]), headers, body)

    async def request(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        await self.send_head(path, {**headers, "Content-Length": str(len(body))})
        self.writer.write(body)
        await self.writer.drain()
        return await self.read_answer()

    async def closed_cleanly(self) -> bool:
        """True when the server ends the connection with a FIN (EOF), not a reset."""
        try:
            async with asyncio.timeout(PROMPT_S):
                return await self.reader.read(65536) == b""
        except ConnectionResetError:
            return False

    def close(self) -> None:
        self.writer.close()


def valid_trace() -> bytes:
    return payloads.traces(2).SerializeToString()


async def valid_request_is_answered(conn: Connection, expect: int = 200) -> None:
    answer = await conn.request("/v1/traces", valid_trace(), {"Content-Type": PROTOBUF})
    assert answer.status == expect, answer


def rpc_status(answer: Answer) -> Any:
    if answer.headers.get("content-type", "").startswith(JSON):
        return json_format.Parse(answer.body, status_pb2.Status())
    return status_pb2.Status.FromString(answer.body)


async def staged_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT signal, payload, record_count FROM ingestion_queue"))
    finally:
        await conn.close()


@pytest.fixture
async def svc(database_url: str) -> AsyncIterator[RunningService]:
    async with running_service(
        database_url=database_url,
        role="ingress",
        max_request_body_bytes=LIMIT,
        log_aggregation_window_s=0,
    ) as running:
        yield running


# --- deep nesting ---------------------------------------------------------------------------


def nested_arrays(depth: int) -> bytes:
    return b'{"x":' + b"[" * depth + b"]" * depth + b"}"


def nested_objects(depth: int) -> bytes:
    return b'{"x":' * depth + b"{}" + b"}" * depth


def kvlist_json(depth: int) -> bytes:
    value = '{"stringValue": "leaf"}'
    for _ in range(depth):
        value = '{"kvlistValue": {"values": [{"key": "k", "value": ' + value + "}]}}"
    return _span_with_attribute_json(value)


def array_json(depth: int) -> bytes:
    value = '{"intValue": "1"}'
    for _ in range(depth):
        value = '{"arrayValue": {"values": [' + value + "]}}"
    return _span_with_attribute_json(value)


def _span_with_attribute_json(value: str) -> bytes:
    span = (
        '{"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708",'
        ' "name": "deep", "startTimeUnixNano": "1700000000000000000",'
        ' "attributes": [{"key": "a", "value": ' + value + "}]}"
    )
    return ('{"resourceSpans": [{"scopeSpans": [{"spans": [' + span + "]}]}]}").encode()


def kvlist_protobuf(depth: int) -> bytes:
    request = payloads.traces(1)
    value = request.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="a").value
    for _ in range(depth):
        value = value.kvlist_value.values.add(key="k").value
    value.string_value = "leaf"
    return request.SerializeToString()


# The deepest accepted trees: MAX_NESTING (100) message levels; a span's attribute value is
# at level 6, a kvlist level adds 3 (KeyValueList, KeyValue, AnyValue), an array level 2.
DEEPEST_KVLIST = (otlp.MAX_NESTING - 6) // 3
DEEPEST_ARRAY = (otlp.MAX_NESTING - 6) // 2


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("arrays-486", nested_arrays(486)),  # the reported 500
        ("arrays-1000", nested_arrays(1000)),
        ("arrays-1024", nested_arrays(1024)),  # past orjson's own limit
        ("arrays-5000", nested_arrays(5000)),
        ("objects-101", nested_objects(otlp.MAX_NESTING)),
        ("objects-970", nested_objects(970)),
        ("kvlist-too-deep", kvlist_json(DEEPEST_KVLIST + 1)),
        ("kvlist-250", kvlist_json(250)),
        ("array-too-deep", array_json(DEEPEST_ARRAY + 1)),
        ("array-300", array_json(300)),
    ],
)
async def test_json_nested_past_the_limit_is_400_with_a_status(
    svc: RunningService, database_url: str, case: str, body: bytes
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            svc.endpoint("traces"), content=body, headers={"content-type": JSON}
        )
    assert response.status_code == 400, (case, response.text[:200])
    status = json_format.Parse(response.content, status_pb2.Status())
    assert status.code == otlp.CODE_INVALID_ARGUMENT
    assert "nest" in status.message or "JSON" in status.message, status.message
    assert await staged_rows(database_url) == []


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("kvlist-deepest", kvlist_json(DEEPEST_KVLIST)),
        ("array-deepest", array_json(DEEPEST_ARRAY)),
        ("kvlist-10", kvlist_json(10)),
    ],
)
async def test_json_nested_within_the_limit_is_staged_and_decodes_again(
    svc: RunningService, database_url: str, case: str, body: bytes
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            svc.endpoint("traces"), content=body, headers={"content-type": JSON}
        )
    assert response.status_code == 200, (case, response.text[:200])
    [row] = await staged_rows(database_url)
    # What the door accepts, the flush decodes: the staged bytes parse again.
    staged = trace_service_pb2.ExportTraceServiceRequest.FromString(unstage(row["payload"]))
    assert row["record_count"] == 1
    assert staged.resource_spans[0].scope_spans[0].spans[0].name == "deep"


@pytest.mark.parametrize("depth", [DEEPEST_KVLIST + 1, 300, 5000])
async def test_protobuf_nested_past_the_runtime_limit_is_400(
    svc: RunningService, database_url: str, depth: int
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            svc.endpoint("traces"),
            content=kvlist_protobuf(depth),
            headers={"content-type": PROTOBUF},
        )
        assert response.status_code == 400
        assert status_pb2.Status.FromString(response.content).code == otlp.CODE_INVALID_ARGUMENT
        deepest = await client.post(
            svc.endpoint("traces"),
            content=kvlist_protobuf(DEEPEST_KVLIST),
            headers={"content-type": PROTOBUF},
        )
        assert deepest.status_code == 200
    assert [r["record_count"] for r in await staged_rows(database_url)] == [1]


# --- refusals before the body is read, on a kept-alive connection -----------------------------


async def test_early_415_on_a_chunked_body_keeps_the_connection_serving(
    svc: RunningService, database_url: str
) -> None:
    conn = await Connection.open(svc)
    try:
        for _ in range(3):  # the reported stall came on the second request
            await conn.send_head(
                "/v1/traces", {"Content-Type": "text/plain", "Transfer-Encoding": "chunked"}
            )
            await conn.send_chunks(valid_trace() * 20, writes=16)
            answer = await conn.read_answer()
            assert answer.status == 415
            assert answer.headers.get("connection") != "close"
            assert rpc_status(answer).message
            await valid_request_is_answered(conn)
    finally:
        conn.close()
    assert len(await staged_rows(database_url)) == 3


async def test_early_415_for_an_unsupported_encoding_names_the_supported_ones(
    svc: RunningService,
) -> None:
    conn = await Connection.open(svc)
    try:
        await conn.send_head(
            "/v1/traces",
            {"Content-Type": PROTOBUF, "Content-Encoding": "br", "Transfer-Encoding": "chunked"},
        )
        await conn.send_chunks(valid_trace() * 10, writes=12)
        answer = await conn.read_answer()
        assert answer.status == 415
        message = rpc_status(answer).message
        assert "'br'" in message and "gzip" in message and "zstd" in message
        await valid_request_is_answered(conn)
    finally:
        conn.close()


async def test_early_429_from_the_rate_limit_keeps_the_connection_serving(
    database_url: str,
) -> None:
    async with running_service(
        database_url=database_url,
        role="ingress",
        enable_rate_limiting=True,
        rate_limit_rps=0.001,
        rate_limit_burst=1,
    ) as svc:
        conn = await Connection.open(svc)
        try:
            await valid_request_is_answered(conn)  # the one token
            for _ in range(3):
                await conn.send_head(
                    "/v1/traces", {"Content-Type": PROTOBUF, "Transfer-Encoding": "chunked"}
                )
                await conn.send_chunks(valid_trace() * 30, writes=20)
                answer = await conn.read_answer()
                assert answer.status == 429
                assert int(answer.headers["retry-after"]) >= 1
                assert answer.headers.get("connection") != "close"
            # Still this connection, still answered at once (429 again: no token yet).
            await valid_request_is_answered(conn, expect=429)
        finally:
            conn.close()
        assert len(await staged_rows(database_url)) == 1


async def test_early_429_from_saturation_keeps_the_connection_serving(
    database_url: str,
) -> None:
    async with running_service(
        database_url=database_url,
        role="ingress",
        staging_max_backlog=1,
        backlog_refresh_interval_ms=60_000,
    ) as svc:
        conn = await Connection.open(svc)
        try:
            await valid_request_is_answered(conn)  # fills the backlog
            await conn.send_head(
                "/v1/logs", {"Content-Type": PROTOBUF, "Transfer-Encoding": "chunked"}
            )
            await conn.send_chunks(payloads.logs(50).SerializeToString(), writes=15)
            answer = await conn.read_answer()
            assert answer.status == 429
            assert "saturated" in rpc_status(answer).message
            await valid_request_is_answered(conn, expect=429)
        finally:
            conn.close()


async def test_413_by_content_length_closes_cleanly_with_connection_close(
    svc: RunningService, database_url: str
) -> None:
    conn = await Connection.open(svc)
    try:
        await conn.send_head(
            "/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": str(LIMIT * 4)}
        )
        conn.writer.write(b"\x00" * 64 * 1024)  # the client is still sending
        await conn.writer.drain()
        answer = await conn.read_answer()
        assert answer.status == 413
        assert answer.headers["connection"] == "close"
        assert "exceeds the limit" in rpc_status(answer).message
        conn.writer.write(b"\x00" * 64 * 1024)
        await conn.writer.drain()
        assert await conn.closed_cleanly()
    finally:
        conn.close()
    # A fresh connection is served.
    conn = await Connection.open(svc)
    try:
        await valid_request_is_answered(conn)
    finally:
        conn.close()
    assert len(await staged_rows(database_url)) == 1


async def test_413_mid_chunked_body_closes_cleanly(svc: RunningService) -> None:
    conn = await Connection.open(svc)
    try:
        await conn.send_head(
            "/v1/traces", {"Content-Type": PROTOBUF, "Transfer-Encoding": "chunked"}
        )
        await conn.send_chunks(b"\x0a" * (LIMIT + 4096), writes=40, end=False)
        answer = await conn.read_answer()
        assert answer.status == 413
        assert answer.headers["connection"] == "close"
        assert await conn.closed_cleanly()
    finally:
        conn.close()


async def test_small_early_refusal_with_content_length_keeps_alive(svc: RunningService) -> None:
    conn = await Connection.open(svc)
    try:
        for method in ("PUT", "POST"):
            body = valid_trace()
            headers = {"Content-Type": "text/plain" if method == "POST" else PROTOBUF}
            await conn.send_head(
                "/v1/metrics", {**headers, "Content-Length": str(len(body))}, method
            )
            for i in range(0, len(body), 50):  # in pieces, after the refusal may have started
                conn.writer.write(body[i : i + 50])
                await conn.writer.drain()
            answer = await conn.read_answer()
            assert answer.status == (405 if method == "PUT" else 415)
            assert answer.headers.get("connection") != "close"
        await valid_request_is_answered(conn)
    finally:
        conn.close()


# --- a client that leaves mid-body -------------------------------------------------------------


async def test_client_gone_mid_body_is_one_event_no_traceback_nothing_staged(
    svc: RunningService, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    conn = await Connection.open(svc)
    await conn.send_head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": "100000"})
    conn.writer.write(valid_trace()[:40])
    await conn.writer.drain()
    await asyncio.sleep(0.05)  # pacing: the server is reading the body when the client leaves
    conn.writer.transport.abort()

    metrics = svc.service.metrics
    refused = metrics.requests_refused.labels("http", "traces", "client_disconnected")
    deadline = asyncio.get_running_loop().time() + 10
    while refused._value.get() < 1:
        assert asyncio.get_running_loop().time() < deadline, "no client_disconnected counted"
        await asyncio.sleep(0.02)

    events = [r for r in caplog.records if getattr(r, "event", None) == "client_disconnected"]
    assert len(events) == 1 and events[0].signal == "traces"  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert await staged_rows(database_url) == []
    # The service goes on serving.
    conn = await Connection.open(svc)
    try:
        await valid_request_is_answered(conn)
    finally:
        conn.close()


# --- every codec: a bomb is 413, corrupt is 400, unknown is 415 -------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
async def test_each_codec_bomb_413_corrupt_400_on_one_connection(
    svc: RunningService, database_url: str, name: str
) -> None:
    encode = CODECS[name]
    conn = await Connection.open(svc)
    try:
        bomb = await conn.request(
            "/v1/traces",
            encode(bytes(LIMIT + 1)),
            {"Content-Type": PROTOBUF, "Content-Encoding": name},
        )
        assert bomb.status == 413, bomb
        assert "exceeds the limit" in rpc_status(bomb).message
        corrupt = await conn.request(
            "/v1/traces",
            encode(valid_trace())[:-4],
            {"Content-Type": PROTOBUF, "Content-Encoding": name},
        )
        assert corrupt.status == 400, corrupt
        good = await conn.request(
            "/v1/traces",
            encode(valid_trace()),
            {"Content-Type": PROTOBUF, "Content-Encoding": name},
        )
        assert good.status == 200, good
    finally:
        conn.close()
    assert [r["record_count"] for r in await staged_rows(database_url)] == [2]


# --- bytes in flight at the door ------------------------------------------------------------


def inflight_limited(database_url: str) -> AbstractAsyncContextManager[RunningService]:
    """An ingress whose requests may hold 24 KiB in flight at once."""
    return running_service(
        database_url=database_url,
        role="ingress",
        max_inflight_bytes=24 * 1024,
        log_aggregation_window_s=0,
    )


async def start_slowly(svc: RunningService, slow: Connection, body: bytes) -> InflightBytes:
    """Send ``body``'s head and its first 100 bytes on ``slow``; return once its declared
    length is held (reserved) in flight."""
    await slow.send_head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": str(len(body))})
    slow.writer.write(body[:100])
    await slow.writer.drain()
    inflight = svc.service.inflight
    assert inflight is not None
    deadline = asyncio.get_running_loop().time() + 10
    while inflight.value < len(body):
        assert asyncio.get_running_loop().time() < deadline, "never reserved"
        await asyncio.sleep(0.01)
    return inflight


async def finish_slowly(slow: Connection, body: bytes) -> None:
    """The rest of :func:`start_slowly`'s body: its request is answered 200."""
    slow.writer.write(body[100:])
    await slow.writer.drain()
    assert (await slow.read_answer()).status == 200


async def test_bytes_in_flight_past_the_limit_are_429_before_the_body_is_read(
    database_url: str,
) -> None:
    async with inflight_limited(database_url) as svc:
        body = payloads.traces(300).SerializeToString()
        assert 12 * 1024 < len(body) <= 24 * 1024
        slow, other, chunked = [await Connection.open(svc) for _ in range(3)]
        try:
            # One request's body arrives slowly: its declared length is held meanwhile.
            inflight = await start_slowly(svc, slow, body)

            # Another one that would pass the limit: 429 before its body is read.
            refused = await other.request(
                "/v1/traces", body, {"Content-Type": PROTOBUF, "Content-Length": str(len(body))}
            )
            assert refused.status == 429
            assert refused.headers["retry-after"] == "1"
            assert "MAX_INFLIGHT_BYTES" in rpc_status(refused).message
            # Chunked: refused once its chunks pass the limit.
            await chunked.send_head(
                "/v1/traces", {"Content-Type": PROTOBUF, "Transfer-Encoding": "chunked"}
            )
            await chunked.send_chunks(body, writes=8)
            assert (await chunked.read_answer()).status == 429

            await finish_slowly(slow, body)
            assert inflight.value == 0  # released once answered
            await valid_request_is_answered(other)  # the same connection, served now
        finally:
            for conn in (slow, other, chunked):
                conn.close()
    assert [r["record_count"] for r in await staged_rows(database_url)] == [300, 2]


async def test_a_declared_length_past_the_body_limit_is_413_even_at_the_inflight_limit(
    database_url: str,
) -> None:
    """A request that can never be accepted is told so (413), not to retry (429), even
    while the bytes in flight are at their limit."""
    async with inflight_limited(database_url) as svc:
        body = payloads.traces(300).SerializeToString()
        slow, huge = [await Connection.open(svc) for _ in range(2)]
        try:
            await start_slowly(svc, slow, body)
            await huge.send_head(
                "/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": "10000000000"}
            )
            refused = await huge.read_answer()
            assert refused.status == 413, refused
            assert "retry-after" not in refused.headers
            await finish_slowly(slow, body)
        finally:
            for conn in (slow, huge):
                conn.close()


async def test_a_compressed_body_is_counted_decompressed_too(database_url: str) -> None:
    """A small gzip body of a large payload reserves its decompressed bytes once
    decompressed: past the limit (with another request holding bytes), 429."""
    async with inflight_limited(database_url) as svc:
        body = payloads.traces(300).SerializeToString()
        assert 12 * 1024 < len(body) <= 24 * 1024
        packed = gzip.compress(body)
        assert len(packed) < 12 * 1024
        slow, other = [await Connection.open(svc) for _ in range(2)]
        try:
            inflight = await start_slowly(svc, slow, body)
            # Its compressed bytes fit beside the slow one; its decompressed ones do not.
            refused = await other.request(
                "/v1/traces",
                packed,
                {
                    "Content-Type": PROTOBUF,
                    "Content-Encoding": "gzip",
                    "Content-Length": str(len(packed)),
                },
            )
            assert refused.status == 429
            assert "MAX_INFLIGHT_BYTES" in rpc_status(refused).message
            await finish_slowly(slow, body)
            assert inflight.value == 0
            # Alone, the same gzip request fits (a lone request always does).
            alone = await other.request(
                "/v1/traces",
                packed,
                {
                    "Content-Type": PROTOBUF,
                    "Content-Encoding": "gzip",
                    "Content-Length": str(len(packed)),
                },
            )
            assert alone.status == 200
            assert inflight.value == 0
        finally:
            for conn in (slow, other):
                conn.close()
    assert [r["record_count"] for r in await staged_rows(database_url)] == [300, 300]


# --- answers the router gives (unknown paths, methods) keep the connection too --------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/traces/", 404),  # no redirect: not an OTLP path
        ("POST", "//v1/traces", 404),
        ("POST", "/nope", 404),
        ("TRACE", "/v1/traces", 405),
        ("FOO", "/v1/logs", 405),
    ],
)
async def test_router_answers_before_the_body_keep_the_connection_serving(
    svc: RunningService, method: str, path: str, status: int, front: str
) -> None:
    conn = await Connection.open(svc)
    if front == "serve" and method == "FOO":
        # llhttp (httptools) parses a fixed set of methods: an unknown one is a malformed
        # request, answered 400 with Connection: close before any app sees it.
        try:
            conn.writer.write(b"FOO /v1/logs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            answer = await conn.read_answer()
            assert answer.status == 400 and answer.headers.get("connection") == "close"
        finally:
            conn.close()
        return
    try:
        for chunked in (True, False):
            body = valid_trace() * 10
            if chunked:
                head = {"Content-Type": PROTOBUF, "Transfer-Encoding": "chunked"}
                conn.writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode())
                conn.writer.write("".join(f"{k}: {v}\r\n" for k, v in head.items()).encode())
                conn.writer.write(b"\r\n")
                await conn.send_chunks(body, writes=20)
            else:
                conn.writer.write(
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {PROTOBUF}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                )
                await conn.writer.drain()
                await asyncio.sleep(0.01)  # pacing: the body comes after the head
                conn.writer.write(body)
                await conn.writer.drain()
            answer = await conn.read_answer()
            assert answer.status == status, answer
            assert answer.headers.get("connection") != "close"
            if status == 405:  # our answer, with a Status body, not the router's text
                assert rpc_status(answer).code == otlp.CODE_UNIMPLEMENTED
            await valid_request_is_answered(conn)
    finally:
        conn.close()


async def test_content_encoding_on_several_lines_is_one_list(
    svc: RunningService, database_url: str
) -> None:
    body = zstandard.ZstdCompressor().compress(gzip.compress(valid_trace()))  # gzip, then zstd
    conn = await Connection.open(svc)
    try:
        lines = (
            f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: {PROTOBUF}\r\n"
            "Content-Encoding: gzip\r\nContent-Encoding: zstd\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        conn.writer.write(lines.encode() + body)
        await conn.writer.drain()
        assert (await conn.read_answer()).status == 200
    finally:
        conn.close()
    assert [r["record_count"] for r in await staged_rows(database_url)] == [2]
