"""The transport-neutral intake: admission, decoding, staging, and what each refusal means.

Both transports call it: the HTTP routes (:mod:`otelworker.ingress.routes`) once they have
read and decompressed a body, the gRPC services (:mod:`otelworker.ingress.grpc`) with the
message grpc has received. A refusal is a :class:`Refused` whose :class:`Kind` carries its
meaning for every transport (HTTP status, Status body code, gRPC code, retryable or not),
as the Collector's receiver errors do; the intake counts it and logs it once, the
transport only renders it.

Order: :meth:`Intake.identify` (the bearer token, else the tenant header: before any other
work), :meth:`Intake.admit` (the tenant's request rate, readiness, staging saturation and
the tenant's share of it: before the body is read where the transport allows),
:meth:`Intake.meter` (the tenant's ingest bytes, on the decompressed body),
:meth:`Intake.decode`, :meth:`Intake.stage` (load shedding, or the group commit and its
answer after the commit).
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
from otelworker.compression import ENCODING, checksum, compress
from otelworker.exceptions import (
    BadPayload,
    OtelWorkerError,
    StagingRefused,
    StagingUnavailable,
)
from otelworker.ingress.admission import Verdict
from otelworker.ingress.tenants import Tenant, Tenants, valid_tenant
from otelworker.logs import log_event
from otelworker.staging.queue import Facts
from otelworker.wire import compiled

if TYPE_CHECKING:
    from otelworker.metrics import Metrics
    from otelworker.service import Service

# Larger payloads are compressed in a thread (ISA-L and zstd release the GIL), smaller ones
# inline: a thread hop costs more than compressing a few hundred KB at level 1.
_INLINE_COMPRESS_BYTES = 512 * 1024

SHED_MESSAGE = "staging queue saturated; records shed by overflow policy {policy} (not stored)"


class Kind(enum.Enum):
    """What a refusal means: (HTTP status, Status body code, gRPC code name, retryable)."""

    UNAUTHENTICATED = (401, otlp.CODE_UNAUTHENTICATED, "UNAUTHENTICATED", False)
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


@dataclass(frozen=True, slots=True)
class Decoded:
    """A request as the door stages it: its canonical protobuf ``payload`` (for JSON, the
    conversion), its record count, record time range and resource service names."""

    payload: bytes
    records: int
    span: tuple[int, int] | None
    services: tuple[str, ...]


# The tenant name of a request refused before it had one (unauthenticated, invalid name).
NO_TENANT = None


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


class _Staged:
    """The counters a staged request moves, for one (transport, signal, tenant label):
    looked up once, not by ``labels()`` on every request."""

    __slots__ = ("records", "request_bytes", "staged_bytes", "tenant_bytes", "tenant_records")

    def __init__(self, metrics: Metrics, transport: str, signal: str, label: str) -> None:
        self.records = metrics.records_accepted.labels(transport, signal)
        self.request_bytes = metrics.request_bytes.labels(transport, signal)
        self.staged_bytes = metrics.staged_bytes.labels(signal)
        self.tenant_records = metrics.tenant_records_accepted.labels(label, signal)
        self.tenant_bytes = metrics.tenant_bytes_accepted.labels(label, signal)


class Intake:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.tenants: Tenants | None = None  # set by the service at start
        # Metric children of the hot path, by their labels (bounded: the tenant label is).
        self._staged: dict[tuple[str, str, str], _Staged] = {}
        self._answered: dict[tuple[str, str, str], Any] = {}

    # --- who sends ------------------------------------------------------------------------

    def identify(self, authorization: str | None, named: str | None) -> Tenant:
        """The request's tenant: the bearer token's (AUTH_MODE=bearer), else the tenant
        header's (``named``), else DEFAULT_TENANT. Raises :class:`Refused` (401, 400)."""
        tenants = self.tenants
        if tenants is None:
            raise Refused(
                Kind.UNAVAILABLE,
                "unavailable",
                "service is shutting down or not ready",
                retry_after=self.settings.unavailable_retry_after_s,
            )
        tokens = tenants.tokens
        if tokens is not None:
            if not authorization:
                raise Refused(
                    Kind.UNAUTHENTICATED,
                    "unauthenticated",
                    "missing bearer token: send Authorization: Bearer <token>",
                    event=("auth_failed", "missing_token"),
                )
            scheme, _, token = authorization.strip().partition(" ")
            name = tokens.tenant_of(token.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                raise Refused(
                    Kind.UNAUTHENTICATED,
                    "unauthenticated",
                    "invalid bearer token",
                    event=("auth_failed", "invalid_token"),
                )
            return tenants.get(name)
        if named is None:
            if self.settings.require_tenant:
                raise Refused(
                    Kind.UNAUTHENTICATED,
                    "tenant_required",
                    f"missing tenant: send the {self.settings.tenant_header} header",
                    event=("auth_failed", "missing_tenant"),
                )
            return tenants.get(self.settings.default_tenant)
        if not valid_tenant(named):
            raise Refused(
                Kind.INVALID,
                "invalid_tenant",
                f"invalid tenant name in {self.settings.tenant_header}: 1 to 64 letters,"
                " digits, '_', '.', '-', starting with a letter or digit",
                event=("request_refused", "invalid_tenant"),
            )
        return tenants.get(named)

    # --- admission ------------------------------------------------------------------------

    def admit(self, tenant: Tenant) -> Verdict:
        """The tenant's request rate, readiness, staging saturation (in all and the
        tenant's share); raises :class:`Refused`."""
        service = self.service
        settings = self.settings
        if settings.enable_rate_limiting and not tenant.requests.try_acquire():
            raise Refused(
                Kind.THROTTLED,
                "rate_limited",
                "rate limit exceeded (RATE_LIMIT_RPS); retry after the Retry-After delay",
                retry_after=tenant.requests.retry_after(),
                event=("rate_limited", "limit_exceeded"),
                limit="requests",
            )
        if not service.accepting or service.committer is None or service.gate is None:
            raise Refused(
                Kind.UNAVAILABLE,
                "unavailable",
                "service is shutting down or not ready",
                retry_after=settings.unavailable_retry_after_s,
            )
        gate = service.gate
        verdict = gate.decide(tenant.name, tenant.limits.tenant_max_backlog)
        if verdict is Verdict.REJECT:
            if gate.saturated:
                message = "staging queue saturated; retry after the Retry-After delay"
                scope = "instance"
            else:
                message = (
                    "this tenant's share of the staging queue is full (TENANT_MAX_BACKLOG);"
                    " retry after the Retry-After delay"
                )
                scope = "tenant"
            raise Refused(
                Kind.THROTTLED,
                "queue_full_reject",
                message,
                retry_after=settings.saturated_retry_after_s,
                event=("queue_saturated", "queue_full_reject"),
                backlog=gate.backlog.value,
                scope=scope,
            )
        return verdict

    def meter(self, tenant: Tenant, size: int) -> None:
        """The tenant's ingest bytes per second, on the decompressed body; raises
        :class:`Refused` (429) past INGEST_BYTES_PER_S / INGEST_BURST_BYTES."""
        bucket = tenant.bytes
        if bucket is not None and self.settings.enable_rate_limiting and not bucket.try_take(size):
            raise Refused(
                Kind.THROTTLED,
                "ingest_rate_limited",
                "ingest bytes limit exceeded (INGEST_BYTES_PER_S); retry after the"
                " Retry-After delay",
                retry_after=bucket.retry_after(size),
                event=("rate_limited", "limit_exceeded"),
                limit="bytes",
                bytes=size,
            )

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
    def decode(signal: str, data: bytes, json: bool) -> Decoded:
        """The request checked and read for staging; :class:`Refused` if malformed.

        Protobuf is checked and read by the compiled walker (``inspect``: what upb checks,
        and the count, time range and service names, in one pass and without a message),
        else decoded by upb; JSON is decoded and converted to canonical protobuf."""
        if not json and compiled is not None:
            found = compiled.inspect(signal, data)
            if found is not False:
                records, span, names = found
                return Decoded(data, records, span, tuple(sorted(set(names))))
        try:
            message = otlp.decode_json(signal, data) if json else otlp.decode(signal, data)
        except BadPayload as exc:
            raise Refused(Kind.INVALID, "bad_request", str(exc)) from None
        payload = message.SerializeToString() if json else data
        return Decoded(
            payload,
            otlp.count_records(signal, message),
            otlp.payload_time_range(signal, payload, message),
            tuple(sorted(otlp.service_names(signal, message))),
        )

    # --- staging --------------------------------------------------------------------------

    async def stage(
        self,
        tenant: Tenant,
        signal: str,
        transport: str,
        decoded: Decoded,
        verdict: Verdict,
        request_id: RequestId,
        shed_status: int | str,
        metered: int | None = None,
    ) -> Accepted:
        """Shed by the policy (answered ``shed_status``), or commit; answer after the commit.

        ``metered``: the request's bytes as the tenant's byte limit counted them (the
        decompressed body as received: for JSON the JSON text), which the per-tenant byte
        counters use too; else the payload's size."""
        payload, records = decoded.payload, decoded.records
        size = len(payload) if metered is None else metered
        metrics = self.metrics
        settings = self.settings
        if verdict is not Verdict.ACCEPT:
            # Load shedding: nothing staged; partial_success tells a client that looks.
            policy = settings.overflow_policy.value
            reason = verdict.value
            metrics.requests_refused.labels(transport, signal, reason).inc()
            metrics.records_refused.labels(transport, signal, reason).inc(records)
            metrics.tenant_requests_refused.labels(tenant.label, signal, reason).inc()
            metrics.tenant_records_refused.labels(tenant.label, signal, reason).inc(records)
            metrics.tenant_bytes_refused.labels(tenant.label, signal, reason).inc(size)
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
                tenant=tenant.name,
            )
            return Accepted(records, SHED_MESSAGE.format(policy=policy))
        if records == 0:
            return Accepted(0)

        committer = self.service.committer
        assert committer is not None  # admit() saw it
        # What the flush needs, from this decode; the payload stored in the object's codec,
        # so the flush joins it as it is, checked by its checksum.
        span = decoded.span
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
            decoded.services,
            checksum(stored),
        )
        started = time.monotonic()
        try:
            # Bounded by STAGING_COMMIT_TIMEOUT_S inside the committer, which withdraws an
            # entry no commit has taken, so a 503 always means "not stored".
            xid = await committer.stage(signal, stored, records, facts, tenant.name)
        except StagingRefused as exc:
            # The database refuses this payload's data: a retry can never succeed.
            raise Refused(
                Kind.INVALID,
                "unstorable",
                "the staging database refused this request's data; the data was not"
                " accepted, and a retry will not succeed",
                records=records,
                cause=str(exc).split(":")[-1].strip(),
            ) from None
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
            self.service.backlog.add(1, xid, tenant.name)
        key = (transport, signal, tenant.label)
        counters = self._staged.get(key)
        if counters is None:
            counters = self._staged[key] = _Staged(metrics, *key)
        counters.records.inc(records)
        counters.request_bytes.inc(len(payload))
        counters.staged_bytes.inc(len(stored))
        counters.tenant_records.inc(records)
        counters.tenant_bytes.inc(size)
        return Accepted(records)

    # --- accounting -----------------------------------------------------------------------

    def refused(
        self,
        signal: str,
        transport: str,
        refusal: Refused,
        status: int | str,
        request_id: RequestId,
        tenant: Tenant | None = NO_TENANT,
        size: int = 0,
    ) -> None:
        """Count a refusal and log it (aggregated); ``status`` as the transport says it,
        ``size`` the bytes refused as far as they were read (decompressed where known)."""
        metrics = self.metrics
        reason_label = refusal.reason
        metrics.requests_refused.labels(transport, signal, reason_label).inc()
        if refusal.records:
            metrics.records_refused.labels(transport, signal, reason_label).inc(refusal.records)
        context = refusal.context
        if tenant is not None:
            label = tenant.label
            metrics.tenant_requests_refused.labels(label, signal, reason_label).inc()
            if refusal.records:
                metrics.tenant_records_refused.labels(label, signal, reason_label).inc(
                    refusal.records
                )
            if size:
                metrics.tenant_bytes_refused.labels(label, signal, reason_label).inc(size)
            context = {**context, "tenant": tenant.name}
        event, reason = refusal.event
        self.service.events.emit(
            event,
            reason,
            refusal.message,
            signal=signal,
            transport=transport,
            status=status,
            request_id=str(request_id),
            **context,
        )

    def answered(self, signal: str, transport: str, code: str) -> None:
        key = (transport, signal, code)
        counter = self._answered.get(key)
        if counter is None:
            counter = self._answered[key] = self.metrics.requests.labels(*key)
        counter.inc()

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
