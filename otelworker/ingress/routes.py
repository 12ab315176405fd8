"""The OTLP/HTTP endpoints (POST /v1/traces, /v1/metrics, /v1/logs) and the probes.

Order of work per request, cheapest refusal first: who sends (the bearer token, else the
tenant header: 401/400 before any other work), method, content type and encoding, the
tenant's request rate (before the body is read), staging saturation (before it is
decompressed and decoded), body size, decompression, the tenant's ingest bytes, decoding,
then the group commit. A 200 is sent only after the
commit. An answer given before the body is read whole keeps the connection usable
through :class:`~otelworker.ingress.body.DrainUnreadBody`, the app's middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from otelworker import otlp
from otelworker.front.protocol import ANSWERED
from otelworker.ingress.admission import Verdict
from otelworker.ingress.body import (
    BadEncoding,
    BodyTooLarge,
    Decoder,
    InflightFull,
    UnsupportedEncoding,
    codings,
    decompress,
    read_limited,
)
from otelworker.ingress.intake import Intake, Kind, Refused, RequestId
from otelworker.ingress.tenants import Tenant
from otelworker.service import Service

HTTP = "http"


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


class _Head:
    """The request headers the export path reads, taken in one pass over the raw list
    (ASGI gives the names lowercased): the first of each, and every Content-Encoding line
    (several lines are one list, RFC 9110 §5.3)."""

    __slots__ = ("authorization", "content_type", "encodings", "length", "request_id", "tenant")

    def __init__(self, scope: Scope, tenant_header: bytes) -> None:
        self.content_type: bytes | None = None
        self.length: bytes | None = None
        self.authorization: str | None = None
        self.tenant: str | None = None
        self.request_id = ""
        self.encodings: list[str] = []
        for key, value in scope["headers"]:
            if key == b"content-type":
                if self.content_type is None:
                    self.content_type = value
            elif key == b"content-length":
                if self.length is None:
                    self.length = value
            elif key == b"content-encoding":
                self.encodings.append(value.decode("latin-1"))
            elif key == b"authorization":
                if self.authorization is None:
                    self.authorization = value.decode("latin-1")
            elif key == tenant_header:
                if self.tenant is None:
                    self.tenant = value.decode("latin-1")
            elif key == b"x-request-id" and not self.request_id:
                self.request_id = value.decode("latin-1")

    @property
    def encoding(self) -> otlp.Encoding | None:
        media = (self.content_type or b"").split(b";")[0].strip().lower()
        if media == b"application/x-protobuf":
            return otlp.PROTOBUF
        if media == b"application/json":
            return otlp.JSON
        return None

    @property
    def declared_length(self) -> int | None:
        declared = self.length
        return int(declared) if declared and declared.isdigit() else None


class _NoAnswer(Response):
    """For a client that went away: nothing to send (the server ends the stream)."""

    def __init__(self) -> None:
        super().__init__(b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


# The 200 answers, by (signal, JSON?): sent as they are (Starlette's Response.__call__
# only reads them; DrainUnreadBody copies a message before it adds a header).
_ACCEPTED: dict[tuple[str, bool], Response] = {}


class _Answer:
    """Renders a request's answers over HTTP and counts them."""

    __slots__ = ("encoding", "intake", "request_id", "signal", "size", "tenant")

    def __init__(self, intake: Intake, signal: str, encoding: otlp.Encoding, head: _Head):
        self.intake = intake
        self.signal = signal
        self.encoding = encoding
        self.request_id = RequestId(lambda: head.request_id)
        self.tenant: Tenant | None = None  # once identified
        self.size = 0  # bytes read so far (decompressed once decompressed)

    def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
        self.intake.answered(self.signal, HTTP, str(status))
        return Response(body, status, headers=headers, media_type=self.encoding.content_type)

    def accepted(self) -> Response:
        """The 200 (one Response per signal and encoding, made once: nothing in it varies)."""
        self.intake.answered(self.signal, HTTP, "200")
        key = (self.signal, self.encoding.json)
        response = _ACCEPTED.get(key)
        if response is None:
            body = otlp.success(self.signal, self.encoding)
            response = _ACCEPTED[key] = Response(body, 200, media_type=self.encoding.content_type)
        return response

    def refuse(self, refusal: Refused, headers: dict[str, str] | None = None) -> Response:
        kind = refusal.kind
        self.intake.refused(
            self.signal, HTTP, refusal, kind.http_status, self.request_id, self.tenant, self.size
        )
        if kind is Kind.UNAUTHENTICATED and refusal.reason == "unauthenticated":
            challenge = 'Bearer realm="otelworker"'
            if refusal.event[1] == "invalid_token":
                challenge += ', error="invalid_token"'
            headers = {**(headers or {}), "WWW-Authenticate": challenge}
        if refusal.retry_after is not None:
            headers = {**(headers or {}), "Retry-After": str(refusal.retry_after)}
        body = otlp.status_body(kind.body_code, refusal.message, self.encoding)
        return self.respond(kind.http_status, body, headers)


async def export(request: Request) -> Response:
    signal = request.scope["path"].rsplit("/", 1)[-1]
    service = _service(request)
    try:
        return await _export(request, signal, service)
    except ClientDisconnect:
        if ANSWERED in request.scope.get("extensions", ()):
            # The server answered it itself (a slow body's 408, a 503 at shutdown) and
            # counted it: nothing staged, nothing more to send.
            return _NoAnswer()
        # The client went away while its body was being read: nothing staged, no answer.
        service.metrics.requests_refused.labels(HTTP, signal, "client_disconnected").inc()
        service.events.emit(
            "client_disconnected",
            "client_disconnected",
            "client closed the connection before its request body was read whole",
            signal=signal,
            transport=HTTP,
        )
        return _NoAnswer()
    except Exception as exc:
        # A bug of ours, never the client's: one event with the traceback, a Status body.
        service.intake.internal_error(signal, HTTP, "500", exc)
        encoding = _Head(request.scope, b"").encoding or otlp.PROTOBUF
        return Response(
            otlp.status_body(otlp.CODE_INTERNAL, "internal error; retry later", encoding),
            500,
            media_type=encoding.content_type,
        )


async def _export(request: Request, signal: str, service: Service) -> Response:
    intake = service.intake
    head = _Head(request.scope, intake.settings.tenant_header.lower().encode("latin-1"))
    encoding = head.encoding
    declared = head.declared_length
    answer = _Answer(intake, signal, encoding or otlp.PROTOBUF, head)

    # A refusal before the body is read is answered as any other: DrainUnreadBody (the
    # app's middleware) drains the rest, or closes cleanly, so the connection stays usable.
    try:
        # Who sends, before any other work.
        tenant = answer.tenant = intake.identify(head.authorization, head.tenant)
    except Refused as refusal:
        return answer.refuse(refusal)
    if request.method != "POST":
        return answer.refuse(
            Refused(
                Kind.METHOD,
                "method_not_allowed",
                f"method {request.method} not allowed; OTLP/HTTP uses POST",
            ),
            {"Allow": "POST"},
        )
    if encoding is None:
        return answer.refuse(
            Refused(
                Kind.UNSUPPORTED,
                "unsupported_media_type",
                "unsupported Content-Type; use application/x-protobuf or application/json",
            )
        )
    limit = intake.settings.max_request_body_bytes
    if declared is not None and declared > limit:
        # Can never be accepted: 413 (permanent) before any admission that could answer
        # 429, which would have the client retry it forever.
        return answer.refuse(
            Refused(
                Kind.TOO_LARGE,
                "too_large",
                f"Content-Length {declared} exceeds the limit of {limit} bytes",
            )
        )
    try:
        # Several Content-Encoding lines are one list (RFC 9110 §5.3).
        decoders = codings(",".join(head.encodings))
        # Rate limit, readiness, saturation: before the body is read.
        verdict = intake.admit(tenant)
    except UnsupportedEncoding as exc:
        return answer.refuse(Refused(Kind.UNSUPPORTED, "unsupported_encoding", str(exc)))
    except Refused as refusal:
        return answer.refuse(refusal)

    # Bytes in flight at the door: the declared length up front, else chunk by chunk; and,
    # once decompressed, the decompressed body's bytes too (it is held beside the
    # compressed one, so a small gzip body of a large payload counts as what it costs).
    inflight = service.inflight
    reserved = 0
    take: Callable[[int], bool] | None = None
    if inflight is not None:

        def take(size: int) -> bool:
            nonlocal reserved
            if not inflight.reserve(size, own=reserved):
                return False
            reserved += size
            return True

        if declared is not None and not take(declared):
            return answer.refuse(intake.inflight_refused())

    try:
        chunks = take if declared is None else None
        return await _receive(request, answer, tenant, verdict, decoders, declared, chunks, take)
    finally:
        if inflight is not None and reserved:
            inflight.release(reserved)


async def _receive(
    request: Request,
    answer: _Answer,
    tenant: Tenant,
    verdict: Verdict,
    decoders: list[Decoder],
    declared: int | None,
    reserve: Callable[[int], bool] | None,
    hold: Callable[[int], bool] | None,
) -> Response:
    """Body: bounded read, bounded decompression, decode; then stage (or shed)."""
    intake, signal, encoding = answer.intake, answer.signal, answer.encoding
    limit = intake.settings.max_request_body_bytes
    try:
        raw = await read_limited(request.stream(), limit, declared, reserve)
    except BodyTooLarge as exc:
        # Refused by its declared or its counted size: not worth reading on.
        return answer.refuse(Refused(Kind.TOO_LARGE, "too_large", str(exc)))
    except InflightFull:
        return answer.refuse(intake.inflight_refused())
    answer.size = len(raw)
    try:
        data = decompress(raw, decoders, limit)
        if data is not raw and hold is not None and not hold(len(data)):
            return answer.refuse(intake.inflight_refused())
        answer.size = len(data)
        intake.meter(tenant, len(data))
        decoded = intake.decode(signal, data, encoding.json)
        # Stage durably (or shed by the overflow policy); answer after the commit.
        accepted = await intake.stage(
            tenant,
            signal,
            HTTP,
            decoded,
            verdict,
            answer.request_id,
            shed_status=202,
            metered=len(data),
        )
    except BodyTooLarge as exc:
        return answer.refuse(Refused(Kind.TOO_LARGE, "too_large", str(exc)))
    except BadEncoding as exc:
        return answer.refuse(Refused(Kind.INVALID, "bad_request", str(exc)))
    except Refused as refusal:
        return answer.refuse(refusal)
    if accepted.shed is not None:
        # 202: nothing staged; partial_success says how many records were shed.
        body = otlp.partial_success(signal, encoding, accepted.records, accepted.shed)
        return answer.respond(202, body)
    return answer.accepted()


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


class _AnyMethod:
    """An endpoint that sees every method (TRACE, FOO, ...), so that export answers a
    wrong one itself: 405 with a Status body in the request's encoding."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive))
        await response(scope, receive, send)


export_app = _AnyMethod(export)
"""The export endpoint as an ASGI app: the app serves the three OTLP paths through it
directly, ahead of the router (see :class:`otelworker.app.App`)."""
EXPORT_PATHS = frozenset(f"/v1/{signal}" for signal in otlp.SIGNALS)

routes = [
    *(Route(f"/v1/{signal}", export_app, name=signal) for signal in otlp.SIGNALS),
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/readyz", readyz, methods=["GET", "HEAD"]),
    Route("/metrics", metrics, methods=["GET"]),
]
