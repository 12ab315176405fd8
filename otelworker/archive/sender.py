"""The replay's OTLP/HTTP client: one request at a time, retried as OTLP says.

Protobuf bodies, gzip ``Content-Encoding``, the operator's extra headers (``--header``,
typically a token: never logged), and the tenant header (``--tenant-header``, default
``X-Scope-OrgID``) naming each request's object's tenant, so that a target which
separates tenants (another otelworker, Loki, Mimir, Tempo) stores it as that tenant's;
an operator's ``--header`` of the same name wins over it. 429, 502, 503 and 504 and
transport errors are retried with exponential backoff, or after the ``Retry-After`` the
target gave (seconds or an HTTP date); any other status ends the replay
(:class:`RequestRejected`), as does running out of attempts (:class:`RetriesExhausted`).
A 2xx is acknowledged; its ``partial_success`` (records the target rejected for good) is
reported, not retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from otelworker.exceptions import OtelWorkerError
from otelworker.logs import log_event
from otelworker.otlp_answers import (
    RETRYABLE,
    detail,
    parse_retry_after,
    redact,
    rejected_records,
)

__all__ = [
    "RETRYABLE",
    "Ack",
    "ReplayError",
    "RequestRejected",
    "RetriesExhausted",
    "RetryPolicy",
    "Sender",
    "backoff_s",
    "parse_retry_after",
    "redact",
    "rejected_records",
]

# A Retry-After is honoured up to this; past it the target is asking for something odd.
MAX_RETRY_AFTER_S = 600.0


class ReplayError(OtelWorkerError):
    """The replay stopped: something selected was not acknowledged."""

    def __init__(self, message: str, object_key: str) -> None:
        super().__init__(message)
        self.object_key = object_key


class RequestRejected(ReplayError):
    """The target refused a request for good (a status OTLP does not retry)."""


class RetriesExhausted(ReplayError):
    """A request still failed after every attempt."""


def backoff_s(
    attempt: int, initial_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with equal jitter: between half and all of initial * 2**attempt."""
    ceiling = min(max_s, initial_s * 2.0**attempt)
    return ceiling / 2 + rand() * ceiling / 2


@dataclass(frozen=True, slots=True)
class Ack:
    """An acknowledged request: how many of its records the target still rejected."""

    rejected: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    initial_s: float = 0.25
    max_s: float = 30.0


class Sender:
    """POSTs gzip'd protobuf to ``{base_url}/v1/{signal}`` with up to ``concurrency``
    connections; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        concurrency: int,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        tenant_header: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.target = redact(self.base_url)
        self._headers = dict(headers)
        # The header that names each request's tenant (None: none); an operator's header
        # of the same name (HTTP header names are case-insensitive) is sent instead.
        given = {name.lower() for name in self._headers}
        self.tenant_header = (
            tenant_header if tenant_header and tenant_header.lower() not in given else None
        )
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Sender:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._concurrency),
            timeout=self._timeout,
            headers={"User-Agent": "otelworker-replay", **self._headers},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, signal: str) -> str:
        return f"{self.base_url}/v1/{signal}"

    def request_headers(self, tenant: str | None) -> dict[str, str]:
        """A request's own headers (the session adds the operator's): its tenant's too."""
        headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
        if self.tenant_header is not None and tenant is not None:
            headers[self.tenant_header] = tenant
        return headers

    async def send(
        self, signal: str, body: bytes, *, object_key: str, tenant: str | None = None
    ) -> Ack:
        """Send one gzip'd request (of ``tenant``'s object) until it is acknowledged; raise
        if it cannot be."""
        assert self._session is not None, "use Sender as an async context manager"
        headers = self.request_headers(tenant)
        last = ""
        for attempt in range(self.retry.max_attempts):
            wait: float | None = None
            try:
                # No redirects: a 3xx is an answer like any other (and the Authorization
                # header is not carried to wherever it points).
                async with self._session.post(
                    self.url(signal), data=body, headers=headers, allow_redirects=False
                ) as resp:
                    answer = await resp.read()
                    content_type = resp.headers.get("Content-Type", "")
                    if 200 <= resp.status < 300:
                        return Ack(*rejected_records(signal, content_type, answer))
                    last = f"status_{resp.status}"
                    if resp.status not in RETRYABLE:
                        raise RequestRejected(
                            f"{self.target}/v1/{signal} answered {resp.status} for object"
                            f" {object_key}: {detail(content_type, answer) or resp.reason}",
                            object_key,
                        )
                    wait = parse_retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
            if attempt + 1 >= self.retry.max_attempts:
                break
            delay = backoff_s(attempt, self.retry.initial_s, self.retry.max_s)
            if wait is not None:
                delay = min(wait, MAX_RETRY_AFTER_S)
            log_event(
                "replay_request_retried",
                "request not acknowledged; retrying",
                reason=last,
                level=logging.WARNING,
                signal=signal,
                object_key=object_key,
                attempt=attempt + 1,
                retry_in_s=round(delay, 3),
            )
            await self._sleep(delay)
        raise RetriesExhausted(
            f"{self.target}/v1/{signal} did not acknowledge a request of object {object_key}"
            f" after {self.retry.max_attempts} attempts (last: {last})",
            object_key,
        )
