"""An S3 endpoint that refuses every object as invalid (400 InvalidArgument): a failure of
the batch itself, which counts toward its rows' attempts, unlike an outage."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    "<Error><Code>{code}</Code><Message>refused by the test's S3</Message></Error>"
)


@contextlib.asynccontextmanager
async def refusing_s3(code: str = "InvalidArgument", status: int = 400) -> AsyncIterator[str]:
    """Serve until the block ends; yield the endpoint URL. The bucket exists (HEAD and a
    create answer 200); every other request is answered ``status`` with ``code``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        bucket_only = "/" not in request.path.strip("/")
        if request.method == "HEAD" or (request.method == "PUT" and bucket_only):
            return web.Response(status=200)
        return web.Response(
            status=status, body=_ERROR.format(code=code).encode(), content_type="application/xml"
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
