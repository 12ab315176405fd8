"""An in-process service: the real app on a real hypercorn server on a free local port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config

from otelworker.app import create_app
from otelworker.service import Service
from otelworker.settings import Settings, load_settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    settings: Settings | None = None, **overrides: Any
) -> AsyncIterator[RunningService]:
    """Serve ``create_app(settings)`` until the block ends; wait until /readyz answers 200.

    Either pass ``settings`` or keyword overrides for :func:`load_settings`.
    """
    port = _free_port()
    if settings is None:
        settings = load_settings(port=port, host="127.0.0.1", **overrides)
    app = create_app(settings)
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.graceful_timeout = 5
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait), name="test-server")  # type: ignore[arg-type]
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
