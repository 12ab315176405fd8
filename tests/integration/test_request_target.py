"""Request targets in absolute form (RFC 9112 section 3.2.2: ``POST http://host:4318/v1/traces
HTTP/1.1``, which a server MUST accept), over a raw socket against a running server: served
as their origin form, answered 200 and staged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from otelworker.app import origin_form
from tests.support import payloads
from tests.support.server import FRONTS, RunningService, front_as, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, params=FRONTS)
def front(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test against both entries: the bare hypercorn one and serve's uvicorn front."""
    with front_as(request.param):
        yield request.param


PROTOBUF = "application/x-protobuf"


@pytest.fixture
async def svc(database_url: str) -> AsyncIterator[RunningService]:
    async with running_service(database_url=database_url, role="ingress") as running:
        yield running


async def _exchange(svc: RunningService, head: str, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            fields = (line.partition(":") for line in lines)
            headers = {key.strip().lower(): value.strip() for key, _, value in fields}
            answer = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), answer
    finally:
        writer.close()


async def _staged(dsn: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT signal, record_count FROM ingestion_queue ORDER BY id")
        return [(r["signal"], r["record_count"]) for r in rows]
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "target",
    [
        "http://{authority}/v1/traces",
        "HTTP://{authority}/v1/%74races",  # the scheme is case-insensitive; percent-encoding
        "https://collector.example:443/v1/traces",  # another authority: Host is not checked
    ],
)
async def test_absolute_form_export_is_answered_and_staged(
    svc: RunningService, database_url: str, target: str
) -> None:
    body = payloads.traces(3).SerializeToString()
    target = target.format(authority=f"127.0.0.1:{svc.port}")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\n"
        f"Content-Type: {PROTOBUF}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    status, _ = await _exchange(svc, head, body)
    assert status == 200
    assert await _staged(database_url) == [("traces", 3)]


async def test_absolute_form_probe_and_unknown_path(svc: RunningService) -> None:
    authority = f"127.0.0.1:{svc.port}"
    ready = f"GET http://{authority}/readyz HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    assert (await _exchange(svc, ready))[0] == 200
    unknown = f"GET http://{authority}/nothing HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    assert (await _exchange(svc, unknown))[0] == 404


@pytest.mark.parametrize(
    ("path", "raw_path", "expected"),
    [
        ("http://h:1/v1/logs", b"http://h:1/v1/logs", ("/v1/logs", b"/v1/logs")),
        ("http://h", b"http://h", ("/", b"/")),
        ("http://h/a/b", b"http://h/a%2Fb", ("/a/b", b"/a%2Fb")),
        ("*", b"*", ("*", b"*")),  # asterisk-form: not ours to rewrite (a 404)
        ("ftp://h/v1/logs", b"ftp://h/v1/logs", ("ftp://h/v1/logs", b"ftp://h/v1/logs")),
    ],
)
def test_origin_form(path: str, raw_path: bytes, expected: tuple[str, bytes]) -> None:
    scope = {"type": "http", "path": path, "raw_path": raw_path}
    origin_form(scope)
    assert (scope["path"], scope["raw_path"]) == expected
