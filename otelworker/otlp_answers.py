"""What an OTLP/HTTP answer says, for the clients that send OTLP onward: the replay's
:class:`~otelworker.archive.sender.Sender` and the forwarder's
:class:`~otelworker.forwarding.client.DestinationClient`.

Which statuses OTLP retries (:data:`RETRYABLE`), how long a ``Retry-After`` asks to
wait, how many records a 2xx's ``partial_success`` still rejected, what a refusal's body
says (bounded), and a URL without its user information (a password may sit there).
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from otelworker import otlp

# The statuses the OTLP/HTTP spec (and the Collector's otlphttp exporter) retries.
RETRYABLE = frozenset({429, 502, 503, 504})
_REJECTED = {
    "traces": "rejected_spans",
    "metrics": "rejected_data_points",
    "logs": "rejected_log_records",
}
_REJECTED_JSON = {
    "traces": "rejectedSpans",
    "metrics": "rejectedDataPoints",
    "logs": "rejectedLogRecords",
}


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    waited: float = (at - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, waited)


def redact(url: str) -> str:
    """The URL without user information (a password may sit there)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def rejected_records(signal: str, content_type: str, body: bytes) -> tuple[int, str]:
    """``partial_success``'s rejected count and message from a 2xx answer, if any."""
    if not body:
        return 0, ""
    try:
        if content_type.startswith("application/json"):
            tree = orjson.loads(body)
            partial = tree.get("partialSuccess") or tree.get("partial_success") or {}
            count = partial.get(_REJECTED_JSON[signal], partial.get(_REJECTED[signal], 0))
            message = partial.get("errorMessage", partial.get("error_message", ""))
            return int(count or 0), str(message or "")
        response: Any = otlp.RESPONSE_TYPES[signal]()
        response.ParseFromString(body)
        return (
            int(getattr(response.partial_success, _REJECTED[signal])),
            str(response.partial_success.error_message),
        )
    except (DecodeError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0, ""


def detail(content_type: str, body: bytes, limit: int | None = None) -> str:
    """What a refusal's body says: a google.rpc.Status message, else its text (the first
    200 bytes); at most ``limit`` characters when given."""
    text = _detail(content_type, body)
    return text if limit is None else text[:limit]


def _detail(content_type: str, body: bytes) -> str:
    if content_type.startswith("application/x-protobuf"):
        status = status_pb2.Status()
        try:
            status.ParseFromString(body)
            if status.message:
                return str(status.message)
        except DecodeError:
            pass
    if content_type.startswith("application/json"):
        try:
            tree = orjson.loads(body)
            if isinstance(tree, dict) and tree.get("message"):
                return str(tree["message"])
        except orjson.JSONDecodeError:
            pass
    return body[:200].decode("utf-8", errors="replace").strip()
