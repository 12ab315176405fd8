"""What only the bare ``hypercorn otelworker.app:app`` entry needs (``python -m otelworker
serve`` runs uvicorn and owns its drain order: :mod:`otelworker.front.server`).

hypercorn stops listening, closes idle connections, waits ``graceful_timeout`` for the
requests in flight and then *cancels* them; only after that does it run the lifespan
shutdown (``hypercorn/asyncio/run.py``, ``worker_serve``). Left alone, a request cancelled
there is answered 500 by hypercorn (``_handle`` in ``asyncio/task_group.py`` ends with
``send(None)``, which ``protocol/http_stream.py`` turns into a 500 when no answer had
started), and OTLP clients do not retry a 500. :class:`AnswerInFlight` turns the
cancellation into an answer: a request whose body was read whole is left to finish (its
commit answers it, 200 or 503, within ``STAGING_COMMIT_TIMEOUT_S``; the committer and the
pool are still up, since the lifespan shutdown waits for these requests); one still being
read is answered 503 with ``Retry-After`` (nothing of it was kept). Under ``hypercorn -w
N`` the workers also keep SIGTERM for themselves (:func:`keep_sigterm`), since hypercorn's
parent sends it to the workers still draining as soon as the first one has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otelworker import otlp
from otelworker.ingress.intake import Kind, Refused, RequestId
from otelworker.logs import log_event
from otelworker.service import Service
from otelworker.staging.group_commit import PENDING, UNSETTLED, outcome_of
from otelworker.supervisor import wait_event

HTTP = "http"
_HTTP1 = ("1.0", "1.1")
# After a SIGTERM of its own, how long a hypercorn worker with nothing in flight waits for
# its server's shutdown to reach the lifespan before it concludes that no shutdown is coming.
_ORPHAN_SETTLE_S = 2.0


class InFlight:
    """Export requests in flight: a counter, and an Event set whenever it is zero."""

    __slots__ = ("count", "idle")

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def reset(self) -> None:
        """A fresh Event, bound to the running loop when first awaited."""
        self.idle = asyncio.Event()
        if not self.count:
            self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self.idle.set()


class _Exchange:
    """What one request has received and sent so far."""

    __slots__ = ("ended", "finished", "gone", "raw_receive", "raw_send", "started")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.raw_receive = receive
        self.raw_send = send
        self.ended = False  # the body was read whole (or the client left)
        self.gone = False  # the client left
        self.started = False  # the answer's head was sent
        self.finished = False  # ... and its last body message

    async def receive(self) -> Message:
        message = await self.raw_receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.ended = True
            self.gone = message["type"] == "http.disconnect"
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self.raw_send(message)


class AnswerInFlight:
    """ASGI middleware: an export request the server cancels still gets its answer.

    hypercorn, at the end of its ``graceful_timeout``, cancels the requests still in
    flight (and would answer them 500, which OTLP clients do not retry). Here the
    cancellation is caught where it lands and the request is answered, over HTTP/1.x, by
    what is true of it, before the cancellation goes on:

    - it was waiting for its group commit (the commit's entry is in
      :data:`~otelworker.staging.group_commit.PENDING`): the entry is still queued or in
      a commit, and is answered by that commit's outcome, 200 or 503 (waited for within
      ``STAGING_COMMIT_TIMEOUT_S`` plus ``SHUTDOWN_GRACE_S``; the committer and the pool
      are still up, since the lifespan shutdown runs after these requests);
    - anything else not yet answered (its body still being read, or not yet staged): 503
      with ``Retry-After`` and ``Connection: close``; nothing of it was kept;
    - its answer has gone out already (a refusal, its body being drained): the answer is
      ended there.

    Nothing of this runs until a cancellation: the hot path is a counter and the
    receive/send wrappers that tell what was read and sent. Over HTTP/2 hypercorn's sender
    for the connection is cancelled with it: nothing more can be sent, and the request
    ends unanswered as before (the client retries). The counter of requests in flight
    (:class:`InFlight`) is what the lifespan shutdown waits for before the service stops.
    """

    def __init__(self, app: ASGIApp, inflight: InFlight) -> None:
        self.app = app
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(receive, send)
        inflight = self.inflight
        inflight.enter()
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # to answer first; the cancellation goes on after
            try:
                await _answer_anyway(scope, exchange)
            finally:
                PENDING.set(None)
            raise
        finally:
            inflight.leave()


async def _answer_anyway(scope: Scope, exchange: _Exchange) -> None:
    """The server has cancelled the request (its graceful timeout is over): answer it."""
    service: Service | None = getattr(scope["app"].state, "service", None)
    http1 = scope.get("http_version", "1.1") in _HTTP1
    if not http1 or service is None or exchange.finished or exchange.gone:
        return  # over HTTP/2 nothing more can be sent: hypercorn's sender is cancelled
    with contextlib.suppress(Exception):  # the client may be gone; nothing to tell it then
        if exchange.started:
            await exchange.raw_send({"type": "http.response.body", "body": b""})
            return
        entry = PENDING.get()
        if entry is not None and exchange.ended:
            settings = service.settings
            backstop = settings.staging_commit_timeout_s + settings.shutdown_grace_s
            outcome = await outcome_of(entry, backstop)
            if outcome is not UNSETTLED and not isinstance(outcome, BaseException):
                await _committed(scope, exchange, service, entry.records)
                return
        await _unavailable(scope, exchange, service, entry is not None and exchange.ended)


def _encoding_of(scope: Scope) -> otlp.Encoding:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            media = value.split(b";")[0].strip().lower()
            return otlp.JSON if media == b"application/json" else otlp.PROTOBUF
    return otlp.PROTOBUF


async def _send_closing(
    exchange: _Exchange,
    status: int,
    encoding: otlp.Encoding,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """The whole answer, with ``Connection: close`` (the server is stopping)."""
    headers = [
        (b"content-type", encoding.content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *(extra or ()),
        (b"connection", b"close"),
    ]
    await exchange.raw_send({"type": "http.response.start", "status": status, "headers": headers})
    await exchange.raw_send({"type": "http.response.body", "body": body})


async def _committed(scope: Scope, exchange: _Exchange, service: Service, records: int) -> None:
    """200: the request's payload is committed (its handler was cancelled meanwhile)."""
    signal_name = scope["path"].rsplit("/", 1)[-1]
    encoding = _encoding_of(scope)
    body = otlp.success(signal_name, encoding)
    if signal_name in otlp.SIGNALS:
        service.intake.answered(signal_name, HTTP, "200")
        service.metrics.records_accepted.labels(HTTP, signal_name).inc(records)
    await _send_closing(exchange, 200, encoding, body)


async def _unavailable(scope: Scope, exchange: _Exchange, service: Service, read: bool) -> None:
    """503, Retry-After, Connection: close: nothing of the request was kept (or, after the
    backstop, its commit's outcome is unknown, as after a commit timeout)."""
    settings = service.settings
    signal_name = scope["path"].rsplit("/", 1)[-1]
    encoding = _encoding_of(scope)
    message = (
        "service shutting down; the request's commit failed or did not answer in time, retry later"
        if read
        else "service shutting down before the request was staged; nothing of it was kept,"
        " retry later"
    )
    refusal = Refused(
        Kind.UNAVAILABLE,
        "unavailable",
        message,
        retry_after=settings.unavailable_retry_after_s,
        cause="shutdown_grace",
    )
    if signal_name in otlp.SIGNALS:
        headers = dict(scope.get("headers", ()))
        request_id = RequestId(lambda: headers.get(b"x-request-id", b"").decode("latin-1"))
        service.intake.refused(signal_name, HTTP, refusal, 503, request_id)
        service.intake.answered(signal_name, HTTP, "503")
    body = otlp.status_body(otlp.CODE_UNAVAILABLE, message, encoding)
    retry_after = str(settings.unavailable_retry_after_s).encode()
    await _send_closing(exchange, 503, encoding, body, [(b"retry-after", retry_after)])


def keep_sigterm(
    service: Service,
    inflight: InFlight,
    shutting_down: asyncio.Event,
    stop: Callable[[], asyncio.Future[None]],
) -> None:
    """In a worker process of hypercorn's (``hypercorn [-w N] otelworker.app:app``): keep
    SIGTERM, so that it drains this process instead of killing it.

    There hypercorn's parent owns the signals and stops its workers through an Event, and
    the workers leave SIGTERM at its default, death. But the parent sends SIGTERM to every
    worker still running as soon as the first has exited (hypercorn/run.py, after
    ``wait(...sentinel...)``: ``process.terminate()``), and a signal to the process group
    (systemd's control group, ``kill -TERM -PGID``) reaches each worker at once: either
    would end this worker's requests in flight unanswered. Here SIGTERM fails readiness
    and refuses new requests (503); hypercorn's own shutdown then proceeds as ever. If
    none follows (the signal was this worker's alone), the process drains its requests,
    stops the service and ends by SIGTERM, as it would have, and hypercorn's parent stops
    the others.

    Nothing is installed where someone owns SIGTERM already (``python -m otelworker
    serve``, ``hypercorn -w 0``, which handle it through the event loop) or outside a
    multiprocessing child (tests, embedding).
    """
    if (
        multiprocessing.parent_process() is None
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        return
    loop = asyncio.get_running_loop()
    watch: list[asyncio.Task[None]] = []

    async def exit_unless_stopped() -> None:
        await inflight.idle.wait()
        if await wait_event(shutting_down, _ORPHAN_SETTLE_S):
            return
        log_event(
            "sigterm_exit",
            "SIGTERM for this worker alone: drained, stopping the service and exiting",
            reason="sigterm",
            level=logging.WARNING,
            pid=os.getpid(),
        )
        await stop()
        loop.remove_signal_handler(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_sigterm() -> None:
        service.accepting = False  # new requests: 503 (refused before their body is read)
        service.stopping = True  # /readyz fails
        if not watch:
            log_event(
                "sigterm_received",
                "SIGTERM in a hypercorn worker: draining, not dying",
                reason="sigterm",
                pid=os.getpid(),
            )
            watch.append(loop.create_task(exit_unless_stopped(), name="sigterm-watch"))

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
