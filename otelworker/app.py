"""The ASGI application: ``hypercorn otelworker.app:app``, and the app that ``python -m
otelworker serve`` runs on its own server (:mod:`otelworker.front.server`).

The lifespan reads the settings, opens the pool, applies migrations and starts the
background tasks; on shutdown it waits for the export requests still in flight, then
stops the service in order (see :meth:`Service.stop`).

Requests in flight at SIGTERM (docs/operations.md, "Shutdown"): under ``serve`` the server
owns the drain order and cancels no request; under the bare hypercorn entry hypercorn
cancels the requests still in flight at the end of its graceful timeout, and
:mod:`otelworker.front.hypercorn` (``AnswerInFlight``, ``keep_sigterm``) answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from otelworker import logs
from otelworker.front.hypercorn import AnswerInFlight, InFlight, keep_sigterm
from otelworker.ingress.body import DrainUnreadBody
from otelworker.ingress.routes import EXPORT_PATHS, export_app, routes
from otelworker.logs import log_event
from otelworker.service import Service
from otelworker.settings import Settings, load_settings


def origin_form(scope: Scope) -> None:
    """An absolute-form request target (``POST http://host:4318/v1/traces``, which RFC 9112
    section 3.2.2 says a server MUST accept) as the origin form the routes match.

    hypercorn passes such a target whole in ``path`` and ``raw_path``; here they become the
    path after the authority (``/`` when there is none), decoded as hypercorn decodes
    ``path``. The authority is not checked against Host (nothing here routes by host). Any
    other target not starting with ``/`` (``*``) is left as it is, for a 404.
    """
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    scheme, sep, rest = raw.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return
    slash = rest.find(b"/")
    target = rest[slash:] if slash >= 0 else b"/"
    scope["raw_path"] = target
    scope["path"] = unquote(target.decode("ascii", "replace"))


class App(Starlette):
    """Starlette, with the three OTLP export paths served ahead of its stack.

    An export request goes straight to :class:`DrainUnreadBody` (behind
    :class:`AnswerInFlight` under hypercorn) and the endpoint (which answers every method
    and every error of its own, a 500 with a Status body included), not through
    Starlette's error and exception middlewares and its router: those cost more per
    request than the endpoint's own checks. Every other
    path (the probes, /metrics, a 404) takes Starlette's stack as before.
    """

    export_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/"):
            origin_form(scope)
        stack = self.export_stack
        if (
            stack is not None
            and scope["type"] == "http"
            and scope["path"] in EXPORT_PATHS
            and not scope.get("root_path")
        ):
            scope["app"] = self
            await stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None, *, server: Literal["hypercorn", "serve"] = "hypercorn"
) -> Starlette:
    """The app. ``server="serve"``: under :mod:`otelworker.front.server`, which drains the
    requests in flight itself; without hypercorn's cancellation answers."""
    inflight = InFlight()
    hypercorn = server == "hypercorn"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            current = settings or load_settings()
        except Exception as exc:
            logs.configure()
            log_event("startup_failed", str(exc), reason=type(exc).__name__, level=logging.CRITICAL)
            raise
        logs.configure(current.log_level)
        service = Service(current)
        app.state.service = service
        inflight.reset()
        try:
            await service.start()
        except BaseException as exc:
            log_event("startup_failed", str(exc), reason=type(exc).__name__, level=logging.CRITICAL)
            await service.stop()
            raise

        shutting_down = asyncio.Event()
        stopped: list[asyncio.Future[None]] = []

        async def drain_and_stop() -> None:
            service.accepting = False
            service.stopping = True
            # Under hypercorn none is left by now (it runs the lifespan shutdown after its
            # requests); under another server this keeps the pool and the committer up
            # for the requests still in flight.
            try:
                async with asyncio.timeout(current.shutdown_grace_s):
                    await inflight.idle.wait()
            except TimeoutError:
                log_event(
                    "http_drain_timeout",
                    "HTTP export requests still in flight at shutdown",
                    reason="shutdown_grace",
                    level=logging.WARNING,
                    requests=inflight.count,
                )
            await service.stop()

        def stop() -> asyncio.Future[None]:
            if not stopped:
                stopped.append(asyncio.ensure_future(drain_and_stop()))
            return stopped[0]

        if hypercorn:
            keep_sigterm(service, inflight, shutting_down, stop)
        try:
            yield
        finally:
            shutting_down.set()
            await stop()

    def body_limit(scope: Scope) -> int:
        service = getattr(scope["app"].state, "service", None)
        return int(service.settings.max_request_body_bytes) if service else 16 * 1024 * 1024

    middleware = [Middleware(DrainUnreadBody, limit=body_limit)]
    export_stack: ASGIApp = DrainUnreadBody(export_app, limit=body_limit)
    if hypercorn:
        middleware.insert(0, Middleware(AnswerInFlight, inflight=inflight))
        export_stack = AnswerInFlight(export_stack, inflight)
    app = App(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.inflight = inflight
    app.export_stack = export_stack
    # `/v1/traces/` is not an OTLP path: a 404, not a redirect a client would not follow.
    app.router.redirect_slashes = False
    return app


app = create_app()
