"""The baseline: a no-op OTLP endpoint on the same stack (Starlette on hypercorn).

It reads the whole body and answers 200 with an empty body, as the real service does
after its commit; the difference between the two is what durability costs.

    python -m hypercorn loadtest.noop_app:app --bind 127.0.0.1:4319
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


async def export(request: Request) -> Response:
    await request.body()
    return Response(b"", 200, media_type="application/x-protobuf")


async def ready(request: Request) -> Response:
    return PlainTextResponse("ready\n")


app = Starlette(
    routes=[
        Route("/v1/traces", export, methods=["POST"]),
        Route("/v1/metrics", export, methods=["POST"]),
        Route("/v1/logs", export, methods=["POST"]),
        Route("/readyz", ready, methods=["GET"]),
        Route("/healthz", ready, methods=["GET"]),
    ]
)
