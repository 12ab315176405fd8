"""The flush's CPU step: stored payloads joined as they are, each checked whole first."""

from __future__ import annotations

import gzip

from isal import igzip

from otelworker import gzjoin, otlp
from otelworker.compression import checksum, compress
from otelworker.processing.export import prepare
from otelworker.settings import Compression
from otelworker.staging.queue import Claimed, Facts
from tests.support.objects import gzip_members, span_request


def _staged(item_id: int, raw: bytes, *, crc: bool = True) -> Claimed:
    stored = compress(raw, Compression.GZIP, 1)
    facts = Facts("gzip", len(raw), 1, 2, ("svc",), checksum(stored) if crc else None)
    return Claimed(item_id, "traces", stored, 1, 0, facts)


def test_a_row_staged_before_joinable_members_makes_the_object_concatenatedgzip_members() -> None:
    """A payload staged by an older version (a plain gzip member) cannot be joined: the
    batch's object is its members concatenated, as objects were then, with no index."""
    raws = [span_request([bytes([n]) * 8], service_name="svc") for n in range(1, 4)]
    items = [_staged(n, raw) for n, raw in enumerate(raws)]
    old = igzip.compress(raws[1], 1, mtime=0)
    items[1] = Claimed(
        1, "traces", old, 1, 0, Facts("gzip", len(raws[1]), 1, 2, ("svc",), checksum(old))
    )
    prepared = prepare("traces", items, Compression.GZIP, 1)
    assert prepared.good == [0, 1, 2]
    assert gzjoin.index(prepared.body) is None
    assert prepared.body == b"".join(item.payload for item in items)
    assert gzip_members(prepared.body) == 3
    assert gzip.decompress(prepared.body) == b"".join(raws)


def test_rows_with_a_checksum_are_joined_unchanged_and_a_changed_one_goes_dead_alone() -> None:
    raws = [span_request([bytes([n]) * 8], service_name="svc") for n in range(1, 5)]
    items = [_staged(n, raw) for n, raw in enumerate(raws)]
    # One stored payload changed after it was staged: same length, one byte flipped (its
    # gzip stream may even still decode; the checksum still tells).
    flipped = bytearray(items[2].payload)
    flipped[len(flipped) // 2] ^= 0x01
    items[2] = Claimed(2, "traces", bytes(flipped), 1, 0, items[2].facts)
    prepared = prepare("traces", items, Compression.GZIP, 1)
    assert prepared.good == [0, 1, 3]
    assert [item_id for item_id, _ in prepared.poison] == [2]
    assert "checksum" in prepared.poison[0][1]
    # The object is one gzip member: the stored deflate data joined as it was staged,
    # byte for byte, and indexed by staged request.
    entries = gzjoin.index(prepared.body)
    assert entries is not None and [e.records for e in entries] == [1, 1, 1]
    for entry, i in zip(entries, (0, 1, 3), strict=True):
        fragment = gzjoin.fragment(items[i].payload)
        assert fragment is not None
        assert prepared.body[entry.start : entry.start + entry.size] == bytes(fragment[0])
    assert gzip_members(prepared.body) == 1
    assert gzip.decompress(prepared.body) == raws[0] + raws[1] + raws[3]
    message = otlp.decode("traces", gzip.decompress(prepared.body))
    assert otlp.count_records("traces", message) == 3


def test_rows_without_a_checksum_are_checked_by_decompression() -> None:
    raws = [span_request([bytes([n]) * 8], service_name="svc") for n in range(1, 4)]
    items = [_staged(n, raw, crc=False) for n, raw in enumerate(raws)]
    torn = items[1]
    items[1] = Claimed(1, "traces", torn.payload[:20], 1, 0, torn.facts)
    prepared = prepare("traces", items, Compression.GZIP, 1)
    assert prepared.good == [0, 2]
    assert [item_id for item_id, _ in prepared.poison] == [1]
    assert gzip.decompress(prepared.body) == raws[0] + raws[2]


def test_any_error_checking_one_row_buries_that_row_alone() -> None:
    """A corrupt deflate stream in a row without a checksum raises the codec's own error
    (ISA-L's IsalError, not a ValueError): that row is poison, its batch-mates go on."""
    raws = [span_request([bytes([n]) * 8], service_name="svc") for n in range(1, 5)]
    items = [_staged(n, raw, crc=False) for n, raw in enumerate(raws)]
    good = items[1].payload
    corrupt = good[:10] + bytes(b ^ 0xFF for b in good[10:30]) + good[30:]
    items[1] = Claimed(1, "traces", corrupt, 1, 0, items[1].facts)
    # And a row staged in another codec whose bytes are not that codec's at all.
    other = Facts("zstd", len(raws[3]), 1, 2, ("svc",), None)
    items[3] = Claimed(3, "traces", b"\x28\xb5\x2f\xfd" + bytes(range(40)), 1, 0, other)
    prepared = prepare("traces", items, Compression.GZIP, 1)
    assert prepared.good == [0, 2]
    assert sorted(item_id for item_id, _ in prepared.poison) == [1, 3]
    assert all(reason for _, reason in prepared.poison)
    assert gzip.decompress(prepared.body) == raws[0] + raws[2]
