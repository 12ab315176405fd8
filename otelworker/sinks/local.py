"""The filesystem adapter: the same key layout under LOCAL_OBJECT_DIR."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from otelworker.exceptions import ObjectStoreError
from otelworker.sinks.base import StoredObject


def _missing_dirs(directory: Path) -> list[Path]:
    """The directories a ``mkdir(parents=True)`` of ``directory`` would make, innermost
    first."""
    missing: list[Path] = []
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    return missing


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalObjectStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ObjectStoreError(f"object key escapes the store: {key!r}")
        return path

    def _write(self, key: str, body: bytes) -> None:
        path = self._path(key)
        made = _missing_dirs(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        # The object is durable once its name is: the rename lives in its directory, and a
        # directory made for it lives in its parent. Synced before the upload is reported
        # done, so an object the manifest names survives a power loss with it.
        _fsync_dir(path.parent)
        for directory in made:
            _fsync_dir(directory.parent)

    async def put(
        self, key: str, body: bytes, content_type: str, content_encoding: str | None
    ) -> None:
        try:
            await asyncio.to_thread(self._write, key, body)
        except OSError as exc:
            raise ObjectStoreError(f"write {key}: {exc}") from exc

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except OSError as exc:
            raise ObjectStoreError(f"read {key}: {exc}") from exc

    async def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise ObjectStoreError(f"delete {key}: {exc}") from exc

    async def list(self, prefix: str) -> AsyncIterator[StoredObject]:
        base = self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            key = path.relative_to(base).as_posix()
            if key.startswith(prefix):
                stat = path.stat()
                yield StoredObject(key, datetime.fromtimestamp(stat.st_mtime, UTC), stat.st_size)

    async def close(self) -> None:
        return None
