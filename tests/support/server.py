"""An in-process service: the real app on a real server on a free local port: hypercorn
(the bare ``hypercorn otelworker.app:app`` entry), or ``serve``'s uvicorn front
(:mod:`otelworker.front.server`) with ``front="serve"`` or inside :func:`front_as`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config

from otelworker.app import create_app
from otelworker.front import server as serve_front
from otelworker.service import Service
from otelworker.settings import Settings, load_settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FRONTS = ("hypercorn", "serve")
_front: list[str] = ["hypercorn"]


@contextlib.contextmanager
def front_as(front: str) -> Iterator[None]:
    """Within the block, :func:`running_service` serves on ``front`` unless told otherwise
    (a parametrized fixture runs a suite against both entries this way)."""
    _front.append(front)
    try:
        yield
    finally:
        _front.pop()


@dataclass
class RunningService:
    url: str
    port: int
    service: Service
    settings: Settings

    def endpoint(self, signal: str) -> str:
        return f"{self.url}/v1/{signal}"


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings | None = None, *, front: str | None = None, **overrides: Any
) -> AsyncIterator[RunningService]:
    """Serve ``create_app(settings)`` until the block ends; wait until /readyz answers 200.

    Either pass ``settings`` or keyword overrides for :func:`load_settings`.
    """
    port = _free_port()
    if settings is None:
        settings = load_settings(port=port, host="127.0.0.1", **overrides)
    front = front or _front[-1]
    stop = asyncio.Event()
    if front == "serve":
        app = create_app(settings, server="serve")
        uvicorn_server = serve_front.build(app, settings, None)
        sock = serve_front.listening_socket("127.0.0.1", port, reuse_port=False)

        async def serve_until_stopped() -> None:
            watch = asyncio.create_task(stop.wait())
            run = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))
            await asyncio.wait({watch, run}, return_when=asyncio.FIRST_COMPLETED)
            uvicorn_server.should_exit = True
            watch.cancel()
            try:
                await run
            finally:
                sock.close()

        task = asyncio.create_task(serve_until_stopped(), name="test-server")
    else:
        app = create_app(settings)
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.graceful_timeout = 5
        config.accesslog = None
        serving = serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        task = asyncio.create_task(serving, name="test-server")
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                if task.done():
                    task.result()  # raises the start-up error
                    raise RuntimeError("server stopped during start-up")
                try:
                    if (await client.get(f"{url}/readyz", timeout=2)).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError("service did not become ready within 60 s")
                await asyncio.sleep(0.05)
        yield RunningService(url, port, app.state.service, settings)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 60)
