"""Which manifest rows a command works on: the filters, and the times and ages they take.

Times are RFC 3339 (``2024-05-01T10:00:00Z``) or relative to now (``2h`` = two hours
ago); ages are durations (``30d``, ``12h``, ``90m``, ``3600s``, or ``1h30m``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``1h30m``: a non-negative duration."""
    value = text.strip().lower()
    if not _DURATION.fullmatch(value):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30d, 12h, 90m or 3600s)")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    return timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class TimeSpec:
    """A point in time as given: absolute, or an age relative to the command's start."""

    at: datetime | None = None
    ago: timedelta | None = None

    @classmethod
    def parse(cls, text: str) -> TimeSpec:
        value = text.strip()
        if _DURATION.fullmatch(value.lower()):
            return cls(ago=parse_duration(value))
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"not a time: {text!r} (use RFC 3339, e.g. 2024-05-01T10:00:00Z,"
                " or an age such as 2h)"
            ) from None
        if at.tzinfo is None:
            raise ValueError(f"{text!r} has no UTC offset (RFC 3339 needs one, e.g. Z or +02:00)")
        return cls(at=at.astimezone(UTC))

    def resolve(self, now: datetime) -> datetime:
        if self.at is not None:
            return self.at
        assert self.ago is not None
        return now - self.ago


@dataclass(frozen=True, slots=True)
class Window:
    """``[since, until)`` in unix nanoseconds; None is open on that side."""

    since_ns: int | None = None
    until_ns: int | None = None

    @property
    def unbounded(self) -> bool:
        return self.since_ns is None and self.until_ns is None

    def contains(self, t: int) -> bool:
        """Whether a record's timestamp is in the window (an unset, 0, one only in none)."""
        if self.unbounded:
            return True
        if self.since_ns is not None and t < self.since_ns:
            return False
        if self.until_ns is not None and t >= self.until_ns:
            return False
        return t != 0


def to_ns(at: datetime) -> int:
    """Exact unix nanoseconds of an aware datetime (no float rounding)."""
    delta = at - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


@dataclass(frozen=True, slots=True)
class Selection:
    """The filters of ``batches``, ``replay`` (and what they share with ``prune``).

    An object is selected when its data's ``[min_time, max_time]`` overlaps
    ``[since, until)``, its signal is ``signal``, ``service`` is among its service
    names and it is ``tenant``'s (None: any tenant's; a manifest row without a tenant,
    from before tenants, is DEFAULT_TENANT's); at most ``limit`` objects.
    """

    signals: tuple[str, ...] = ("traces", "metrics", "logs")
    since: datetime | None = None
    until: datetime | None = None
    service: str | None = None
    limit: int | None = None
    tenant: str | None = None

    @property
    def window(self) -> Window:
        return Window(
            to_ns(self.since) if self.since is not None else None,
            to_ns(self.until) if self.until is not None else None,
        )
