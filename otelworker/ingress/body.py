"""Reading request bodies in bounded chunks and decompressing them within a limit.

Neither the body as received nor the body after decompression may pass
``MAX_REQUEST_BODY_BYTES``; a gzip bomb is cut off at the limit and never expands in
memory beyond it.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

import zstandard

from otelworker.exceptions import OtelWorkerError

CHUNK = 64 * 1024


class BodyTooLarge(OtelWorkerError):
    """The body exceeds MAX_REQUEST_BODY_BYTES (as received or decompressed)."""


class BadEncoding(OtelWorkerError):
    """The Content-Encoding is unknown or the compressed stream is corrupt."""


ENCODINGS = ("identity", "gzip", "zstd")


async def read_limited(stream: AsyncIterator[bytes], limit: int, declared: int | None) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"Content-Length {declared} exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _gunzip(data: bytes, limit: int) -> bytes:
    out: list[bytes] = []
    size = 0
    pending = data
    while pending:
        inflater = zlib.decompressobj(wbits=31)
        while True:
            try:
                piece = inflater.decompress(pending, limit + 1 - size)
            except zlib.error as exc:
                raise BadEncoding(f"corrupt gzip stream: {exc}") from None
            size += len(piece)
            if size > limit:
                raise BodyTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
            out.append(piece)
            pending = inflater.unconsumed_tail
            if inflater.eof or not pending:
                break
        if not inflater.eof:
            raise BadEncoding("truncated gzip stream")
        # A gzip file may hold several members back to back.
        pending = inflater.unused_data
    return b"".join(out)


def _unzstd(data: bytes, limit: int) -> bytes:
    dctx = zstandard.ZstdDecompressor()
    try:
        # Pass 1, bounded: count the output without keeping it, so a bomb stops at the limit.
        reader = dctx.stream_reader(data, read_across_frames=True)
        size = 0
        while piece := reader.read(CHUNK):
            size += len(piece)
            if size > limit:
                raise BodyTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
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


def decompress(data: bytes, content_encoding: str, limit: int) -> bytes:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip"):
        return _gunzip(data, limit)
    if encoding == "zstd":
        return _unzstd(data, limit)
    raise BadEncoding(
        f"unsupported Content-Encoding {content_encoding!r}; use gzip, zstd or identity"
    )
