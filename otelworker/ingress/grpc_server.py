"""OTLP/gRPC: the TraceService, MetricsService and LogsService Export RPCs.

A thin adapter over the same intake as HTTP (:mod:`otelworker.ingress.intake`): grpc
receives the message (gzip-decompressed, at most ``MAX_REQUEST_BODY_BYTES``), the intake
admits, decodes and stages it, and the answer comes after the commit. The handlers take
and return raw bytes, so a malformed message is the intake's INVALID_ARGUMENT (not grpc's
INTERNAL) and the staged payload is the bytes received, never re-serialized.

Status codes per the OTLP specification: throttled -> RESOURCE_EXHAUSTED with RetryInfo;
database unavailable or stopping -> UNAVAILABLE with RetryInfo; malformed ->
INVALID_ARGUMENT; too large -> RESOURCE_EXHAUSTED without RetryInfo (grpc's own answer);
shed by the overflow policy -> OK with ``partial_success``. RetryInfo travels both as a
``google.rpc.Status`` detail in ``grpc-status-details-bin`` (what the Collector and Go
clients read) and as ``google.rpc.retryinfo-bin`` (what the Python SDK reads).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from otelworker import otlp
from otelworker.exceptions import ConfigError
from otelworker.ingress.intake import Refused, RequestId

if TYPE_CHECKING:
    from otelworker.service import Service

GRPC = "grpc"
SERVICES = {
    "traces": "opentelemetry.proto.collector.trace.v1.TraceService",
    "metrics": "opentelemetry.proto.collector.metrics.v1.MetricsService",
    "logs": "opentelemetry.proto.collector.logs.v1.LogsService",
}
_SUCCESS: dict[str, bytes] = {s: otlp.success(s, otlp.PROTOBUF) for s in otlp.SIGNALS}


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
            verdict = intake.admit(tenant)
            if inflight is not None:
                if not inflight.reserve(len(request)):
                    raise intake.inflight_refused()
                reserved = len(request)
            intake.meter(tenant, len(request))
            message, records = intake.decode(signal, request, json=False)
            accepted = await intake.stage(
                tenant,
                signal,
                GRPC,
                request,
                message,
                records,
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
        limit = self.service.settings.max_request_body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
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
        try:
            if credentials is not None:
                bound: int = server.add_secure_port(f"{host}:{port}", credentials)
            else:
                bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise ConfigError(f"GRPC_PORT: cannot listen on {host}:{port}: {exc}") from None
        if not bound:
            raise ConfigError(f"GRPC_PORT: cannot listen on {host}:{port}")
        await server.start()
        self.server = server
        self.port = bound
        return bound

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs; let those in flight finish (their commits) for ``grace`` s."""
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
