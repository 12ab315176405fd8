"""serve's protocol writes a response's head and body in one ``send()``
(``otelworker.front.protocol._HeadWithBody``), without reordering or losing a byte: the
mechanism on a recording transport, then whole exchanges through a real uvicorn server."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from otelworker.front.protocol import Door, Limits, _HeadWithBody, protocol_for
from tests.unit.test_buffer_poller import until


class _Recording:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


async def test_a_head_goes_out_with_its_body_in_one_write() -> None:
    transport = _Recording()
    held = _HeadWithBody(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert transport.writes == []
    held.write(b"ok")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    held.write(b"more")  # not a head: straight through
    assert transport.writes[-1] == b"more"
    assert held.get_extra_info("peername") == "extra peername"  # the rest is the transport's


async def test_a_head_without_a_body_goes_out_on_the_next_pass_and_before_a_close() -> None:
    loop = asyncio.get_running_loop()
    transport = _Recording()
    held = _HeadWithBody(transport, loop)  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")  # a HEAD answer
    await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]
    held.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    held.close()
    assert transport.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n" and transport.closed
    held.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # an interim answer is never held
    assert transport.writes[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    headers = [(b"content-type", b"text/plain")]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    answer = b"got " + str(len(body)).encode()
    headers.append((b"content-length", str(len(answer)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    writer.close()
    return data


async def test_whole_exchanges_through_serves_protocol(monkeypatch: Any) -> None:
    sends: list[bytes] = []  # what reached the connection's transport, write by write
    original = _HeadWithBody.__init__

    def recording(self: _HeadWithBody, transport: Any, loop: Any) -> None:
        real_write = transport.write

        class _Spy:
            def write(self, data: bytes) -> None:
                sends.append(data)
                real_write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

        original(self, _Spy(), loop)  # type: ignore[arg-type]

    monkeypatch.setattr(_HeadWithBody, "__init__", recording)
    door = Door(Limits(10.0, 10.0, 500, 100))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app, http=protocol_for(door), lifespan="off", log_level="warning", loop="asyncio"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started, 10, "the server to start")
        # Two pipelined requests, the second asking to close: both answers, in order.
        data = await _exchange(
            port,
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
            b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
        )
        first, _, rest = data.partition(b"got 3")
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5" in first
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"got 5")
        # Each answer went out in one write: its head and its body together.
        assert len(sends) == 2 and sends[0].endswith(b"got 3") and sends[1].endswith(b"got 5")
        # HEAD: a head and no body, still sent.
        data = await _exchange(port, b"HEAD /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n")
        # A streamed answer: the head with its first chunk, the rest after, in order.
        data = await _exchange(
            port, b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        head, _, chunked = data.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head
        assert chunked == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
