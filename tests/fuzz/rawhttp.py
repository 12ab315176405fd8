"""A small HTTP/1.1 client over one keep-alive socket, for the fuzz suite.

It sends the request bytes exactly as given (odd headers, chunked bodies, duplicate
framing headers: whatever a test builds) and parses the answer strictly, reading from one
buffer that lives as long as the connection, so a stray byte the server sends after a
response shows up as a malformed next response instead of being lost.

    client = RawClient("127.0.0.1", port, timeout=5.0)
    reply = client.exchange(raw_bytes)      # Reply(status, headers, body, ...)
    client.reconnect()                      # after a reply that announced Connection: close

A read that waits longer than ``timeout`` raises :class:`Stall`; the server closing the
connection before a whole response arrived raises :class:`ClosedEarly`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

MAX_HEAD = 256 * 1024  # a response head longer than this is not a response
IDLE_RECONNECT_S = 2.0  # hypercorn closes idle keep-alive connections after 5 s
WRITE_PAUSE_S = 0.002  # between the writes of one request: separate TCP segments


class TransportFailure(AssertionError):
    """The connection misbehaved (the server's fault: see the subclasses)."""


class Stall(TransportFailure):
    """No (complete) answer within the timeout."""


class ClosedEarly(TransportFailure):
    """The server closed (or reset) the connection before a whole response arrived."""


class Malformed(TransportFailure):
    """The bytes the server sent are not an HTTP/1.1 response."""


@dataclass
class Reply:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this one

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    @property
    def announces_close(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" not in tokens
        return "close" in tokens

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 600 else self.body[:600] + b"..."
        return f"Reply({self.status} {self.reason!r}, headers={self.headers!r}, body={body!r})"


class RawClient:
    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.last_used = 0.0
        self.connections = 0  # how many times a connection was opened

    # --- connection --------------------------------------------------------------------

    def connect(self) -> None:
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.last_used = time.monotonic()
        self.connections += 1

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None

    def reconnect(self) -> None:
        self.connect()

    def ensure_fresh(self) -> None:
        """Open a connection if there is none or it sat idle long enough to be closed."""
        if self.sock is None or time.monotonic() - self.last_used > IDLE_RECONNECT_S:
            self.connect()

    # --- one request, one response -----------------------------------------------------

    def exchange(self, raw: bytes | list[bytes], *, head_request: bool = False) -> Reply:
        """Send ``raw`` (or its pieces, one write each, a moment apart) on the current
        connection and read one final response."""
        assert self.sock is not None, "not connected"
        pieces = [raw] if isinstance(raw, bytes) else raw
        try:
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(WRITE_PAUSE_S)
                self.sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may have answered early and closed; read what it said
        except TimeoutError:
            raise Stall(f"the server stopped reading the request for {self.timeout} s") from None
        try:
            reply = self._read_response(head_request)
        finally:
            self.last_used = time.monotonic()
        return reply

    def _fill(self) -> None:
        assert self.sock is not None
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise Stall(f"no (complete) response within {self.timeout} s") from None
        except ConnectionResetError:
            raise ClosedEarly("connection reset before a complete response") from None
        if not chunk:
            raise ClosedEarly("connection closed before a complete response")
        self.buffer += chunk

    def _read_line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if len(self.buffer) > MAX_HEAD:
                raise Malformed(f"response line longer than {MAX_HEAD} bytes")
            self._fill()

    def _read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def _read_to_eof(self) -> bytes:
        while True:
            try:
                self._fill()
            except ClosedEarly:
                data = bytes(self.buffer)
                self.buffer.clear()
                return data

    def _read_head(self) -> tuple[str, int, str, list[tuple[str, str]]]:
        status_line = self._read_line()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise Malformed(f"not a status line: {status_line[:200]!r}")
        version = parts[0].decode("ascii")
        status = int(parts[1])
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        headers = []
        while True:
            line = self._read_line()
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise Malformed(f"not a header line: {line[:200]!r}")
            headers.append(
                (name.decode("latin-1").strip().lower(), value.decode("latin-1").strip())
            )
        return version, status, reason, headers

    def _read_response(self, head_request: bool) -> Reply:
        interim = []
        while True:
            version, status, reason, headers = self._read_head()
            if 100 <= status < 200:
                interim.append(status)
                continue
            break
        reply = Reply(status, reason, version, headers, b"", interim)
        if head_request or status in (204, 304):
            return reply
        te = (reply.header("transfer-encoding") or "").lower()
        length = reply.header("content-length")
        if "chunked" in te:
            reply.body = self._read_chunked()
        elif length is not None:
            if not length.isdigit():
                raise Malformed(f"bad Content-Length in the response: {length!r}")
            reply.body = self._read_exact(int(length))
        else:
            reply.body = self._read_to_eof()
            reply.headers.append(("x-fuzz-body-delimited-by", "close"))
        return reply

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = self._read_line().split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise Malformed(f"bad chunk size line {size_line!r}") from None
            if size == 0:
                while self._read_line():  # trailers
                    pass
                return bytes(body)
            body += self._read_exact(size)
            if self._read_exact(2) != b"\r\n":
                raise Malformed("chunk not followed by CRLF")
