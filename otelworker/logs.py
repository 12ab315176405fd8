"""Structured JSON logs: a stable ``event``/``reason`` pair plus context fields.

Modules log with fixed message text and put the structure in ``extra``;
:class:`JSONFormatter` renders one JSON object per line at the edge. Tests assert on
``record.event`` and ``record.reason``, not on the text. Nothing here ever logs a payload
or a secret: callers pass sizes and counts, never bodies or DSNs.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

logger = logging.getLogger("otelworker")

_STD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JSONFormatter(logging.Formatter):
    """time, level, logger, message, event, reason, then every context field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(level: str = "INFO") -> None:
    """Send every otelworker record (and hypercorn's) to stdout as JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old.formatter, JSONFormatter):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_event(
    event: str,
    message: str,
    *,
    reason: str | None = None,
    level: int = logging.INFO,
    exc_info: BaseException | None = None,
    **context: Any,
) -> None:
    extra: dict[str, Any] = {"event": event, **context}
    if reason is not None:
        extra["reason"] = reason
    logger.log(level, message, extra=extra, exc_info=exc_info)


@dataclass
class _Window:
    opened: float
    level: int = logging.WARNING
    suppressed: int = 0
    context: dict[str, Any] = field(default_factory=dict)


class AggregatedEvents:
    """Rate-bounded logging for events that fire per request under overload.

    The first occurrence of an (event, reason, tenant) triple is logged at once; further ones in
    the same window are counted and logged as one line with ``count`` when the window
    closes (on the next occurrence after it, or by :meth:`run`'s periodic flush), so a
    flood of refusals costs one line a second per pair, and no occurrence goes uncounted.
    """

    def __init__(
        self, window_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[tuple[str, str, Any], _Window] = {}

    def emit(
        self, event: str, reason: str, message: str, *, level: int = logging.WARNING, **context: Any
    ) -> None:
        now = self._clock()
        key = (event, reason, context.get("tenant"))
        window = self._windows.get(key)
        if self.window_s <= 0:
            log_event(event, message, reason=reason, level=level, count=1, **context)
            return
        if window is None:
            self._windows[key] = _Window(opened=now, level=level)
            log_event(event, message, reason=reason, level=level, count=1, **context)
            return
        window.suppressed += 1
        window.context = context
        if now - window.opened >= self.window_s:
            self._close(key, window, now)

    def _close(self, key: tuple[str, str, Any], window: _Window, now: float) -> None:
        if window.suppressed:
            log_event(
                key[0],
                f"repeated {window.suppressed} times in {now - window.opened:.1f}s",
                reason=key[1],
                level=window.level,
                count=window.suppressed,
                window_s=round(now - window.opened, 3),
                **window.context,
            )
            self._windows[key] = _Window(opened=now, level=window.level)
        else:
            del self._windows[key]

    def flush(self) -> None:
        now = self._clock()
        for key, window in list(self._windows.items()):
            if now - window.opened >= self.window_s:
                self._close(key, window, now)

    async def run(self) -> None:
        """Close expired windows periodically, so a burst's count is logged promptly."""
        try:
            while True:
                await asyncio.sleep(max(self.window_s, 0.05))
                self.flush()
        finally:
            self.flush_all()

    def flush_all(self) -> None:
        now = self._clock()
        for key, window in list(self._windows.items()):
            if window.suppressed:
                self._close(key, window, now)
        self._windows.clear()
