"""serve's HTTP front against slow and idle clients (otelworker/front/protocol.py), with
short bounds: a head that trickles is 408 and closed, a silent connection closed, a body
under the minimum rate 408 and closed with nothing staged, a slow but steady body
accepted, and connections past the cap answered 503 and counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from google.rpc import status_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_hostile import Connection, staged_rows, valid_trace
from tests.support.server import RunningService, running_service

pytestmark = pytest.mark.integration

HEAD_S = 1.0
BODY_S = 1.0
MIN_RATE = 2000
CAP = 6
PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
async def svc(database_url: str) -> AsyncIterator[RunningService]:
    async with running_service(
        front="serve",
        database_url=database_url,
        role="ingress",
        http_header_timeout_s=HEAD_S,
        http_body_timeout_s=BODY_S,
        http_body_min_rate_bytes=MIN_RATE,
        http_max_connections=CAP,
    ) as running:
        yield running


async def samples(svc: RunningService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{svc.url}/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def timed_out(svc: RunningService, reason: str) -> float:
    key = ("otelworker_http_requests_timed_out_total", (("reason", reason),))
    return (await samples(svc)).get(key, 0.0)


async def ends_within(conn: Connection, seconds: float) -> bytes:
    """Everything the server sends until it closes, which it must within ``seconds``."""
    received = b""
    async with asyncio.timeout(seconds):
        while chunk := await conn.reader.read(65536):
            received += chunk
    return received


async def trickle(conn: Connection, pieces: list[bytes], every_s: float) -> None:
    for piece in pieces:
        try:
            conn.writer.write(piece)
            await conn.writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every_s)


async def test_a_trickling_head_is_408_and_closed(svc: RunningService) -> None:
    conn = await Connection.open(svc)
    lines = [b"POST /v1/traces HTTP/1.1\r\n"] + [f"X-Pad-{i}: y\r\n".encode() for i in range(50)]
    sender = asyncio.create_task(trickle(conn, lines, 0.2))
    started = time.monotonic()
    try:
        received = await ends_within(conn, HEAD_S + 3)
    finally:
        sender.cancel()
        conn.close()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in received
    assert HEAD_S - 0.1 <= time.monotonic() - started < HEAD_S + 3
    assert await timed_out(svc, "header") == 1


async def test_a_silent_connection_is_closed(svc: RunningService) -> None:
    conn = await Connection.open(svc)
    try:
        assert await ends_within(conn, HEAD_S + 3) == b""
    finally:
        conn.close()


async def test_a_body_under_the_minimum_rate_is_408_and_nothing_is_staged(
    svc: RunningService, database_url: str
) -> None:
    conn = await Connection.open(svc)
    await conn.send_head("/v1/traces", {**PROTOBUF, "Content-Length": "100000"})
    sender = asyncio.create_task(trickle(conn, [b"x"] * 100, 0.2))
    try:
        received = await ends_within(conn, BODY_S + 4)
    finally:
        sender.cancel()
        conn.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in head
    assert status_pb2.Status.FromString(body).code == 4  # DEADLINE_EXCEEDED
    values = await samples(svc)
    assert values[("otelworker_http_requests_timed_out_total", (("reason", "body"),))] == 1
    assert (
        values.get(
            (
                "otelworker_requests_refused_total",
                (("reason", "client_disconnected"), ("signal", "traces"), ("transport", "http")),
            ),
            0.0,
        )
        == 0
    )
    assert await staged_rows(database_url) == []


async def test_a_slow_steady_body_and_a_kept_alive_connection_are_served(
    svc: RunningService, database_url: str
) -> None:
    body = valid_trace() * 20  # a few KB more than BODY_S at MIN_RATE: past the first bound
    assert len(body) > BODY_S * MIN_RATE
    conn = await Connection.open(svc)
    try:
        await conn.send_head("/v1/traces", {**PROTOBUF, "Content-Length": str(len(body))})
        step = MIN_RATE // 4  # twice the minimum rate
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        await trickle(conn, pieces, 0.125)
        answer = await conn.read_answer()
        assert answer.status == 200, answer
        await asyncio.sleep(HEAD_S + 0.5)  # idle, kept alive (HTTP_KEEP_ALIVE_TIMEOUT_S)
        answer = await conn.request("/v1/traces", valid_trace(), PROTOBUF)
        assert answer.status == 200, answer
    finally:
        conn.close()
    assert len(await staged_rows(database_url)) == 2


async def test_connections_past_the_cap_are_refused_503_and_counted(
    svc: RunningService,
) -> None:
    held = [await Connection.open(svc) for _ in range(CAP)]
    try:
        await asyncio.sleep(0.1)
        extra = await Connection.open(svc)
        try:
            received = await ends_within(extra, 3)
        finally:
            extra.close()
        assert received.startswith(b"HTTP/1.1 503 "), received
        assert b"retry-after: 1" in received
    finally:
        for conn in held:
            conn.close()
    await asyncio.sleep(0.2)
    values = await samples(svc)
    assert values[("otelworker_http_connections_refused_total", ())] == 1
    assert values[("otelworker_http_open_connections", ())] == 1  # the scrape's own


async def test_an_idle_kept_alive_connection_is_closed(database_url: str) -> None:
    async with running_service(
        front="serve", database_url=database_url, role="ingress", http_keep_alive_timeout_s=1.0
    ) as svc:
        conn = await Connection.open(svc)
        try:
            answer = await conn.request("/v1/traces", valid_trace(), PROTOBUF)
            assert answer.status == 200
            started = time.monotonic()
            assert await ends_within(conn, 4) == b""
            assert 0.8 <= time.monotonic() - started < 4
        finally:
            conn.close()
