"""``python -m otelworker serve``'s HTTP server: uvicorn (httptools) in the service's own
event loop (uvloop), beside grpcio's asyncio server and the worker tasks.

One owner of the signals and of the drain order (``serve``, here; uvicorn installs no
handler of its own): SIGTERM or SIGINT fails readiness and refuses new requests at once
(503 / ``UNAVAILABLE``); after ``READINESS_DRAIN_DELAY_S`` the server stops accepting,
closes idle connections and lets the requests in flight finish, with their commits, for
``SHUTDOWN_GRACE_S``; a request still being read then is answered 503 (nothing of it was
kept, :meth:`~otelworker.front.protocol.GuardedProtocol.abandon_body`), and one already
read keeps waiting for its commit's own answer, 200 or 503 (bounded by twice
``STAGING_COMMIT_TIMEOUT_S``). No request task is cancelled. Only then does the lifespan
shutdown stop the service (gRPC, the committer, the pipeline, the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import resource
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from otelworker import otlp
from otelworker.front.protocol import Door, GuardedProtocol, Limits, protocol_for
from otelworker.ingress.intake import Kind, Refused, RequestId
from otelworker.logs import log_event
from otelworker.settings import Settings
from otelworker.tls import ServerTls

HTTP = "http"
# Descriptors kept out of the connection cap besides the database pool's: the listening
# sockets, the gRPC port's connections, the object store's pool, log and data files.
FD_HEADROOM = 256
_MIN_CONNECTIONS = 32
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def max_connections(settings: Settings) -> int:
    """HTTP_MAX_CONNECTIONS, or (0) what the descriptor limit leaves: RLIMIT_NOFILE's soft
    limit less the database pool and :data:`FD_HEADROOM`, at least 32."""
    if settings.http_max_connections:
        return settings.http_max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(_MIN_CONNECTIONS, soft - settings.db_pool_max_size - FD_HEADROOM)


def _signal_of(scope: dict[str, Any] | None) -> str | None:
    if scope is None:
        return None
    signal = str(scope.get("path", "")).rsplit("/", 1)[-1]
    return signal if signal in otlp.SIGNALS and scope.get("path") == f"/v1/{signal}" else None


class _Hooks:
    """The protocol's counts and events, through the service once the lifespan made it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def service(self) -> Any:
        return getattr(self.app.state, "service", None)

    def timed_out(self, reason: str, scope: dict[str, Any] | None) -> None:
        service = self.service
        if service is None:
            return
        service.metrics.http_requests_timed_out.labels(reason).inc()
        signal = _signal_of(scope)
        if signal is not None:
            service.intake.answered(signal, HTTP, "408")
        service.events.emit(
            "http_timeout",
            reason,
            "a slow client's request head or body timed out; connection closed",
            level=logging.INFO,
            transport=HTTP,
        )

    def refused(self) -> None:
        service = self.service
        if service is None:
            return
        service.metrics.http_connections_refused.inc()
        service.events.emit(
            "connection_refused",
            "max_connections",
            "open connections at HTTP_MAX_CONNECTIONS; a new one was answered 503 and closed",
            transport=HTTP,
        )

    def abandoned(self, scope: dict[str, Any]) -> None:
        service = self.service
        signal = _signal_of(scope)
        if service is None or signal is None:
            return
        headers = dict(scope.get("headers", ()))
        request_id = RequestId(lambda: headers.get(b"x-request-id", b"").decode("latin-1"))
        refusal = Refused(
            Kind.UNAVAILABLE,
            "unavailable",
            "service shutting down before the request was read whole; nothing of it was kept",
            retry_after=service.settings.unavailable_retry_after_s,
            cause="shutdown_grace",
        )
        service.intake.refused(signal, HTTP, refusal, 503, request_id)
        service.intake.answered(signal, HTTP, "503")

    def exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: running out of descriptors in accept() (asyncio
        reports it here, and retries a second later) is one aggregated event, not a
        traceback per attempt."""
        exc = context.get("exception")
        service = self.service
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTED and service is not None:
            service.metrics.descriptors_exhausted.inc()
            service.events.emit(
                "descriptors_exhausted",
                errno.errorcode.get(exc.errno or 0, "EMFILE"),
                "out of file descriptors accepting a connection; retried",
                level=logging.ERROR,
            )
            return
        loop.default_exception_handler(context)


def _freeze_heap() -> None:
    """Move what startup built (modules, protobuf descriptors, the pool) out of the cyclic
    collector's reach: a full collection would otherwise walk all of it again and again
    while requests run, for objects that live as long as the process. And collect the
    young generation every 10,000 net allocations rather than 700: a request's objects
    are freed by their counts, almost never in cycles (a collection under load found none
    to free), and at 700 the collector ran every few dozen requests for ~0.2 ms, ~3 % of
    the door's CPU; at 10,000 it costs a tenth of that, for at most a few MB of cyclic
    garbage waiting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class Server(uvicorn.Server):
    """uvicorn's server, with serve's signals and serve's shutdown order."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # serve owns SIGTERM and SIGINT (see __main__._serve)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup for given sockets, with the TLS handshake bounded by
        HTTP_HEADER_TIMEOUT_S too (uvicorn leaves asyncio's 60 s): a client that stalls
        the handshake holds a descriptor outside the connection cap's count."""
        assert sockets is not None  # serve binds its own socket (SO_REUSEPORT)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise SystemExit(3)  # the lifespan logged startup_failed
        config = self.config
        state = self.lifespan.state

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=state
            )

        loop = asyncio.get_running_loop()
        handshake = self.settings.http_header_timeout_s if config.ssl is not None else None
        self.servers = [
            await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=handshake,
            )
            for sock in sockets
        ]
        self.started = True
        _freeze_heap()
        service = getattr(getattr(self.config.app, "state", None), "service", None)
        if service is not None:
            connections = self.server_state.connections
            service.metrics.http_open_connections.set_function(lambda: len(connections))

    def _protocols(self) -> list[GuardedProtocol]:
        return [c for c in self.server_state.connections if isinstance(c, GuardedProtocol)]

    async def _requests_done(self, within_s: float) -> bool:
        """Wait (on the tasks themselves, not by polling) for the requests in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self.server_state.tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self.server_state.tasks), timeout=remaining)
        return True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        settings = self.settings
        for server in self.servers:
            server.close()  # stop accepting
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close; busy ones close after their answer
        if not await self._requests_done(settings.shutdown_grace_s):
            abandoned = sum(p.abandon_body() for p in self._protocols())
            # What is left was read whole: its commit answers it, 200 or 503.
            backstop = 2 * settings.staging_commit_timeout_s + 1
            if not await self._requests_done(backstop):
                log_event(
                    "http_drain_timeout",
                    "HTTP requests still in flight at the end of the shutdown grace",
                    reason="shutdown_grace",
                    level=logging.WARNING,
                    requests=len(self.server_state.tasks),
                    abandoned=abandoned,
                )
        for connection in list(self.server_state.connections):
            connection.transport.close()
        await self.lifespan.shutdown()


def build(app: Any, settings: Settings, server_tls: ServerTls | None) -> Server:
    hooks = _Hooks(app)
    door = Door(
        Limits(
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            body_min_rate=settings.http_body_min_rate_bytes,
            max_connections=max_connections(settings),
        ),
        timed_out=hooks.timed_out,
        refused=hooks.refused,
        abandoned=hooks.abandoned,
        retry_after_s=settings.unavailable_retry_after_s,
    )
    config = uvicorn.Config(
        app,
        http=protocol_for(door),
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=int(settings.http_keep_alive_timeout_s),
        backlog=2048,
    )
    config.load()
    # uvicorn warns once per malformed request (a line per request under a flood): the
    # app's own refusals are counted and aggregated instead; its errors stay.
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
    if server_tls is not None:
        # The context tls.load checked (TLS >= 1.2; a client certificate when mutual).
        # uvicorn speaks HTTP/1.1 only: ALPN says so.
        server_tls.context.set_alpn_protocols(["http/1.1"])
        config.ssl = server_tls.context
    server = Server(config, settings)
    server.hooks = hooks  # type: ignore[attr-defined]
    server.door = door  # type: ignore[attr-defined]
    return server


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """The HTTP port's socket, bound (SO_REUSEPORT beside serve --processes siblings)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock
