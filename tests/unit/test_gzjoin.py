"""Joinable gzip (otelworker/gzjoin.py): pieces joined into one indexed member, and runs
of entries cut out again as members of their own, read back by every gzip reader."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest
from isal import igzip, isal_zlib

from otelworker import gzjoin
from otelworker.compression import compress
from otelworker.settings import Compression


def _payloads(count: int) -> list[bytes]:
    # Compressible and incompressible stretches, so blocks of every kind are written.
    return [os.urandom(50 * n) + b"span %d " % n * (300 * n) for n in range(1, count + 1)]


def _joined(datas: list[bytes], level: int = 0) -> bytes:
    parts = []
    for n, data in enumerate(datas):
        fragment = gzjoin.fragment(compress(data, Compression.GZIP, level))
        assert fragment is not None
        parts.append((fragment[0], fragment[1], fragment[2], n + 1))
    return gzjoin.join(parts)


@pytest.mark.parametrize("level", [0, 1, 3, 6, 9])  # ISA-L's levels (0 the default), then zlib's
def test_a_piece_is_an_ordinary_gzip_member_and_pieces_join_into_one(level: int) -> None:
    datas = _payloads(12)
    piece = compress(datas[0], Compression.GZIP, level)
    for reader in (gzip.decompress, igzip.decompress, lambda b: zlib.decompress(b, 31)):
        assert reader(piece) == datas[0]
    body = _joined(datas, level)
    expected = b"".join(datas)
    # One member: zlib stops at the end of the first member and leaves nothing unused.
    inflater = zlib.decompressobj(31)
    assert inflater.decompress(body) == expected
    assert inflater.eof and inflater.unused_data == b""
    assert gzip.decompress(body) == igzip.decompress(body) == expected


def test_the_index_cuts_runs_into_members_of_their_own() -> None:
    datas = _payloads(9)
    body = _joined(datas)
    entries = gzjoin.index(body)
    assert entries is not None
    assert [e.raw for e in entries] == [len(d) for d in datas]
    assert [e.records for e in entries] == list(range(1, 10))
    for start, end in [(0, 1), (2, 5), (0, 9), (8, 9)]:
        member = gzjoin.member(body, entries[start:end])
        inflater = zlib.decompressobj(31)
        assert inflater.decompress(member) == b"".join(datas[start:end])
        assert inflater.eof and inflater.unused_data == b""
    assert gzjoin.inflate(body, entries[4]) == datas[4]


def test_more_pieces_than_an_index_holds_are_indexed_in_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gzjoin, "MAX_ENTRIES", 4)
    datas = _payloads(11)
    body = _joined(datas)
    entries = gzjoin.index(body)
    assert entries is not None and len(entries) <= 4
    assert sum(e.records for e in entries) == sum(range(1, 12))
    assert sum(e.raw for e in entries) == sum(len(d) for d in datas)
    assert b"".join(gzip.decompress(gzjoin.member(body, [e])) for e in entries) == b"".join(datas)


def test_other_gzip_is_neither_a_piece_nor_indexed() -> None:
    data = _payloads(1)[0]
    plain = igzip.compress(data, 1, mtime=0)
    assert gzjoin.fragment(plain) is None
    assert gzjoin.index(plain) is None
    assert gzjoin.index(plain + plain) is None
    body = _joined(_payloads(3))
    assert gzjoin.index(body + b"x") is None  # the index must add up to the body
    assert gzjoin.index(body[:-1]) is None
    entries = gzjoin.index(body)
    assert entries is not None
    damaged = bytearray(body)
    damaged[entries[1].start + 3] ^= 0xFF
    with pytest.raises((ValueError, isal_zlib.IsalError)):
        gzjoin.inflate(bytes(damaged), entries[1])
