"""Request bodies: bounded reads and bounded decompression (gzip, zstd, identity)."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterable

import pytest
import zstandard

from otelworker.ingress.body import (
    BadEncoding,
    BodyTooLarge,
    UnsupportedEncoding,
    decompress,
    read_limited,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
LIMIT = 16 * MiB


def gzip_bomb(size: int = GiB, chunk: int = MiB) -> bytes:
    """A valid single-member gzip stream of ``size`` zero bytes, built without holding it.

    After the first chunk, every further chunk of zeros compresses (with a sync flush) to
    the same bytes, so the deflate body is the first piece plus one repeated piece; the
    trailer's CRC is computed chunk by chunk.
    """
    assert size % chunk == 0
    zeros = bytes(chunk)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflater.compress(zeros) + deflater.flush(zlib.Z_SYNC_FLUSH)
    repeated = deflater.compress(zeros) + deflater.flush(zlib.Z_SYNC_FLUSH)
    assert deflater.compress(zeros) + deflater.flush(zlib.Z_SYNC_FLUSH) == repeated
    tail = deflater.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(size // chunk):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + first + repeated * (size // chunk - 1) + tail + trailer


def zstd_bomb(size: int = GiB, chunk: int = MiB) -> bytes:
    zeros = bytes(chunk)
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    parts = [compressor.compress(zeros) for _ in range(size // chunk)]
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def big_gzip_bomb() -> bytes:
    return gzip_bomb()


def test_gzip_bomb_builder_is_a_valid_gzip_stream() -> None:
    small = gzip_bomb(size=8 * MiB)
    assert gzip.decompress(small) == bytes(8 * MiB)


# --- identity / gzip / zstd -----------------------------------------------------------------


PAYLOAD = b"otlp payload " * 5000


@pytest.mark.parametrize("encoding", ["", "identity", "IDENTITY", " identity "])
def test_identity_returns_the_body_unchanged(encoding: str) -> None:
    assert decompress(PAYLOAD, encoding, LIMIT) is PAYLOAD


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "x-gzip", " gzip"])
def test_gzip(encoding: str) -> None:
    assert decompress(gzip.compress(PAYLOAD), encoding, LIMIT) == PAYLOAD


def test_zstd() -> None:
    compressed = zstandard.ZstdCompressor().compress(PAYLOAD)
    assert decompress(compressed, "zstd", LIMIT) == PAYLOAD


def test_zstd_streamed_frame_without_content_size() -> None:
    compressor = zstandard.ZstdCompressor().compressobj()
    compressed = compressor.compress(PAYLOAD) + compressor.flush()
    assert decompress(compressed, "zstd", LIMIT) == PAYLOAD


def test_zstd_several_frames() -> None:
    cctx = zstandard.ZstdCompressor()
    compressed = cctx.compress(b"first|") + cctx.compress(b"second")
    assert decompress(compressed, "zstd", LIMIT) == b"first|second"


def test_gzip_multi_member() -> None:
    body = gzip.compress(b"first member|") + gzip.compress(b"") + gzip.compress(PAYLOAD)
    assert decompress(body, "gzip", LIMIT) == b"first member|" + PAYLOAD


def test_gzip_empty_stream_and_empty_body() -> None:
    assert decompress(gzip.compress(b""), "gzip", LIMIT) == b""
    assert decompress(b"", "gzip", LIMIT) == b""


def test_decompressed_exactly_at_the_limit_is_accepted() -> None:
    limit = 64 * 1024
    assert decompress(gzip.compress(bytes(limit)), "gzip", limit) == bytes(limit)
    zstd_body = zstandard.ZstdCompressor().compress(bytes(limit))
    assert decompress(zstd_body, "zstd", limit) == bytes(limit)


def test_decompressed_one_byte_over_the_limit_is_refused() -> None:
    limit = 64 * 1024
    with pytest.raises(BodyTooLarge):
        decompress(gzip.compress(bytes(limit + 1)), "gzip", limit)
    with pytest.raises(BodyTooLarge):
        decompress(zstandard.ZstdCompressor().compress(bytes(limit + 1)), "zstd", limit)


def test_multi_member_gzip_counts_every_member_against_the_limit() -> None:
    limit = 64 * 1024
    member = gzip.compress(bytes(limit // 2 + 1))
    with pytest.raises(BodyTooLarge):
        decompress(member + member, "gzip", limit)


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, br", "unknown", "gzip;q=1"])
def test_unknown_encoding_is_unsupported_and_names_the_supported(encoding: str) -> None:
    with pytest.raises(UnsupportedEncoding) as raised:
        decompress(PAYLOAD, encoding, LIMIT)
    assert "supported: identity, gzip" in str(raised.value)
    assert "snappy" in str(raised.value) and "lz4" in str(raised.value)


def _corrupt_crc(data: bytes) -> bytes:
    return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]


@pytest.mark.parametrize(
    "body",
    [
        b"not gzip at all",
        gzip.compress(PAYLOAD)[:-4],  # trailer cut short
        gzip.compress(PAYLOAD)[: len(gzip.compress(PAYLOAD)) // 2],  # cut mid-stream
        gzip.compress(PAYLOAD)[:5],  # cut in the header
        _corrupt_crc(gzip.compress(PAYLOAD)),
        gzip.compress(PAYLOAD) + b"trailing garbage",
    ],
    ids=["not-gzip", "truncated-trailer", "truncated-body", "truncated-header", "bad-crc", "junk"],
)
def test_corrupt_or_truncated_gzip_raises_bad_encoding(body: bytes) -> None:
    with pytest.raises(BadEncoding):
        decompress(body, "gzip", LIMIT)


def test_corrupt_zstd_raises_bad_encoding() -> None:
    with pytest.raises(BadEncoding):
        decompress(b"not zstd at all", "zstd", LIMIT)


def _streamed_zstd(data: bytes) -> bytes:
    compressor = zstandard.ZstdCompressor().compressobj()
    return compressor.compress(data) + compressor.flush()


# KNOWN BUG (reported): body._unzstd reads with stream_reader, which returns what it has
# when the input ends mid-frame; a truncated zstd body decompresses to b"" (or a prefix)
# and the route answers 200 for an empty request instead of 400. Strict: turns red once
# fixed, so the mark is removed with the fix.
@pytest.mark.parametrize(
    "body",
    [
        zstandard.ZstdCompressor().compress(PAYLOAD)[:-6],
        _streamed_zstd(PAYLOAD)[:-6],
        zstandard.ZstdCompressor().compress(PAYLOAD)[:4],
        zstandard.ZstdCompressor().compress(b"one") + _streamed_zstd(PAYLOAD)[:-3],
    ],
    ids=["truncated", "truncated-streamed", "magic-only", "second-frame-truncated"],
)
def test_truncated_zstd_raises_bad_encoding(body: bytes) -> None:
    with pytest.raises(BadEncoding):
        decompress(body, "zstd", LIMIT)


# --- bombs: cut at the limit, memory bounded ------------------------------------------------


def _peak_while(fn: object) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:
            error: BaseException | None = exc
        else:
            error = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return error, peak


def test_gzip_bomb_is_cut_at_the_limit_with_bounded_memory(big_gzip_bomb: bytes) -> None:
    assert len(big_gzip_bomb) < 2 * MiB  # 1 GiB of zeros, about 1 MB on the wire

    error, peak = _peak_while(lambda: decompress(big_gzip_bomb, "gzip", LIMIT))

    assert isinstance(error, BodyTooLarge), error
    assert peak < 3 * LIMIT, f"peak {peak / MiB:.1f} MiB for a {LIMIT / MiB:.0f} MiB limit"


def test_zstd_bomb_is_cut_at_the_limit_with_bounded_memory() -> None:
    bomb = zstd_bomb()
    assert len(bomb) < MiB

    error, peak = _peak_while(lambda: decompress(bomb, "zstd", LIMIT))

    assert isinstance(error, BodyTooLarge), error
    assert peak < 3 * LIMIT, f"peak {peak / MiB:.1f} MiB for a {LIMIT / MiB:.0f} MiB limit"


def test_small_limit_gzip_bomb_memory_scales_with_the_limit(big_gzip_bomb: bytes) -> None:
    limit = 1 * MiB
    error, peak = _peak_while(lambda: decompress(big_gzip_bomb, "gzip", limit))
    assert isinstance(error, BodyTooLarge), error
    # The compressed input (about 1 MB) is already allocated; the expansion adds at most ~2x.
    assert peak < 3 * limit + len(big_gzip_bomb)


# --- bounded reads ----------------------------------------------------------------------------


async def _stream(chunks: Iterable[bytes], seen: list[int]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        seen.append(len(chunk))
        yield chunk


async def test_read_limited_joins_the_chunks() -> None:
    seen: list[int] = []
    body = await read_limited(_stream([b"ab", b"cd", b"", b"e"], seen), 1024, None)
    assert body == b"abcde"


async def test_read_limited_accepts_exactly_the_limit() -> None:
    seen: list[int] = []
    assert await read_limited(_stream([b"x" * 512, b"y" * 512], seen), 1024, 1024) == (
        b"x" * 512 + b"y" * 512
    )


async def test_read_limited_refuses_a_declared_length_before_reading() -> None:
    seen: list[int] = []
    with pytest.raises(BodyTooLarge):
        await read_limited(_stream([b"x"], seen), 1024, 1025)
    assert seen == []


async def test_read_limited_stops_reading_once_past_the_limit() -> None:
    seen: list[int] = []

    def endless() -> Iterable[bytes]:
        while True:
            yield b"z" * 1000

    # No (or a lying) Content-Length: the stream is cut as soon as it passes the limit.
    with pytest.raises(BodyTooLarge):
        await read_limited(_stream(endless(), seen), 10_000, 10)
    assert sum(seen) == 11_000
