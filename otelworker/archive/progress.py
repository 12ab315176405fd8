"""``replay``'s progress on stderr: objects, records, bytes, rate and ETA.

On a terminal, one line redrawn in place (``\\r``) with a bar; otherwise (a log file, a
CI job) a plain line every few seconds. The ETA is the time so far scaled by the stored
bytes still to read over those read: objects differ in size, bytes less so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

BAR_WIDTH = 24


@dataclass
class Counts:
    objects_total: int = 0
    bytes_total: int = 0  # stored (compressed) bytes of the selected objects
    objects_done: int = 0
    objects_skipped: int = 0  # in the checkpoint already
    bytes_done: int = 0  # stored bytes of the objects read in this run
    bytes_skipped: int = 0
    records: int = 0  # acknowledged records
    requests: int = 0
    sent_bytes: int = 0  # request bytes on the wire (gzip'd)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def eta_s(counts: Counts, elapsed: float) -> float | None:
    remaining = counts.bytes_total - counts.bytes_skipped - counts.bytes_done
    if remaining <= 0:
        return 0.0
    if counts.bytes_done <= 0 or elapsed <= 0:
        return None
    return elapsed * remaining / counts.bytes_done


def render(counts: Counts, elapsed: float, *, bar: bool) -> str:
    """The progress line (without ``\\r`` or a newline)."""
    finished = counts.objects_done + counts.objects_skipped
    rate = counts.records / elapsed if elapsed > 0 else 0.0
    eta = eta_s(counts, elapsed)
    parts = [
        f"{finished}/{counts.objects_total} objects",
        f"{counts.records} records",
        human_bytes(counts.sent_bytes),
        f"{rate:.0f} records/s",
        f"ETA {human_duration(eta) if eta is not None else '?'}",
    ]
    if not bar:
        return "replay: " + ", ".join(parts)
    fraction = finished / counts.objects_total if counts.objects_total else 1.0
    filled = round(fraction * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} " + "  ".join(parts)


class Progress:
    def __init__(
        self,
        stream: TextIO,
        counts: Counts,
        *,
        tty: bool | None = None,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.counts = counts
        self.tty = stream.isatty() if tty is None else tty
        # A terminal is redrawn up to ten times a second; a log gets a line per interval.
        self.interval_s = 0.1 if self.tty else interval_s
        self._clock = clock
        self.started = clock()
        self._shown = self.started
        self._width = 0

    def elapsed(self) -> float:
        return self._clock() - self.started

    def update(self, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._shown < self.interval_s:
            return
        self._shown = now
        line = render(self.counts, now - self.started, bar=self.tty)
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write(f"\r{line}{' ' * pad}")
            self._width = len(line)
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def finish(self) -> None:
        self.update(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
