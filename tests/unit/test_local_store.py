"""The local object store: an object is durable once put() returns, its name included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otelworker.sinks.local import LocalObjectStore


async def test_put_syncs_the_file_its_directory_and_every_directory_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    key = "otel/year=2026/month=12/traces_1.binpb.gz"
    await store.put(key, b"body", "application/x-protobuf", "gzip")
    assert (root / key).read_bytes() == b"body"
    made = [root, root / "otel", root / "otel/year=2026", root / "otel/year=2026/month=12"]
    # The data, then the rename (in the object's directory), then each new directory's
    # entry in its parent.
    assert synced[0].endswith(".traces_1.binpb.gz.tmp")
    assert set(synced[1:]) == {str(d.parent) for d in made} | {str(root / key).rsplit("/", 1)[0]}

    synced.clear()
    await store.put("otel/year=2026/month=12/traces_2.binpb.gz", b"2", "x", None)
    assert synced[1:] == [str(root / "otel/year=2026/month=12")]  # no new directory
