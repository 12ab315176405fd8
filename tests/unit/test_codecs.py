"""Every Content-Encoding the Collector sends: round trips, lists, corruption, bombs.

The reference encoders are other code than the decoders under test: the stdlib's zlib and
gzip, zstandard, and cramjam's encoders (the same library decodes, but the framing and
bounds around it are ours). Bombs are measured by the peak RSS of a child process, since
cramjam's native allocations are invisible to tracemalloc.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import cramjam
import pytest
import zstandard

from otelworker.ingress.body import (
    DECODERS,
    SUPPORTED,
    BadEncoding,
    BodyTooLarge,
    UnsupportedEncoding,
    codings,
    decompress,
)
from tests.support.payloads import ENCODERS

MiB = 1024 * 1024
LIMIT = 16 * MiB
PAYLOAD = b"otlp payload with some entropy " + bytes(range(256)) * 40


def raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    return deflater.compress(data) + deflater.flush()


def test_every_decoder_has_an_encoder_here() -> None:
    assert set(DECODERS) - {"x-gzip"} == set(ENCODERS)
    assert SUPPORTED[0] == "identity"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_round_trip(name: str) -> None:
    encoded = ENCODERS[name](PAYLOAD)
    assert decompress(encoded, name, LIMIT) == PAYLOAD
    assert decompress(encoded, name.upper(), LIMIT) == PAYLOAD  # names are case-insensitive
    assert decompress(ENCODERS[name](b""), name, LIMIT) == b""


@pytest.mark.parametrize("name", ["deflate", "zlib"])
def test_deflate_takes_raw_deflate_too(name: str) -> None:
    assert decompress(raw_deflate(PAYLOAD), name, LIMIT) == PAYLOAD


def test_snappy_takes_the_framed_format_too() -> None:
    assert decompress(ENCODERS["x-snappy-framed"](PAYLOAD), "snappy", LIMIT) == PAYLOAD


def test_lz4_concatenated_frames_are_one_body() -> None:
    body = ENCODERS["lz4"](b"first|") + ENCODERS["lz4"](b"second")
    assert decompress(body, "lz4", LIMIT) == b"first|second"


@pytest.mark.parametrize(
    ("header", "encode"),
    [
        ("gzip, identity", gzip.compress),
        ("identity, gzip", gzip.compress),
        (" GZIP ,", gzip.compress),
        ("deflate, gzip", lambda b: gzip.compress(zlib.compress(b))),
        ("gzip, zstd", lambda b: zstandard.ZstdCompressor().compress(gzip.compress(b))),
        ("lz4, snappy", lambda b: ENCODERS["snappy"](ENCODERS["lz4"](b))),
    ],
)
def test_lists_come_off_in_reverse_order_of_application(
    header: str, encode: Callable[[bytes], bytes]
) -> None:
    # RFC 9110 §8.4: listed in the order applied, so the last one listed is undone first.
    assert decompress(encode(PAYLOAD), header, LIMIT) == PAYLOAD


def test_too_many_codings_are_refused() -> None:
    with pytest.raises(UnsupportedEncoding, match="at most"):
        codings("gzip, gzip, gzip, gzip, gzip")


@pytest.mark.parametrize("header", ["br", "compress", "gzip, br", "x-compress", "*"])
def test_unsupported_codings_name_the_supported_list(header: str) -> None:
    with pytest.raises(UnsupportedEncoding) as raised:
        codings(header)
    for name in ("identity", "gzip", "zstd", "deflate", "zlib", "snappy", "lz4"):
        assert name in str(raised.value)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1 :]


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("damage", ["truncated", "half", "flipped", "garbage"])
def test_corrupt_or_truncated_is_bad_encoding(name: str, damage: str) -> None:
    encoded = ENCODERS[name](PAYLOAD)
    body = {
        "truncated": encoded[:-3],
        "half": encoded[: len(encoded) // 2],
        "flipped": _flip(encoded, len(encoded) // 2),
        "garbage": b"\x00\xffnot a compressed stream at all\x00" * 3,
    }[damage]
    try:
        out = decompress(body, name, LIMIT)
    except BadEncoding:
        return
    # A flipped bit in a codec without a checksum may still decode: never to the original.
    assert damage == "flipped" and name in ("snappy", "deflate", "zlib", "lz4", "zstd"), out[:40]
    assert out != PAYLOAD


# --- bombs: refused at the limit, memory bounded ------------------------------------------------

BOMB_SIZE = 256 * MiB


def _bomb(name: str) -> bytes:
    """``BOMB_SIZE`` zero bytes in that codec, built in pieces where the format allows."""
    zeros = bytes(16 * MiB)
    pieces = BOMB_SIZE // len(zeros)
    if name in ("deflate", "zlib", "gzip"):
        wbits = {"deflate": 15, "zlib": 15, "gzip": 31}[name]
        deflater = zlib.compressobj(9, zlib.DEFLATED, wbits)
        return b"".join(deflater.compress(zeros) for _ in range(pieces)) + deflater.flush()
    if name == "zstd":
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
        return b"".join(compressor.compress(zeros) for _ in range(pieces)) + compressor.flush()
    if name == "snappy":
        # The block format declares its length first: a block of 16 MiB + 1 is a bomb.
        return bytes(cramjam.snappy.compress_raw(bytes(LIMIT + 1)))
    # Framed formats: frames back to back are one stream.
    return ENCODERS[name](zeros) * pieces


_CHILD = """
import json, resource, sys
from otelworker.ingress.body import BodyTooLarge, decompress
body = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    decompress(body, sys.argv[2], int(sys.argv[3]))
    outcome = "decoded"
except BodyTooLarge:
    outcome = "too_large"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"outcome": outcome, "growth": after - before}))
"""


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_bomb_is_refused_without_inflating_past_the_limit(name: str, tmp_path: Path) -> None:
    bomb = _bomb(name)
    assert len(bomb) < LIMIT  # it passes the size check as received
    path = tmp_path / "bomb"
    path.write_bytes(bomb)
    del bomb
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), name, str(LIMIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["outcome"] == "too_large"
    # At most the limit's worth of output in memory (plus one working copy).
    assert report["growth"] < 2.5 * LIMIT, f"{name}: grew {report['growth'] / MiB:.0f} MiB"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_exactly_the_limit_is_accepted_one_more_byte_is_not(name: str) -> None:
    limit = 256 * 1024
    assert decompress(ENCODERS[name](bytes(limit)), name, limit) == bytes(limit)
    with pytest.raises(BodyTooLarge):
        decompress(ENCODERS[name](bytes(limit + 1)), name, limit)
