"""The OTLP/HTTP endpoints (POST /v1/traces, /v1/metrics, /v1/logs) and the probes.

Order of work per request, cheapest refusal first: content type and encoding, rate limit
(before the body is read), staging saturation (before it is decompressed and decoded),
body size, decompression, decoding, then the group commit. A 200 is sent only after the
commit. A refusal made before the body is read whole is answered through
:class:`~otelworker.ingress.body.RefusedBeforeBody`, which keeps the connection usable.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from otelworker import otlp
from otelworker.exceptions import BadPayload, StagingUnavailable
from otelworker.ingress.admission import Verdict
from otelworker.ingress.body import (
    BadEncoding,
    BodyTooLarge,
    RefusedBeforeBody,
    UnsupportedEncoding,
    codings,
    decompress,
    read_limited,
)
from otelworker.logs import log_event
from otelworker.service import Service

SHED_MESSAGE = "staging queue saturated; records shed by overflow policy {policy} (not stored)"


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _encoding(request: Request) -> otlp.Encoding | None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/x-protobuf":
        return otlp.PROTOBUF
    if content_type == "application/json":
        return otlp.JSON
    return None


class _Answer:
    """Builds a request's responses and counts them."""

    def __init__(self, service: Service, signal: str, encoding: otlp.Encoding, request: Request):
        self.service = service
        self.signal = signal
        self.encoding = encoding
        self._request = request
        self._request_id: str | None = None

    @property
    def request_id(self) -> str:
        """The client's X-Request-Id, else a fresh one; made only when something is logged."""
        if self._request_id is None:
            given = self._request.headers.get("x-request-id", "")
            self._request_id = given[:64] or uuid.uuid4().hex[:16]
        return self._request_id

    def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
        self.service.metrics.requests.labels(self.signal, str(status)).inc()
        return Response(body, status, headers=headers, media_type=self.encoding.content_type)

    def error(
        self,
        status: int,
        code: int,
        message: str,
        *,
        reason: str,
        records: int = 0,
        headers: dict[str, str] | None = None,
        event: tuple[str, str] | None = None,
        **context: Any,
    ) -> Response:
        metrics = self.service.metrics
        metrics.requests_refused.labels(self.signal, reason).inc()
        if records:
            metrics.records_refused.labels(self.signal, reason).inc(records)
        log_event, log_reason = event or ("request_refused", reason)
        self.service.events.emit(
            log_event,
            log_reason,
            message,
            signal=self.signal,
            status=status,
            request_id=self.request_id,
            **context,
        )
        return self.respond(status, otlp.status_body(code, message, self.encoding), headers)


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared and declared.isdigit() else None


class _NoAnswer(Response):
    """For a client that went away: nothing to send (the server ends the stream)."""

    def __init__(self) -> None:
        super().__init__(b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


async def export(request: Request) -> Response:
    signal = request.scope["path"].rsplit("/", 1)[-1]
    service = _service(request)
    try:
        return await _export(request, signal, service)
    except ClientDisconnect:
        # The client went away while its body was being read: nothing staged, no answer.
        service.metrics.requests_refused.labels(signal, "client_disconnected").inc()
        service.events.emit(
            "client_disconnected",
            "client_disconnected",
            "client closed the connection before its request body was read whole",
            signal=signal,
        )
        return _NoAnswer()
    except Exception as exc:
        # A bug of ours, never the client's: one event with the traceback, a Status body.
        encoding = _encoding(request) or otlp.PROTOBUF
        log_event(
            "internal_error",
            "unexpected error while handling an export request",
            reason=type(exc).__name__,
            level=logging.ERROR,
            exc_info=exc,
            signal=signal,
        )
        service.metrics.requests.labels(signal, "500").inc()
        return Response(
            otlp.status_body(otlp.CODE_INTERNAL, "internal error; retry later", encoding),
            500,
            media_type=encoding.content_type,
        )


async def _export(request: Request, signal: str, service: Service) -> Response:
    encoding = _encoding(request)
    settings = service.settings
    limit = settings.max_request_body_bytes
    declared = _declared_length(request)

    def before_body(response: Response, *, close: bool = False) -> Response:
        return RefusedBeforeBody(response, declared=declared, limit=limit, close=close)

    if request.method != "POST":
        answer = _Answer(service, signal, encoding or otlp.PROTOBUF, request)
        return before_body(
            answer.error(
                405,
                otlp.CODE_UNIMPLEMENTED,
                f"method {request.method} not allowed; OTLP/HTTP uses POST",
                reason="method_not_allowed",
                headers={"Allow": "POST"},
            )
        )
    if encoding is None:
        answer = _Answer(service, signal, otlp.PROTOBUF, request)
        return before_body(
            answer.error(
                415,
                otlp.CODE_INVALID_ARGUMENT,
                "unsupported Content-Type; use application/x-protobuf or application/json",
                reason="unsupported_media_type",
            )
        )
    answer = _Answer(service, signal, encoding, request)
    try:
        decoders = codings(request.headers.get("content-encoding", ""))
    except UnsupportedEncoding as exc:
        return before_body(
            answer.error(415, otlp.CODE_INVALID_ARGUMENT, str(exc), reason="unsupported_encoding")
        )

    # 1. Rate limit, before the body is read.
    limiter = service.limiter
    if limiter is not None and not limiter.try_acquire():
        return before_body(
            answer.error(
                429,
                otlp.CODE_RESOURCE_EXHAUSTED,
                "rate limit exceeded; retry after the Retry-After delay",
                reason="rate_limited",
                headers={"Retry-After": str(limiter.retry_after())},
                event=("rate_limited", "limit_exceeded"),
            )
        )
    if not service.accepting or service.committer is None or service.gate is None:
        # Stopping or not ready: the client had better reconnect (to another replica).
        return before_body(
            answer.error(
                503,
                otlp.CODE_UNAVAILABLE,
                "service is shutting down or not ready",
                reason="unavailable",
                headers={"Retry-After": str(settings.unavailable_retry_after_s)},
            ),
            close=True,
        )

    # 2. Staging saturation, before the body is decompressed and decoded.
    verdict = service.gate.decide()
    if verdict is Verdict.REJECT:
        return before_body(
            answer.error(
                429,
                otlp.CODE_RESOURCE_EXHAUSTED,
                "staging queue saturated; retry after the Retry-After delay",
                reason="queue_full_reject",
                headers={"Retry-After": str(settings.saturated_retry_after_s)},
                event=("queue_saturated", "queue_full_reject"),
                backlog=service.gate.backlog.value,
            )
        )

    # 3. Body: bounded read, bounded decompression, decode.
    try:
        raw = await read_limited(request.stream(), limit, declared)
    except BodyTooLarge as exc:
        # Refused by its declared or its counted size: not worth reading on.
        return before_body(
            answer.error(413, otlp.CODE_INVALID_ARGUMENT, str(exc), reason="too_large"),
            close=True,
        )
    try:
        data = decompress(raw, decoders, limit)
        message = otlp.decode_json(signal, data) if encoding.json else otlp.decode(signal, data)
    except BodyTooLarge as exc:
        return answer.error(413, otlp.CODE_INVALID_ARGUMENT, str(exc), reason="too_large")
    except (BadEncoding, BadPayload) as exc:
        return answer.error(400, otlp.CODE_INVALID_ARGUMENT, str(exc), reason="bad_request")
    records = otlp.count_records(signal, message)

    if verdict is not Verdict.ACCEPT:
        # Load shedding: 202, nothing staged; partial_success tells a client that looks.
        text = SHED_MESSAGE.format(policy=settings.overflow_policy.value)
        service.metrics.requests_refused.labels(signal, verdict.value).inc()
        service.metrics.records_refused.labels(signal, verdict.value).inc(records)
        service.events.emit(
            "load_shedding",
            "queue_full_drop_or_sample",
            "staging queue saturated; request shed",
            signal=signal,
            status=202,
            policy=settings.overflow_policy.value,
            records=records,
            request_id=answer.request_id,
        )
        return answer.respond(202, otlp.partial_success(signal, encoding, records, text))

    if records == 0:
        return answer.respond(200, otlp.success(signal, encoding))

    # 4. Stage durably; answer after the commit.
    payload = message.SerializeToString() if encoding.json else data
    started = time.monotonic()
    try:
        async with asyncio.timeout(settings.staging_commit_timeout_s):
            xid = await service.committer.stage(signal, payload, records)
    except (StagingUnavailable, TimeoutError) as exc:
        return answer.error(
            503,
            otlp.CODE_UNAVAILABLE,
            "staging database unavailable; the data was not accepted, retry later",
            reason="unavailable",
            records=records,
            headers={"Retry-After": str(settings.unavailable_retry_after_s)},
            cause=type(exc).__name__,
        )
    service.metrics.stage_duration.observe(time.monotonic() - started)
    if service.backlog is not None:
        service.backlog.add(1, xid)
    service.metrics.records_accepted.labels(signal).inc(records)
    service.metrics.request_bytes.labels(signal).inc(len(payload))
    return answer.respond(200, otlp.success(signal, encoding))


async def healthz(request: Request) -> Response:
    service = _service(request)
    if not service.supervisor.healthy:
        return PlainTextResponse(
            f"unhealthy: task died: {', '.join(service.supervisor.failed)}\n", 503
        )
    return PlainTextResponse("ok\n")


async def readyz(request: Request) -> Response:
    ok, reason = await _service(request).readiness()
    return PlainTextResponse(f"{reason}\n", 200 if ok else 503)


async def metrics(request: Request) -> Response:
    registry = _service(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

routes = [
    *(Route(f"/v1/{signal}", export, methods=ALL_METHODS, name=signal) for signal in otlp.SIGNALS),
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/readyz", readyz, methods=["GET", "HEAD"]),
    Route("/metrics", metrics, methods=["GET"]),
]
