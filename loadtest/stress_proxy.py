"""A TCP proxy between the service and the object store, to make it slow or take it away.

It runs its own asyncio loop in a thread, so it keeps its pace whatever the harness's
loop is doing. Three modes, switched at any time:

- ``pass_through()``: bytes flow as they come;
- ``delay(seconds)``: every chunk is delivered ``seconds`` after it arrived, in order, in
  both directions (added latency; throughput stays, so a request/response round trip
  costs two delays);
- ``refuse()``: open connections are cut and new ones are accepted and closed at once
  (the store is down; the client sees a reset or an early EOF).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._delay = 0.0
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.refused = 0
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="stress-proxy", daemon=True)
        started = threading.Event()
        self._started = started
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("proxy did not start")

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80)

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, f"127.0.0.1:{self.port}", parts.path, "", ""))

    # --- modes ---------------------------------------------------------------------------
    def pass_through(self) -> None:
        self._delay = 0.0
        self._refusing = False

    def delay(self, seconds: float) -> None:
        self._refusing = False
        self._delay = seconds

    def refuse(self) -> None:
        self._refusing = True
        self._loop.call_soon_threadsafe(self._cut_all)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._cut_all()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # --- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self._server = await asyncio.start_server(self._handle, sock=sock)
            self.port = sock.getsockname()[1]

        self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def _cut_all(self) -> None:
        for writer in list(self._conns):
            _reset(writer)
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels handlers; ending quietly spares asyncio's stream callback
            # from logging the cancellation as an error.
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            _reset(writer)
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._conns.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            for w in (writer, up_writer):
                self._conns.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; with a delay, each chunk leaves ``delay`` after it came."""
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await pending.get()
                if not chunk:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._refusing:
                    raise ConnectionResetError("proxy refusing")
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                chunk = await reader.read(65536)
                if self._refusing:
                    raise ConnectionResetError("proxy refusing")
                pending.put_nowait((time.monotonic() + self._delay, chunk))
                if not chunk:
                    break
            await sender
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: an abrupt outage, not an orderly close."""
    transport = writer.transport
    with contextlib.suppress(Exception):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
