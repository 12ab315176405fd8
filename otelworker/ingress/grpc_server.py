"""OTLP/gRPC: the TraceService, MetricsService and LogsService Export RPCs.

A thin adapter over the same intake as HTTP (:mod:`otelworker.ingress.intake`): grpc
receives the message (gzip-decompressed, at most ``MAX_REQUEST_BODY_BYTES``), the intake
admits, decodes and stages it, and the answer comes after the commit. The handlers take
and return raw bytes, so a malformed message is the intake's INVALID_ARGUMENT (not grpc's
INTERNAL) and the staged payload is the bytes received, never re-serialized.

Status codes per the OTLP specification: throttled -> RESOURCE_EXHAUSTED with RetryInfo;
database unavailable or stopping -> UNAVAILABLE with RetryInfo; malformed ->
INVALID_ARGUMENT; too large -> RESOURCE_EXHAUSTED without RetryInfo (ours, counted as
``too_large``, up to :func:`grpc_receive_limit`; grpc's own answer past that);
shed by the overflow policy -> OK with ``partial_success``. RetryInfo travels both as a
``google.rpc.Status`` detail in ``grpc-status-details-bin`` (what the Collector and Go
clients read) and as ``google.rpc.retryinfo-bin`` (what the Python SDK reads).

The same server answers ``grpc.health.v1.Health`` (:mod:`otelworker.ingress.grpc_health`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from otelworker import otlp
from otelworker.exceptions import ConfigError
from otelworker.ingress.grpc_health import Health
from otelworker.ingress.intake import Kind, Refused, RequestId

if TYPE_CHECKING:
    from otelworker.service import Service

GRPC = "grpc"
SERVICES = {
    "traces": "opentelemetry.proto.collector.trace.v1.TraceService",
    "metrics": "opentelemetry.proto.collector.metrics.v1.MetricsService",
    "logs": "opentelemetry.proto.collector.logs.v1.LogsService",
}
_SUCCESS: dict[str, bytes] = {s: otlp.success(s, otlp.PROTOBUF) for s in otlp.SIGNALS}
_GRPC_MAX_INT = 2**31 - 1  # grpc's integer channel options are C ints


def grpc_receive_limit(limit: int) -> int:
    """grpc's own maximum received message for a MAX_REQUEST_BODY_BYTES of ``limit``.

    Twice ours, so that a message over our limit (up to twice it) reaches the handler, which
    refuses it as HTTP refuses a 413: RESOURCE_EXHAUSTED, counted in
    ``otelworker_requests_refused_total{reason="too_large"}`` and logged. grpc refuses a
    message inside its core, before any handler, and that refusal is in no metric; a limit
    of its own is still needed, since grpc holds a message whole before the handler sees it
    (grpc's bound, past which it answers RESOURCE_EXHAUSTED itself, uncounted).
    """
    return min(2 * limit, _GRPC_MAX_INT)


def _trailers(refusal: Refused, code: grpc.StatusCode) -> tuple[tuple[str, bytes], ...]:
    if refusal.retry_after is None or not refusal.kind.retryable:
        return ()
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=refusal.retry_after)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=refusal.message, details=[detail])
    return (
        ("grpc-status-details-bin", status.SerializeToString()),
        ("google.rpc.retryinfo-bin", info.SerializeToString()),
    )


def _metadata(context: grpc.aio.ServicerContext[Any, Any], *keys: str) -> list[str | None]:
    """The first value of each metadata key (keys lower case, as gRPC sends them)."""
    found: list[str | None] = [None] * len(keys)
    for key, value in context.invocation_metadata() or ():
        if key in keys and isinstance(value, str):
            index = keys.index(key)
            if found[index] is None:
                found[index] = value
    return found


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> RequestId:
    return RequestId(lambda: _metadata(context, "x-request-id")[0] or "")


class OtlpGrpc:
    """The three Export RPCs on one grpc.aio server, in the service's event loop."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._tenant_key = service.settings.tenant_header.lower()
        self._limit = service.settings.max_request_body_bytes
        self.health: Health | None = None

    def _handler(
        self, signal: str
    ) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]:
        async def export(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return await self._export(signal, request, context)

        return export

    async def _export(
        self, signal: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        intake = self.service.intake
        request_id = _request_id(context)
        inflight = self.service.inflight
        reserved = 0
        tenant = None
        try:
            # Who sends, before any other work.
            authorization, named = _metadata(context, "authorization", self._tenant_key)
            tenant = intake.identify(authorization, named)
            if len(request) > self._limit:
                # Can never be accepted: refused before any admission that could answer a
                # retryable RESOURCE_EXHAUSTED (as HTTP answers 413 before a 429).
                raise Refused(
                    Kind.TOO_LARGE,
                    "too_large",
                    f"message of {len(request)} bytes exceeds the limit of {self._limit} bytes",
                )
            verdict = intake.admit(tenant)
            if inflight is not None:
                if not inflight.reserve(len(request)):
                    raise intake.inflight_refused()
                reserved = len(request)
            intake.meter(tenant, len(request))
            decoded = intake.decode(signal, request, json=False)
            accepted = await intake.stage(
                tenant,
                signal,
                GRPC,
                decoded,
                verdict,
                request_id,
                shed_status="OK",
            )
        except Refused as refusal:
            code = grpc.StatusCode[refusal.kind.grpc_code]
            size = len(request) if tenant is not None else 0
            intake.refused(signal, GRPC, refusal, code.name, request_id, tenant, size)
            intake.answered(signal, GRPC, code.name)
            await context.abort(code, refusal.message, trailing_metadata=_trailers(refusal, code))
            raise AssertionError("abort() returned") from None  # pragma: no cover
        except Exception as exc:
            intake.internal_error(signal, GRPC, "INTERNAL", exc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; retry later")
            raise AssertionError("abort() returned") from None  # pragma: no cover
        finally:
            if inflight is not None and reserved:
                inflight.release(reserved)
        intake.answered(signal, GRPC, "OK")
        if accepted.shed is not None:
            return otlp.partial_success(signal, otlp.PROTOBUF, accepted.records, accepted.shed)
        return _SUCCESS[signal]

    async def start(self, host: str, port: int) -> int:
        from otelworker.tls import grpc_credentials

        # TLS_CERT_FILE set: TLS (and with TLS_CLIENT_CA_FILE, client certificates) here too.
        credentials = grpc_credentials(self.service.settings)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", grpc_receive_limit(self._limit)),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ]
        )
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    name, {"Export": grpc.unary_unary_rpc_method_handler(self._handler(signal))}
                )
                for signal, name in SERVICES.items()
            ]
        )
        health = Health(self.service, list(SERVICES.values()))
        try:
            if credentials is not None:
                bound: int = server.add_secure_port(f"{host}:{port}", credentials)
            else:
                bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise ConfigError(f"GRPC_PORT: cannot listen on {host}:{port}: {exc}") from None
        if not bound:
            raise ConfigError(f"GRPC_PORT: cannot listen on {host}:{port}")
        health.add_to(server)
        await server.start()
        self.health = health
        self.server = server
        self.port = bound
        return bound

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs; let those in flight finish (their commits) for ``grace`` s.
        The Health service says NOT_SERVING first, and its Watch streams end."""
        if self.health is not None:
            await self.health.close()
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
