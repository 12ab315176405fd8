"""uvicorn's httptools protocol, guarded against slow and idle clients.

uvicorn has no deadline for a request head (its keep-alive timer is reset by every byte,
so a client that sends a header line every few seconds holds the connection for ever), none
for a body, and no cap on connections. Here, per connection, one timer at a time
(``loop.call_later``, never a task):

- **head**: from the connection's start (or the first byte of the next request on a
  kept-alive one), the head must be complete within ``HTTP_HEADER_TIMEOUT_S``; else 408
  with ``Connection: close`` (or a plain close, when nothing was sent);
- **body**: in the spirit of Apache's mod_reqtimeout ``body=20,MinRate=500``: the body
  must have arrived within ``HTTP_BODY_TIMEOUT_S`` plus one second per
  ``HTTP_BODY_MIN_RATE_BYTES`` received; else 408 with ``Connection: close``, and the
  app's read ends as if the client had left (nothing of it is staged). Time while the
  server itself has stopped reading (flow control: the app is behind) is not held against
  the client;
- **connections**: past ``max_connections`` open ones, a new connection is answered 503
  with ``Retry-After`` and ``Connection: close`` before anything is read, and counted.

The idle keep-alive timeout is uvicorn's own (``timeout_keep_alive``). At shutdown,
:meth:`GuardedProtocol.abandon_body` answers a request still being read 503 with
``Retry-After`` (nothing of it was kept), without cancelling its task.

An answer the protocol gives itself marks the request's cycle as answered and gone, so
that the app's next ``receive()`` is ``http.disconnect`` and anything it still sends is
dropped; the scope's ``extensions`` say ``otelworker.answered`` so that the app does not
count it as a client that left. Each such answer ends in a lingering close (FIN, then
what still arrives is read and dropped for a moment), never a reset that could destroy it.
A request the parser refuses is a bare 400 and close, as hypercorn's h11 answers it.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from otelworker import otlp

ANSWERED = "otelworker.answered"  # a key of the scope's "extensions": the protocol answered
_DEADLINE_EXCEEDED = 4  # google.rpc.Code, the Status body of a 408
# After an answer of the protocol's own: how long it reads on before it closes.
LINGER_S = 1.0
# A connection refused past the cap: until its request's first bytes arrive, at most this.
REFUSED_LINGER_S = 0.25


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float
    body_timeout_s: float
    body_min_rate: int  # bytes per second
    max_connections: int


class Door:
    """What the protocols of one server share: the limits and the hooks that count."""

    def __init__(
        self,
        limits: Limits,
        *,
        timed_out: Callable[[str, dict[str, Any] | None], None] = lambda reason, scope: None,
        refused: Callable[[], None] = lambda: None,
        abandoned: Callable[[dict[str, Any]], None] = lambda scope: None,
        retry_after_s: int = 5,
    ) -> None:
        self.limits = limits
        self.timed_out = timed_out
        self.refused = refused
        self.abandoned = abandoned
        self.retry_after_s = retry_after_s


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()


def _raw_answer(
    status: int,
    body: bytes,
    content_type: bytes,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    lines = [
        _status_line(status),
        b"content-type: " + content_type + b"\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        *(name + b": " + value + b"\r\n" for name, value in extra),
        b"connection: close\r\n\r\n",
        body,
    ]
    return b"".join(lines)


_REFUSED_CONNECTION = b"".join(
    [
        _status_line(503),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"retry-after: 1\r\n",
        b"content-length: 33\r\n",
        b"connection: close\r\n\r\n",
        b"too many open connections; retry\n",
    ]
)


def _encoding_of(headers: list[tuple[bytes, bytes]] | None) -> otlp.Encoding:
    for name, value in headers or ():
        if name == b"content-type":
            media = value.split(b";")[0].strip().lower()
            return otlp.JSON if media == b"application/json" else otlp.PROTOBUF
    return otlp.PROTOBUF


class _HeadWithBody:
    """A request cycle's view of the connection's transport: a response's head is held
    until the cycle's next write (its body, in the same pass of the loop) and goes out
    with it, one ``send()`` instead of two: that second system call was ~5 % of a small
    export's CPU (docs/performance.md). Held at most until the loop's next pass (a HEAD
    answer, a body that has to wait), never reordered: every write of the cycle comes
    through here, and the protocol flushes it before writing anything of its own."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol with a head deadline, a body minimum rate and a cap on
    open connections (see the module's docstring). ``door`` is set by :func:`protocol_for`."""

    door: Door

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._closing = False  # answered and closing: what still arrives is read and dropped
        self._head_begun = False  # a byte of the current request's head has arrived
        self._body_start = 0.0
        self._body_seen = 0
        self._paused_s = 0.0  # time the server itself was not reading the body

    # --- connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.door.limits.max_connections:
            self._refused = True
            self.transport = transport
            self.door.refused()
            transport.write(_REFUSED_CONNECTION)
            # Briefly: a flood past the cap must not hold descriptors for long.
            self._close_lingering(REFUSED_LINGER_S)
            return
        super().connection_made(transport)
        self._arm(self.door.limits.header_timeout_s, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self.transport.close()  # its request is read (dropped): the close is clean
            return
        if self._closing or self.parser is None:
            return
        super().data_received(data)

    def _flush_cycle(self) -> None:
        """What the current request's cycle holds goes out before the protocol writes."""
        cycle = self.cycle
        if cycle is not None and isinstance(cycle.transport, _HeadWithBody):
            cycle.transport.flush()

    def _close_lingering(self, linger_s: float = 0.0) -> None:
        """Close after the answer without a reset: send FIN, read and drop what the
        client still sends for ``linger_s`` (:data:`LINGER_S`; or until its own FIN), then
        close. A close with unread bytes would reset the connection, and the reset can
        destroy the answer before the client reads it."""
        self._closing = True
        self._disarm()
        self._flush_cycle()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(linger_s or LINGER_S, self.transport.close)

    # --- parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._timer is None:  # the next request on a kept-alive connection
            self._arm(self.door.limits.header_timeout_s, self._head_expired)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_begun = False
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = _HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]
        self._body_start = self.loop.time()
        self._body_seen = 0
        self._paused_s = 0.0
        self._arm(self.door.limits.body_timeout_s, self._body_check)

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._disarm()  # answered before its body was read whole: uvicorn drops the rest
        super().on_response_complete()

    # --- timers -----------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun and self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; its next head has not begun
        self.door.timed_out("header", None)
        self._flush_cycle()
        if self._head_begun:
            seconds = self.door.limits.header_timeout_s
            body = f"request head not received within {seconds:g} s\n".encode()
            self.transport.write(_raw_answer(408, body, b"text/plain; charset=utf-8"))
            self._unset_keepalive_if_required()
            self._close_lingering()
            return
        self._unset_keepalive_if_required()
        self.transport.close()  # nothing was sent, nothing answered: no need to linger

    def _body_check(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or cycle.response_complete:
            return
        limits = self.door.limits
        now = self.loop.time()
        if self.flow.read_paused:
            # Not the client's delay: the app has not taken what was read. Look again later.
            self._paused_s += 1.0
            self._arm(1.0, self._body_check)
            return
        allowed = (
            self._body_start
            + self._paused_s
            + limits.body_timeout_s
            + self._body_seen / limits.body_min_rate
        )
        if now < allowed:
            self._arm(allowed - now, self._body_check)
            return
        self.door.timed_out("body", cycle.scope)  # type: ignore[arg-type]
        message = (
            f"request body slower than {limits.body_min_rate} bytes/s after"
            f" {limits.body_timeout_s:g} s; nothing of it was kept"
        )
        self._answer(408, _DEADLINE_EXCEEDED, message)

    # --- answers of the protocol's own -----------------------------------------------------

    def _answer(
        self,
        status: int,
        code: int,
        message: str,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Answer the current request here (unless its answer has begun) and close."""
        cycle = self.cycle
        self._flush_cycle()
        if cycle is not None and not cycle.response_started:
            encoding = _encoding_of(self.headers)
            body = otlp.status_body(code, message, encoding)
            self.transport.write(_raw_answer(status, body, encoding.content_type.encode(), extra))
            scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
            scope.setdefault("extensions", {})[ANSWERED] = status
            cycle.response_started = cycle.response_complete = True
            cycle.disconnected = True  # what the app sends from now on is dropped
            cycle.keep_alive = False
            cycle.message_event.set()  # its receive() ends: http.disconnect
        self._unset_keepalive_if_required()
        self._close_lingering()

    def abandon_body(self) -> bool:
        """At the end of the shutdown grace: a request still being read is answered 503
        (Retry-After; nothing of it was kept). True when one was."""
        cycle = self.cycle
        if (
            self._refused
            or self._closing
            or cycle is None
            or cycle.response_started
            or not cycle.more_body
            or self.transport.is_closing()
        ):
            return False
        self.door.abandoned(cycle.scope)  # type: ignore[arg-type]
        retry_after = str(self.door.retry_after_s).encode()
        self._answer(
            503,
            otlp.CODE_UNAVAILABLE,
            "service shutting down before the request was read whole; nothing of it was"
            " kept, retry later",
            ((b"retry-after", retry_after),),
        )
        return True

    def send_400_response(self, msg: str) -> None:
        """A request the parser refuses (malformed framing, an unknown method): a bare 400
        and close, as hypercorn's h11 answers it (no app saw it; uvicorn's own adds a text
        body and logs a warning per request)."""
        self._disarm()
        self._flush_cycle()
        self.transport.write(_status_line(400) + b"content-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()

    def shutdown(self) -> None:
        if self._refused:
            return
        super().shutdown()


def protocol_for(door: Door) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` class bound to ``door``, for uvicorn's ``Config.http``."""
    return type("OtelworkerHttpProtocol", (GuardedProtocol,), {"door": door})
