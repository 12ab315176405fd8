"""Request bodies: bounded reads, bounded decompression, and the end of a refused body.

Neither the body as received nor the body after decompression may pass
``MAX_REQUEST_BODY_BYTES``; a compression bomb is cut off at the limit and never expands
in memory beyond it, in any codec.

An answer given before the body is read whole must still leave the connection usable:
:class:`DrainUnreadBody` reads (and discards) the rest of a small body before the answer
goes out, and sends a large one's answer with ``Connection: close`` while it keeps reading
for a moment, so the client gets a clean end instead of a reset or a stalled keep-alive.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable

import cramjam
import zstandard
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otelworker.exceptions import OtelWorkerError

CHUNK = 64 * 1024
MiB = 1024 * 1024


class BodyTooLarge(OtelWorkerError):
    """The body exceeds MAX_REQUEST_BODY_BYTES (as received or decompressed)."""


class BadEncoding(OtelWorkerError):
    """The compressed stream is corrupt or truncated."""


class UnsupportedEncoding(OtelWorkerError):
    """The Content-Encoding names a coding this service does not decode (415)."""


class InflightFull(OtelWorkerError):
    """The bytes in flight at the door would pass MAX_INFLIGHT_BYTES (429)."""


async def read_limited(
    stream: AsyncIterator[bytes],
    limit: int,
    declared: int | None,
    reserve: Callable[[int], bool] | None = None,
) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes.

    ``reserve``, when given, is asked for each chunk's bytes as it arrives (for a body
    whose length was not declared and reserved up front); a refusal raises InflightFull.
    """
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"Content-Length {declared} exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        if reserve is not None and not reserve(len(chunk)):
            raise InflightFull("request bytes in flight at their limit")
        parts.append(chunk)
    return b"".join(parts)


# --- codecs ---------------------------------------------------------------------------------


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"decompressed body exceeds the limit of {limit} bytes")


def _inflate(data: bytes, limit: int, wbits: int, name: str) -> bytes:
    """zlib's inflate in bounded steps; gzip (``wbits=31``) may hold several members."""
    out: list[bytes] = []
    size = 0
    pending = data
    while pending:
        inflater = zlib.decompressobj(wbits=wbits)
        while True:
            try:
                piece = inflater.decompress(pending, limit + 1 - size)
            except zlib.error as exc:
                raise BadEncoding(f"corrupt {name} stream: {exc}") from None
            size += len(piece)
            if size > limit:
                raise _too_large(limit)
            out.append(piece)
            pending = inflater.unconsumed_tail
            if inflater.eof or not pending:
                break
        if not inflater.eof:
            raise BadEncoding(f"truncated {name} stream")
        if wbits != 31:
            if inflater.unused_data:
                raise BadEncoding(f"trailing bytes after the {name} stream")
            break
        # A gzip file may hold several members back to back.
        pending = inflater.unused_data
    return b"".join(out)


def _gunzip(data: bytes, limit: int) -> bytes:
    return _inflate(data, limit, 31, "gzip")


def _is_zlib_header(data: bytes) -> bool:
    """RFC 1950: CM 8 (deflate), a window of at most 32 KiB, and the header check bits."""
    return (
        len(data) >= 2
        and data[0] & 0x0F == 8
        and data[0] >> 4 <= 7
        and ((data[0] << 8) | data[1]) % 31 == 0
    )


def _deflate(data: bytes, limit: int) -> bytes:
    """``deflate`` and ``zlib``: zlib-wrapped (RFC 9110 §8.4.1.2), or raw deflate, which
    some clients send under either name; the zlib header tells them apart."""
    if _is_zlib_header(data):
        return _inflate(data, limit, 15, "deflate")
    return _inflate(data, limit, -15, "deflate")


def _unzstd(data: bytes, limit: int) -> bytes:
    dctx = zstandard.ZstdDecompressor()
    try:
        # Pass 1, bounded: count the output without keeping it, so a bomb stops at the limit.
        reader = dctx.stream_reader(data, read_across_frames=True)
        size = 0
        while piece := reader.read(CHUNK):
            size += len(piece)
            if size > limit:
                raise _too_large(limit)
        # Pass 2: the output fits; decompress frame by frame and insist that each one ends
        # (a stream reader returns a truncated frame's prefix without complaint).
        out: list[bytes] = []
        pending = data
        while pending:
            frame = dctx.decompressobj()
            out.append(frame.decompress(pending))
            if not frame.eof:
                raise BadEncoding("truncated zstd stream")
            pending = frame.unused_data
    except zstandard.ZstdError as exc:
        raise BadEncoding(f"corrupt zstd stream: {exc}") from None
    return b"".join(out)


# cramjam's one-shot decoders write into a buffer we size; a full one says so in this text
# (Rust's io::ErrorKind::WriteZero; a truncated input is "failed to fill whole buffer").
_FULL_BUFFER = "failed to write whole buffer"


def _into_bounded(
    decode: Callable[[bytes, bytearray], int], data: bytes, limit: int, name: str
) -> bytes:
    """Decode into a buffer that grows 4x from a guess, never past ``limit + 1`` bytes.

    The memory of a bomb stays within the limit; the work stays within a few passes over
    at most the limit's worth of output.
    """
    size = min(limit + 1, max(CHUNK, 8 * len(data)))
    while True:
        buffer = bytearray(size)
        try:
            written = decode(data, buffer)
        except (cramjam.DecompressionError, OSError) as exc:
            if _FULL_BUFFER not in str(exc):
                raise BadEncoding(f"corrupt {name} stream: {exc}") from None
            if size > limit:
                raise _too_large(limit) from None
            size = min(limit + 1, size * 4)
            continue
        if written > limit:
            raise _too_large(limit)
        return bytes(memoryview(buffer)[:written])


_SNAPPY_FRAMED_MAGIC = b"\xff\x06\x00\x00sNaPpY"


def _snappy_block_length(data: bytes) -> int:
    """The uncompressed length a snappy block declares in its leading varint."""
    length = 0
    for i, byte in enumerate(data[:5]):
        length |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return length
    raise BadEncoding("corrupt snappy block: bad length header")


def _snappy_block(data: bytes, limit: int) -> bytes:
    """The block format declares its length up front: a bomb is refused before any work."""
    if not data:
        return b""
    length = _snappy_block_length(data)
    if length > limit:
        raise _too_large(limit)
    buffer = bytearray(length)
    try:
        written = cramjam.snappy.decompress_raw_into(data, buffer)
    except (cramjam.DecompressionError, OSError) as exc:
        raise BadEncoding(f"corrupt snappy block: {exc}") from None
    if written != length:
        raise BadEncoding("corrupt snappy block: shorter than its declared length")
    return bytes(buffer)


def _snappy_framed(data: bytes, limit: int) -> bytes:
    if not data:
        return b""
    if not data.startswith(_SNAPPY_FRAMED_MAGIC):
        raise BadEncoding("corrupt snappy stream: no x-snappy-framed stream identifier")
    return _into_bounded(cramjam.snappy.decompress_into, data, limit, "snappy")


def _snappy(data: bytes, limit: int) -> bytes:
    """The block format the Collector sends; a framed stream is told by its identifier."""
    if data.startswith(_SNAPPY_FRAMED_MAGIC):
        return _snappy_framed(data, limit)
    return _snappy_block(data, limit)


def _lz4(data: bytes, limit: int) -> bytes:
    return _into_bounded(cramjam.lz4.decompress_into, data, limit, "lz4")


Decoder = Callable[[bytes, int], bytes]

# Content-Encoding names (case-insensitive) and their decoders; `identity` decodes nothing.
DECODERS: dict[str, Decoder] = {
    "gzip": _gunzip,
    "x-gzip": _gunzip,
    "zstd": _unzstd,
    "deflate": _deflate,
    "zlib": _deflate,
    "snappy": _snappy,
    "x-snappy-framed": _snappy_framed,
    "lz4": _lz4,
}
SUPPORTED = ("identity", *DECODERS)
# More codings than this in one header is no client's real need, only a cost.
MAX_CODINGS = 4


def codings(content_encoding: str) -> list[Decoder]:
    """The decoders to undo ``Content-Encoding``, in order: the last coding applied first.

    RFC 9110 §8.4: the header lists the codings in the order they were applied, so they
    come off in reverse. ``identity`` (and empty list members) are no coding. An unknown
    coding raises :class:`UnsupportedEncoding` (415), naming what is supported.
    """
    names = [n.strip().lower() for n in content_encoding.split(",")]
    names = [n for n in names if n and n != "identity"]
    unknown = [n for n in names if n not in DECODERS]
    if unknown:
        raise UnsupportedEncoding(
            f"unsupported Content-Encoding {unknown[0][:40]!r}; supported: {', '.join(SUPPORTED)}"
        )
    if len(names) > MAX_CODINGS:
        raise UnsupportedEncoding(
            f"Content-Encoding lists {len(names)} codings; at most {MAX_CODINGS} are decoded"
        )
    return [DECODERS[n] for n in reversed(names)]


def decompress(data: bytes, content_encoding: str | list[Decoder], limit: int) -> bytes:
    """Undo every coding of ``Content-Encoding`` (a header value, or :func:`codings`)."""
    decoders = codings(content_encoding) if isinstance(content_encoding, str) else content_encoding
    for decode in decoders:
        data = decode(data, limit)
    return data


# --- answers given before the body is read whole ----------------------------------------

# Reading and dropping up to this much of a refused body is cheaper than the client's new
# connection (a TCP and often a TLS handshake); beyond it, or a body slower than the
# deadline, the answer closes the connection instead.
DRAIN_MAX_BYTES = 1 * MiB
DRAIN_DEADLINE_S = 5.0
# After `Connection: close`, the body is still read (and dropped) this long, so that the
# close does not reset a client still sending (a "lingering close", as nginx does).
LINGER_S = 2.0
# Answered at once with `Connection: close`: the body is over the limit (not worth
# reading), or the service is stopping (the client had better reconnect elsewhere).
_CLOSE_AT_ONCE = frozenset({413, 503})
_HTTP1 = ("1.0", "1.1")


class DrainUnreadBody:
    """ASGI middleware: no answer leaves a request body unread on a kept-alive connection.

    Whoever answers before the body is read whole (our refusals, Starlette's own 404 and
    405), the answer goes out so that the next request on the connection is never stalled
    behind the unread body (hypercorn stops reading it once its queue to the app is full)
    nor met by a reset:

    - a 405/415/429/...: the rest of the body is read and dropped first (at most
      :data:`DRAIN_MAX_BYTES` and :data:`DRAIN_DEADLINE_S`), then the answer goes out and
      the connection stays open;
    - a body larger or slower than that, a declared Content-Length over the drain bound,
      a 413 or a 503: the answer goes out at once with ``Connection: close`` (HTTP/1.x;
      HTTP/2 ends the stream by itself), then the body is read on for at most
      :data:`LINGER_S` (and ``MAX_REQUEST_BODY_BYTES``) before the server closes.

    An answer after the whole body was read passes straight through.
    """

    def __init__(self, app: ASGIApp, limit: Callable[[Scope], int] | None = None) -> None:
        self.app = app
        self._limit = limit or (lambda scope: 16 * MiB)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ended = False
        close = False

        async def tracked() -> Message:
            nonlocal ended
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                ended = True
            return message

        async def guarded(message: Message) -> None:
            nonlocal close, ended
            if ended and not close:
                await send(message)
                return
            if message["type"] == "http.response.start":
                limit = self._limit(scope)
                drain_max = min(limit, DRAIN_MAX_BYTES)
                declared = _content_length(scope)
                close = message["status"] in _CLOSE_AT_ONCE or (
                    declared is not None and declared > drain_max
                )
                if not close:
                    ended = await _discard_body(tracked, drain_max, DRAIN_DEADLINE_S)
                    close = not ended
                if close and scope.get("http_version", "1.1") in _HTTP1:
                    message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
                await send(message)
                return
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not ended:
                # The client has the whole answer (Content-Length): read on briefly.
                await send({**message, "more_body": True})
                await _discard_body(tracked, self._limit(scope), LINGER_S)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracked, guarded)


_CLOSE = (b"connection", b"close")


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _discard_body(receive: Receive, max_bytes: int, deadline_s: float) -> bool:
    """Read and drop the body; True when it ended (or the client left) within the bounds."""
    seen = 0
    stop_at = time.monotonic() + deadline_s
    while True:
        remaining = stop_at - time.monotonic()
        if remaining <= 0:
            return False
        try:
            async with asyncio.timeout(remaining):
                message = await receive()
        except TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return True
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if seen > max_bytes:
            return False
