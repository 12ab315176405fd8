"""The ASGI application: ``hypercorn otelworker.app:app``.

The lifespan reads the settings, opens the pool, applies migrations and starts the
background tasks; on shutdown it stops them in order (see :meth:`Service.stop`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import Scope

from otelworker import logs
from otelworker.ingress.body import DrainUnreadBody
from otelworker.ingress.routes import routes
from otelworker.logs import log_event
from otelworker.service import Service
from otelworker.settings import Settings, load_settings


def create_app(settings: Settings | None = None) -> Starlette:
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
        try:
            await service.start()
        except BaseException as exc:
            log_event("startup_failed", str(exc), reason=type(exc).__name__, level=logging.CRITICAL)
            await service.stop()
            raise
        try:
            yield
        finally:
            await service.stop()

    def body_limit(scope: Scope) -> int:
        service = getattr(scope["app"].state, "service", None)
        return int(service.settings.max_request_body_bytes) if service else 16 * 1024 * 1024

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(DrainUnreadBody, limit=body_limit)],
    )
    # `/v1/traces/` is not an OTLP path: a 404, not a redirect a client would not follow.
    app.router.redirect_slashes = False
    return app


app = create_app()
