"""OTLP/gRPC from the harnesses: channels, the three Export methods, what an answer means.

Requests go out as raw bytes (no serializer: bytes in, bytes out), the same protobuf
bodies the HTTP lanes send, so the ids the stress ledger tracks are the same. Every
answer is reduced to the HTTP status it is the analogue of, so that the ledgers, the
accounting invariant and the benchmark's durable check count gRPC exactly as HTTP:

============================================  =======  =================================
gRPC answer                                   counted  meaning
============================================  =======  =================================
OK                                            200      acknowledged: committed
OK with ``partial_success`` rejecting records 202      shed by the overflow policy
RESOURCE_EXHAUSTED with RetryInfo             429      throttled (rate limit, saturation)
RESOURCE_EXHAUSTED without RetryInfo          413      too large (grpc's own refusal)
UNAVAILABLE with RetryInfo                    503      the service's refusal (stopping,
                                                       database unavailable)
INVALID_ARGUMENT / UNIMPLEMENTED / INTERNAL   400 / 404 / 500
anything else (DEADLINE_EXCEEDED, CANCELLED,  0        no answer: may or may not have
UNAVAILABLE without RetryInfo: transport)              been stored
============================================  =======  =================================

An UNAVAILABLE without RetryInfo comes from the channel (connection refused or lost),
not from the service's handler, so it says nothing about whether the request committed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

METHODS = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
RESPONSE_TYPES: dict[str, Any] = {
    "traces": ExportTraceServiceResponse,
    "metrics": ExportMetricsServiceResponse,
    "logs": ExportLogsServiceResponse,
}
REJECTED_FIELD = {
    "traces": "rejected_spans",
    "metrics": "rejected_data_points",
    "logs": "rejected_log_records",
}
STATUS_DETAILS = "grpc-status-details-bin"
RETRY_INFO = "google.rpc.retryinfo-bin"

#: How each HTTP analogue reads in a gRPC report.
LABELS = {
    200: "OK",
    202: "OK+partial_success",
    429: "RESOURCE_EXHAUSTED",
    413: "RESOURCE_EXHAUSTED(too large)",
    503: "UNAVAILABLE",
    400: "INVALID_ARGUMENT",
    404: "UNIMPLEMENTED",
    500: "INTERNAL",
    0: "no answer",
}
_DEFINITE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.INTERNAL: 500,
}


def label(status: int) -> str:
    return LABELS.get(status, str(status))


def target_of(url: str) -> str:
    """``grpc://host:port[/...]`` or ``host:port`` -> ``host:port``."""
    return url.removeprefix("grpc://").split("/", 1)[0]


def channel(target: str) -> grpc.aio.Channel:
    """A channel with its own connection (channels to one target would share one)."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", -1),
        ],
    )


@dataclass
class Answer:
    """One Export call's outcome, as the HTTP status it is the analogue of."""

    status: int
    code: str  # the gRPC code name
    body: bytes = b""  # the response (OK), else the google.rpc.Status of the trailers
    retry_after: int | None = None  # RetryInfo, whole seconds (None: no RetryInfo)
    retry_info_twice: bool = False  # RetryInfo both as a Status detail and retryinfo-bin
    details: str = ""


def rejected(signal: str, body: bytes) -> int:
    """Records an OK response's ``partial_success`` says were rejected (0 if none)."""
    if not body:
        return 0
    message = RESPONSE_TYPES[signal]()
    message.ParseFromString(body)
    if not message.HasField("partial_success"):
        return 0
    return int(getattr(message.partial_success, REJECTED_FIELD[signal]))


def _retry_info(trailers: Iterable[tuple[str, Any]]) -> tuple[int | None, bytes, bool]:
    """(RetryInfo seconds, the Status detail bytes, RetryInfo found in both places)."""
    seconds: int | None = None
    in_status = in_header = False
    status_bytes = b""
    for key, value in trailers:
        if key == STATUS_DETAILS and isinstance(value, bytes):
            status_bytes = value
            status = status_pb2.Status()
            status.ParseFromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    in_status = True
                    seconds = int(info.retry_delay.seconds)
        elif key == RETRY_INFO and isinstance(value, bytes):
            info = error_details_pb2.RetryInfo()
            info.ParseFromString(value)
            in_header = True
            if seconds is None:
                seconds = int(info.retry_delay.seconds)
    return seconds, status_bytes, in_status and in_header


def ok_answer(signal: str, body: bytes) -> Answer:
    return Answer(202 if rejected(signal, body) else 200, "OK", body)


def error_answer(exc: grpc.aio.AioRpcError) -> Answer:
    code = exc.code()
    seconds, status_bytes, twice = _retry_info(exc.trailing_metadata() or ())
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        status = 429 if seconds is not None else 413
    elif code is grpc.StatusCode.UNAVAILABLE:
        status = 503 if seconds is not None else 0
    else:
        status = _DEFINITE.get(code, 0)
    return Answer(status, code.name, status_bytes, seconds, twice, exc.details() or "")


class Exporter:
    """The three Export methods on one channel; :meth:`export` never raises an RPC error."""

    def __init__(self, chan: grpc.aio.Channel) -> None:
        self.channel = chan
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {
            signal: chan.unary_unary(method) for signal, method in METHODS.items()
        }

    async def export(
        self, signal: str, body: bytes, *, deadline_s: float, gzip: bool = False
    ) -> Answer:
        """One Export call; ``deadline_s`` is the gRPC deadline (the service sees it too)."""
        compression = grpc.Compression.Gzip if gzip else None
        call = self._calls[signal]
        try:
            response = await call(body, timeout=deadline_s, compression=compression)
        except grpc.aio.AioRpcError as exc:
            return error_answer(exc)
        return ok_answer(signal, response)
