"""``grpc.health.v1.Health`` on the OTLP/gRPC port, for gRPC load balancers, Kubernetes
``grpc:`` probes and ``grpc_health_probe``.

The status follows readiness (``/readyz``): SERVING while the service is ready, NOT_SERVING
while it starts, while the database is unreachable or a task has died, and for good from the
start of shutdown (the SIGTERM, while the port still answers during the readiness drain
delay). It is the same for the whole server (``""``) and for each OTLP service name; any
other name is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as the protocol says.

A Check reads readiness when it is asked. Watch streams are brought up to date every
``REFRESH_S`` seconds while any is open; at shutdown each gets NOT_SERVING and then ends,
so that the server's graceful stop does not wait the whole grace period for them (which
is why this is not grpcio-health-checking's own aio servicer, whose streams never end; the
messages and the service registration are that package's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from otelworker.logs import log_event

if TYPE_CHECKING:
    from otelworker.service import Service

Response = health_pb2.HealthCheckResponse
SERVING = Response.SERVING
NOT_SERVING = Response.NOT_SERVING
SERVICE_UNKNOWN = Response.SERVICE_UNKNOWN
REFRESH_S = 1.0


class Health(health_pb2_grpc.HealthServicer):
    """The Health service's Check and Watch, its statuses those of the service's readiness."""

    def __init__(self, service: Service, names: list[str]) -> None:
        self.service = service
        self.names = ("", *names)
        self.status: dict[str, int] = dict.fromkeys(self.names, NOT_SERVING)
        self.shut = False
        self._changed = asyncio.Event()
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self, server)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="grpc-health")

    def _update(self, status: int) -> None:
        if any(self.status[name] != status for name in self.names):
            self.status = dict.fromkeys(self.names, status)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def refresh(self) -> None:
        """Every name's status from readiness now (NOT_SERVING for good once stopping)."""
        if self.shut:
            return
        if self.service.stopping:
            self.shutting_down()
            return
        ok, _ = await self.service.readiness()
        if not self.shut:
            self._update(SERVING if ok else NOT_SERVING)

    def shutting_down(self) -> None:
        """NOT_SERVING from now on; Watch streams get it, then end."""
        if not self.shut:
            self.shut = True
            self._update(NOT_SERVING)
            self._wake()

    async def close(self) -> None:
        self.shutting_down()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Response:
        await self.refresh()
        status = self.status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return Response(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        await self.refresh()
        self._watchers += 1
        try:
            sent = None
            while True:
                changed = self._changed
                status = self.status.get(request.service, SERVICE_UNKNOWN)
                if status != sent:
                    await context.write(Response(status=status))
                    sent = status
                if self.shut:
                    return
                await changed.wait()
        finally:
            self._watchers -= 1

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            if not self._watchers and not (self.service.stopping and not self.shut):
                continue
            try:
                await self.refresh()
            except Exception as exc:  # a bug of ours: logged, and the next round tries again
                log_event(
                    "grpc_health_failed",
                    "gRPC health status not refreshed",
                    reason=type(exc).__name__,
                    level=logging.ERROR,
                    exc_info=exc,
                )
