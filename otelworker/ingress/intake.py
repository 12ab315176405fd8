"""The transport-neutral intake: admission, decoding, staging, and what each refusal means.

Both transports call it: the HTTP routes (:mod:`otelworker.ingress.routes`) once they have
read and decompressed a body, the gRPC services (:mod:`otelworker.ingress.grpc`) with the
message grpc has received. A refusal is a :class:`Refused` whose :class:`Kind` carries its
meaning for every transport (HTTP status, Status body code, gRPC code, retryable or not),
as the Collector's receiver errors do; the intake counts it and logs it once, the
transport only renders it.

Order: :meth:`Intake.admit` (rate limit, readiness, staging saturation: before the body
is read where the transport allows), :meth:`Intake.decode`, :meth:`Intake.stage` (load
shedding, or the group commit and its answer after the commit).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from otelworker import otlp
from otelworker.compression import ENCODING, compress
from otelworker.exceptions import BadPayload, OtelWorkerError, StagingUnavailable
from otelworker.ingress.admission import Verdict
from otelworker.logs import log_event
from otelworker.staging.queue import Facts

if TYPE_CHECKING:
    from otelworker.service import Service

# Larger payloads are compressed in a thread (ISA-L and zstd release the GIL), smaller ones
# inline: a thread hop costs more than compressing a few hundred KB at level 1.
_INLINE_COMPRESS_BYTES = 512 * 1024

SHED_MESSAGE = "staging queue saturated; records shed by overflow policy {policy} (not stored)"


class Kind(enum.Enum):
    """What a refusal means: (HTTP status, Status body code, gRPC code name, retryable)."""

    THROTTLED = (429, otlp.CODE_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", True)
    UNAVAILABLE = (503, otlp.CODE_UNAVAILABLE, "UNAVAILABLE", True)
    TOO_LARGE = (413, otlp.CODE_INVALID_ARGUMENT, "RESOURCE_EXHAUSTED", False)
    INVALID = (400, otlp.CODE_INVALID_ARGUMENT, "INVALID_ARGUMENT", False)
    UNSUPPORTED = (415, otlp.CODE_INVALID_ARGUMENT, "INVALID_ARGUMENT", False)
    METHOD = (405, otlp.CODE_UNIMPLEMENTED, "UNIMPLEMENTED", False)

    def __init__(self, http_status: int, body_code: int, grpc_code: str, retryable: bool):
        self.http_status = http_status
        self.body_code = body_code
        self.grpc_code = grpc_code
        self.retryable = retryable


class Refused(OtelWorkerError):
    """A request refused: nothing of it was kept. ``retry_after`` in whole seconds."""

    def __init__(
        self,
        kind: Kind,
        reason: str,
        message: str,
        *,
        retry_after: int | None = None,
        records: int = 0,
        event: tuple[str, str] | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.records = records
        self.event = event or ("request_refused", reason)
        self.context = context


@dataclass(frozen=True, slots=True)
class Accepted:
    """Staged and committed (``shed is None``), or shed by the overflow policy: the
    message for ``partial_success``, ``records`` of them rejected."""

    records: int
    shed: str | None = None


class RequestId:
    """The client's request id, else a fresh one; made only when something is logged."""

    __slots__ = ("_given", "_value")

    def __init__(self, given: Callable[[], str]) -> None:
        self._given = given
        self._value: str | None = None

    def __str__(self) -> str:
        if self._value is None:
            self._value = self._given()[:64] or uuid.uuid4().hex[:16]
        return self._value


class Intake:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics

    # --- admission ------------------------------------------------------------------------

    def admit(self) -> Verdict:
        """Rate limit, readiness, staging saturation; raises :class:`Refused`."""
        service = self.service
        settings = self.settings
        limiter = service.limiter
        if limiter is not None and not limiter.try_acquire():
            raise Refused(
                Kind.THROTTLED,
                "rate_limited",
                "rate limit exceeded; retry after the Retry-After delay",
                retry_after=limiter.retry_after(),
                event=("rate_limited", "limit_exceeded"),
            )
        if not service.accepting or service.committer is None or service.gate is None:
            raise Refused(
                Kind.UNAVAILABLE,
                "unavailable",
                "service is shutting down or not ready",
                retry_after=settings.unavailable_retry_after_s,
            )
        verdict = service.gate.decide()
        if verdict is Verdict.REJECT:
            raise Refused(
                Kind.THROTTLED,
                "queue_full_reject",
                "staging queue saturated; retry after the Retry-After delay",
                retry_after=settings.saturated_retry_after_s,
                event=("queue_saturated", "queue_full_reject"),
                backlog=service.gate.backlog.value,
            )
        return verdict

    @staticmethod
    def inflight_refused() -> Refused:
        return Refused(
            Kind.THROTTLED,
            "inflight_bytes",
            "request bytes in flight at the limit (MAX_INFLIGHT_BYTES); retry after the"
            " Retry-After delay",
            retry_after=1,
        )

    # --- decoding -------------------------------------------------------------------------

    @staticmethod
    def decode(signal: str, data: bytes, json: bool) -> tuple[Any, int]:
        """The request message and its record count; :class:`Refused` if malformed."""
        try:
            message = otlp.decode_json(signal, data) if json else otlp.decode(signal, data)
        except BadPayload as exc:
            raise Refused(Kind.INVALID, "bad_request", str(exc)) from None
        return message, otlp.count_records(signal, message)

    # --- staging --------------------------------------------------------------------------

    async def stage(
        self,
        signal: str,
        transport: str,
        payload: bytes,
        message: Any,
        records: int,
        verdict: Verdict,
        request_id: RequestId,
        shed_status: int | str,
    ) -> Accepted:
        """Shed by the policy (answered ``shed_status``), or commit; answer after the commit."""
        metrics = self.metrics
        settings = self.settings
        if verdict is not Verdict.ACCEPT:
            # Load shedding: nothing staged; partial_success tells a client that looks.
            policy = settings.overflow_policy.value
            metrics.requests_refused.labels(transport, signal, verdict.value).inc()
            metrics.records_refused.labels(transport, signal, verdict.value).inc(records)
            self.service.events.emit(
                "load_shedding",
                "queue_full_drop_or_sample",
                "staging queue saturated; request shed",
                signal=signal,
                transport=transport,
                status=shed_status,
                policy=policy,
                records=records,
                request_id=str(request_id),
            )
            return Accepted(records, SHED_MESSAGE.format(policy=policy))
        if records == 0:
            return Accepted(0)

        committer = self.service.committer
        assert committer is not None  # admit() saw it
        # Decode once: what the flush needs, from this decode; the payload stored in the
        # object's codec, so the flush joins it as it is.
        span = otlp.time_range(signal, message)
        codec = settings.s3_compression
        if len(payload) > _INLINE_COMPRESS_BYTES:
            stored = await asyncio.to_thread(compress, payload, codec, settings.compression_level)
        else:
            stored = compress(payload, codec, settings.compression_level)
        facts = Facts(
            ENCODING[codec],
            len(payload),
            span[0] if span else None,
            span[1] if span else None,
            tuple(sorted(otlp.service_names(signal, message))),
        )
        started = time.monotonic()
        try:
            # Bounded by STAGING_COMMIT_TIMEOUT_S inside the committer, which withdraws an
            # entry no commit has taken, so a 503 always means "not stored".
            xid = await committer.stage(signal, stored, records, facts)
        except StagingUnavailable as exc:
            raise Refused(
                Kind.UNAVAILABLE,
                "unavailable",
                "staging database unavailable; the data was not accepted, retry later",
                retry_after=settings.unavailable_retry_after_s,
                records=records,
                cause=str(exc).split(":")[0],
            ) from None
        metrics.stage_duration.observe(time.monotonic() - started)
        if self.service.backlog is not None:
            self.service.backlog.add(1, xid)
        metrics.records_accepted.labels(transport, signal).inc(records)
        metrics.request_bytes.labels(transport, signal).inc(len(payload))
        metrics.staged_bytes.labels(signal).inc(len(stored))
        return Accepted(records)

    # --- accounting -----------------------------------------------------------------------

    def refused(
        self,
        signal: str,
        transport: str,
        refusal: Refused,
        status: int | str,
        request_id: RequestId,
    ) -> None:
        """Count a refusal and log it (aggregated); ``status`` as the transport says it."""
        metrics = self.metrics
        metrics.requests_refused.labels(transport, signal, refusal.reason).inc()
        if refusal.records:
            metrics.records_refused.labels(transport, signal, refusal.reason).inc(refusal.records)
        event, reason = refusal.event
        self.service.events.emit(
            event,
            reason,
            refusal.message,
            signal=signal,
            transport=transport,
            status=status,
            request_id=str(request_id),
            **refusal.context,
        )

    def answered(self, signal: str, transport: str, code: str) -> None:
        self.metrics.requests.labels(transport, signal, code).inc()

    def internal_error(self, signal: str, transport: str, code: str, exc: Exception) -> None:
        """A bug of ours, never the client's: one event with the traceback, counted."""
        log_event(
            "internal_error",
            "unexpected error while handling an export request",
            reason=type(exc).__name__,
            level=logging.ERROR,
            exc_info=exc,
            signal=signal,
            transport=transport,
        )
        self.answered(signal, transport, code)
