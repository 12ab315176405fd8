"""``replay``: send the archived records of a selection to an OTLP/HTTP endpoint.

Objects are read one at a time, in the manifest's order; each is decoded, cut into
requests (:mod:`.split`) of the records in the window, and those are gzip'd and queued
for ``concurrency`` senders. The queue holds at most ``concurrency`` requests, so memory
is one decoded object plus the requests queued and in flight. An object is finished
when every one of its requests is acknowledged; only then is it checkpointed. Each
request goes with its object's tenant (the sender names it in the tenant header).

The first request that cannot be delivered (refused for good, or out of attempts) ends
the replay: requests in flight are abandoned, their objects are not checkpointed, and a
re-run with the same checkpoint resends exactly those objects and what follows. An
object that cannot be read ends it too, once the requests in flight have finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from isal import igzip

from otelworker.archive.checkpoint import Checkpoint
from otelworker.archive.manifest import BatchRow
from otelworker.archive.progress import Counts, Progress, human_bytes
from otelworker.archive.rate import TokenBucket
from otelworker.archive.reader import read_object
from otelworker.archive.selection import Window
from otelworker.archive.sender import Ack, ReplayError
from otelworker.archive.split import pieces
from otelworker.exceptions import BadPayload, ObjectStoreError, OtelWorkerError
from otelworker.logs import log_event

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class Sending(Protocol):
    async def send(
        self, signal: str, body: bytes, *, object_key: str, tenant: str | None = None
    ) -> Ack: ...


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    window: Window = field(default_factory=Window)
    service: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    concurrency: int = 4
    rate: float | None = None  # records per second


@dataclass
class ReplayResult:
    counts: Counts
    rejected: int = 0  # records acknowledged with a partial_success that rejected them
    error: OtelWorkerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rejected == 0


@dataclass(slots=True)
class _Request:
    object_key: str
    signal: str
    body: bytes  # gzip'd
    records: int
    tenant: str  # the object's


@dataclass(slots=True)
class _Open:
    """An object whose requests are queued or in flight."""

    row: BatchRow
    pending: int = 0  # requests queued or in flight
    generated: bool = False  # every request of it has been made
    requests: int = 0
    records: int = 0
    bytes: int = 0


def _requests(row: BatchRow, message: Any, options: ReplayOptions) -> Iterator[_Request]:
    """The object's requests, gzip'd (CPU work: stepped through in a thread)."""
    for piece in pieces(
        row.signal,
        message,
        max_bytes=options.max_request_bytes,
        window=options.window,
        service=options.service,
    ):
        if len(piece.body) > options.max_request_bytes:
            log_event(
                "replay_request_oversized",
                "a single record is larger than --max-request-bytes; sent alone",
                reason="record_too_large",
                level=logging.WARNING,
                object_key=row.object_key,
                bytes=len(piece.body),
                max_request_bytes=options.max_request_bytes,
            )
        yield _Request(
            row.object_key, row.signal, igzip.compress(piece.body, 1), piece.records, row.tenant
        )


async def _read(store: Any, row: BatchRow) -> Any:
    try:
        return await read_object(store, row.signal, row.object_key)
    except (ObjectStoreError, BadPayload) as exc:
        raise ReplayError(f"cannot read object {row.object_key}: {exc}", row.object_key) from exc


class Replay:
    def __init__(
        self,
        store: Any,
        sender: Sending | None,
        options: ReplayOptions,
        progress: Progress,
        *,
        checkpoint: Checkpoint | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.store = store
        self.sender = sender  # None: a dry run
        self.options = options
        self.progress = progress
        self.counts = progress.counts
        self.checkpoint = checkpoint
        self.out = out
        self.result = ReplayResult(self.counts)
        self._bucket = TokenBucket(options.rate) if options.rate else None
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=max(1, options.concurrency))
        self._open: dict[str, _Open] = {}
        self._unreadable: ReplayError | None = None

    async def run(self, rows: AsyncIterable[BatchRow]) -> ReplayResult:
        try:
            async with asyncio.TaskGroup() as group:
                workers = [
                    group.create_task(self._send_loop(), name=f"replay-sender-{n}")
                    for n in range(self.options.concurrency if self.sender else 0)
                ]
                await self._produce(rows)
                await self._queue.join()
                for worker in workers:
                    worker.cancel()
            if self._unreadable is not None:
                raise self._unreadable
        except* OtelWorkerError as group:
            self.result.error = error = _first(group)
            key = getattr(error, "object_key", None)
            log_event(
                "replay_object_failed" if key else "replay_failed",
                "replay stopped: something selected could not be delivered",
                reason=type(error).__name__,
                level=logging.ERROR,
                object_key=key,
                error=str(error),
            )
        finally:
            self.progress.finish()
        return self.result

    async def _produce(self, rows: AsyncIterable[BatchRow]) -> None:
        async for row in rows:
            key = row.object_key
            if self.checkpoint is not None and key in self.checkpoint.done:
                self.counts.objects_skipped += 1
                self.counts.bytes_skipped += row.compressed_bytes
                self.progress.update()
                continue
            try:
                message = await _read(self.store, row)
            except ReplayError as exc:
                # Stop here, but let the requests in flight finish (and their objects be
                # checkpointed): only what follows this object is left for a re-run.
                self._unreadable = exc
                return
            entry = self._open[key] = _Open(row)
            requests = _requests(row, message, self.options)
            del message  # the generator holds it until it is exhausted
            while (request := await asyncio.to_thread(next, requests, None)) is not None:
                entry.requests += 1
                entry.records += request.records
                entry.bytes += len(request.body)
                if self.sender is None:
                    self._count(request, Ack())
                else:
                    entry.pending += 1
                    await self._queue.put(request)
            del requests
            entry.generated = True
            if self.sender is None and self.out is not None:
                print(
                    f"would send {key} ({row.signal}): {entry.requests} requests,"
                    f" {entry.records} records, {human_bytes(entry.bytes)} gzip'd",
                    file=self.out,
                )
            if entry.pending == 0:
                await self._finish(entry)

    async def _send_loop(self) -> None:
        assert self.sender is not None
        while True:
            request = await self._queue.get()
            try:
                if self._bucket is not None:
                    await self._bucket.take(request.records)
                ack = await self.sender.send(
                    request.signal,
                    request.body,
                    object_key=request.object_key,
                    tenant=request.tenant,
                )
                self._count(request, ack)
                entry = self._open[request.object_key]
                entry.pending -= 1
                if entry.generated and entry.pending == 0:
                    await self._finish(entry)
                self.progress.update()
            finally:
                self._queue.task_done()

    def _count(self, request: _Request, ack: Ack) -> None:
        self.counts.requests += 1
        self.counts.records += request.records - ack.rejected
        self.counts.sent_bytes += len(request.body)
        if ack.rejected:
            self.result.rejected += ack.rejected
            log_event(
                "replay_partial_success",
                "the target acknowledged a request but rejected some of its records",
                reason="partial_success",
                level=logging.WARNING,
                object_key=request.object_key,
                rejected=ack.rejected,
                error_message=ack.message[:500],
            )

    async def _finish(self, entry: _Open) -> None:
        del self._open[entry.row.object_key]
        if self.checkpoint is not None and self.sender is not None:
            await self.checkpoint.add(entry.row.object_key)
        self.counts.objects_done += 1
        self.counts.bytes_done += entry.row.compressed_bytes
        self.progress.update()
        log_event(
            "replay_object_done",
            "every request of the object was acknowledged",
            level=logging.DEBUG,
            object_key=entry.row.object_key,
        )


def _first(group: BaseExceptionGroup[OtelWorkerError]) -> OtelWorkerError:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, OtelWorkerError)
    return error


def summary(result: ReplayResult, *, dry_run: bool, elapsed: float) -> str:
    c = result.counts
    verb = "would send" if dry_run else "replayed"
    text = (
        f"{verb} {c.records} records in {c.requests} requests"
        f" ({human_bytes(c.sent_bytes)} gzip'd) from {c.objects_done} objects"
        f" in {elapsed:.1f} s"
    )
    if c.objects_skipped:
        text += f"; {c.objects_skipped} objects skipped (already in the checkpoint)"
    if result.rejected:
        text += f"; the target rejected {result.rejected} records (partial success)"
    return text
