"""``replay --checkpoint PATH``: the objects a replay has finished, one key a line.

Append-only; each line is written and fsync'd once every request of its object has
been acknowledged, so a key in the file is a promise that the object was delivered. A
re-run reads the file and skips those objects. A line cut short by a crash is cut off.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from otelworker.exceptions import OtelWorkerError


class Checkpoint:
    def __init__(self, path: Path, done: set[str], fd: int) -> None:
        self.path = path
        self.done = done
        self._fd = fd
        # One writer thread: lines in order, fsync off the event loop, and close() waits
        # for a write whose caller was cancelled (the fd is not closed under it).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        path = Path(path)
        try:
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                # The last line is a key cut short by a crash: never a promise, so it
                # goes, and the next key starts a line of its own.
                data = data[: data.rfind(b"\n") + 1]
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            if created:
                _fsync_dir(path.parent)
        except OSError as exc:
            raise OtelWorkerError(f"checkpoint {path}: {exc}") from exc
        text = data.decode("utf-8", errors="replace")
        return cls(path, {line for line in text.splitlines() if line.strip()}, fd)

    def _append(self, key: str) -> None:
        os.write(self._fd, f"{key}\n".encode())
        os.fsync(self._fd)

    async def add(self, key: str) -> None:
        """Record a finished object; returns once the line is on disk."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._append, key)
        except OSError as exc:
            raise OtelWorkerError(f"checkpoint {self.path}: {exc}") from exc
        self.done.add(key)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        os.close(self._fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
