"""Joinable gzip: staged payloads that an object joins into ONE gzip member, indexed.

An object is the concatenation of its staged payloads. Concatenated gzip members are a
valid gzip stream (RFC 1952), but some receivers (rotel among them) read only the first
member and drop the rest, and a member cannot be cut out of a stream without inflating it.
So a gzip payload is staged as a *piece*: one ordinary gzip member (any reader inflates it
alone) whose deflate stream is sync-flushed before its final block, which makes its
deflate data a byte-aligned fragment that ends in no final block. Such fragments joined
end to end are one deflate stream (each fragment's compressor started afresh, so no
back-reference crosses into another): the flush writes them after one header, ends them
with an empty final block and a trailer whose CRC-32 is combined from the pieces' own
(zlib's gzjoin does the same with bit-level surgery on arbitrary members; a sync flush
makes it byte-level).

    piece (a staged payload):  1f 8b 08 04 | mtime 0 | xfl 00 | os ff | XLEN 4 | 'O' 'J' 00 00
                               | deflate data ... 00 00 ff ff | 03 00 | CRC-32 | ISIZE
    object:                    1f 8b 08 04 | mtime 0 | xfl 00 | os ff | XLEN | 'O' 'I' LEN
                               | version 01 | entries | the pieces' deflate data, in order
                               | 03 00 | CRC-32 of all | ISIZE of all

The object's extra field ('O' 'I', RFC 1952 section 2.3.1.1, which every reader skips)
indexes it: per entry the compressed length of its deflate data, its raw length, its
CRC-32 and its records. With it the forwarder cuts any run of entries into a whole gzip
member of its own (:func:`member`) without inflating or deflating a byte: an object past
a destination's ``max_request_bytes`` is sent as several such members, each one request.
A piece's marker ('O' 'J') is what tells a joinable payload from one staged by an older
version (those are joined as before, as concatenated members, and carry no index).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from isal import isal_zlib

_MAGIC = b"\x1f\x8b\x08"
_FEXTRA = 0x04
_TAIL = b"\x00\x00\xff\xff\x03\x00"  # the sync flush's empty stored block, the final block
_FINAL = b"\x03\x00"  # an empty final block (fixed Huffman, end-of-block), byte-aligned
# mtime 0, no extra flags, OS unknown (as ISA-L writes it)
_REST = b"\x00\x00\x00\x00\x00\xff"
PIECE_HEADER = _MAGIC + bytes([_FEXTRA]) + _REST + struct.pack("<H", 4) + b"OJ\x00\x00"
_PLAIN_HEADER = _MAGIC + b"\x00" + _REST
_INDEX_ID = b"OI"
_VERSION = 1
_ENTRY = struct.Struct("<IIII")  # deflate bytes, raw bytes, CRC-32 of raw, records
# An extra field holds 65,535 bytes: its subfield header (4), the version (1), entries.
MAX_ENTRIES = (0xFFFF - 4 - 1) // _ENTRY.size
# ISA-L's deflate levels; above them zlib's.
ISAL_MAX_LEVEL = 3


@dataclass(frozen=True, slots=True)
class Entry:
    """A run of an object's deflate data that is a whole piece (or several)."""

    start: int  # offset of its deflate data in the object
    size: int  # bytes of deflate data
    raw: int  # uncompressed bytes
    crc: int  # CRC-32 of the uncompressed bytes
    records: int


def piece(data: bytes, level: int) -> bytes:
    """``data`` as a joinable gzip member (ISA-L's deflate at ``level`` <= 3, zlib's
    above)."""
    if level <= ISAL_MAX_LEVEL:
        isal = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
        body = isal.compress(data) + isal.flush(isal_zlib.Z_SYNC_FLUSH)
    else:
        deflater = zlib.compressobj(level, zlib.DEFLATED, -15)
        body = deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    trailer = struct.pack("<II", isal_zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return b"".join((PIECE_HEADER, body, _FINAL, trailer))


def fragment(member: bytes) -> tuple[memoryview, int, int] | None:
    """A joinable member's deflate data (without its final block), CRC-32 and raw length
    (mod 2**32, as the trailer keeps it); None for any other gzip member."""
    if not member.startswith(PIECE_HEADER) or len(member) < len(PIECE_HEADER) + 14:
        return None
    if member[-14:-8] != _TAIL:
        return None
    crc, size = struct.unpack_from("<II", member, len(member) - 8)
    return memoryview(member)[len(PIECE_HEADER) : -10], crc, size


def join(parts: Sequence[tuple[memoryview | bytes, int, int, int]]) -> bytes:
    """One indexed gzip member of ``parts``: (deflate fragment, CRC-32, raw bytes,
    records) each, in order. More parts than an index holds are indexed in runs (an entry
    then covers consecutive pieces)."""
    entries = [(len(f), raw, crc, records) for f, crc, raw, records in parts]
    while len(entries) > MAX_ENTRIES:
        entries = [_merged(entries[i : i + 2]) for i in range(0, len(entries), 2)]
    crc = 0
    raw = 0
    for _size, length, part_crc, _records in entries:
        crc = isal_zlib.crc32_combine(crc, part_crc, length) if raw else part_crc
        raw += length
    index = bytes([_VERSION]) + b"".join(_ENTRY.pack(*e) for e in entries)
    extra = _INDEX_ID + struct.pack("<H", len(index)) + index
    header = _MAGIC + bytes([_FEXTRA]) + _REST + struct.pack("<H", len(extra)) + extra
    trailer = _FINAL + struct.pack("<II", crc, raw & 0xFFFFFFFF)
    return b"".join([header, *(f for f, _c, _r, _n in parts), trailer])


def _merged(run: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    size, raw, crc, records = run[0]
    for s, r, c, n in run[1:]:
        crc = isal_zlib.crc32_combine(crc, c, r)
        size, raw, records = size + s, raw + r, records + n
    return size, raw, crc, records


def index(body: bytes) -> list[Entry] | None:
    """The entries of an object :func:`join` wrote; None for any other body (or one
    whose index does not add up to its length)."""
    if len(body) < 12 or body[:4] != _MAGIC + bytes([_FEXTRA]):
        return None
    (xlen,) = struct.unpack_from("<H", body, 10)
    extra = body[12 : 12 + xlen]
    at = 0
    while at + 4 <= len(extra):
        (length,) = struct.unpack_from("<H", extra, at + 2)
        if extra[at : at + 2] == _INDEX_ID:
            data = extra[at + 4 : at + 4 + length]
            if not data or data[0] != _VERSION or (len(data) - 1) % _ENTRY.size:
                return None
            start = 12 + xlen
            entries: list[Entry] = []
            for size, raw, crc, records in _ENTRY.iter_unpack(data[1:]):
                entries.append(Entry(start, size, raw, crc, records))
                start += size
            if start + len(_FINAL) + 8 != len(body) or body[start : start + 2] != _FINAL:
                return None
            return entries
        at += 4 + length
    return None


def member(body: bytes, run: Sequence[Entry]) -> bytes:
    """A run of consecutive entries of ``body`` as one gzip member of its own."""
    crc = run[0].crc
    for entry in run[1:]:
        crc = isal_zlib.crc32_combine(crc, entry.crc, entry.raw)
    raw = sum(entry.raw for entry in run)
    data = memoryview(body)[run[0].start : run[-1].start + run[-1].size]
    return b"".join((_PLAIN_HEADER, data, _FINAL, struct.pack("<II", crc, raw & 0xFFFFFFFF)))


def inflate(body: bytes, entry: Entry) -> bytes:
    """One entry's uncompressed bytes (its deflate data alone: a sync-flushed fragment)."""
    inflater = isal_zlib.decompressobj(wbits=-15)
    data = inflater.decompress(memoryview(body)[entry.start : entry.start + entry.size])
    if len(data) != entry.raw or isal_zlib.crc32(data) != entry.crc:
        raise ValueError("an indexed entry does not match its length or CRC-32")
    return bytes(data)
