"""The worker half: poller -> buffer -> batcher -> exporter, with leases and an ordered stop."""

from __future__ import annotations

import asyncio
import logging
import uuid

from otelworker.logs import AggregatedEvents, log_event
from otelworker.metrics import Metrics
from otelworker.processing.batcher import Batcher
from otelworker.processing.buffer import Buffer
from otelworker.processing.export import Exporter
from otelworker.processing.poller import Poller
from otelworker.settings import Settings
from otelworker.sinks.base import ObjectStore
from otelworker.staging.queue import QueuePort, RetryPolicy
from otelworker.supervisor import Supervisor


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        queue: QueuePort,
        store: ObjectStore,
        metrics: Metrics,
        events: AggregatedEvents | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.metrics = metrics
        self.token = uuid.uuid4()
        self.buffer = Buffer(
            settings.processing_queue_max_depth, settings.processing_queue_max_bytes
        )
        metrics.buffer_capacity.set(settings.processing_queue_max_depth)
        self.exporter = Exporter(
            queue,
            store,
            metrics,
            token=self.token,
            prefix=settings.s3_prefix,
            compression=settings.s3_compression,
            compression_level=settings.compression_level,
            retry=RetryPolicy(
                settings.max_attempts,
                settings.retry_backoff_initial_ms,
                settings.retry_backoff_max_ms,
            ),
            on_uploaded=self.buffer.uploaded,
        )
        self.poller = Poller(
            queue,
            self.buffer,
            metrics,
            token=self.token,
            lease_s=settings.lease_timeout_s,
            poll_interval_s=settings.poll_interval_ms / 1000,
            claim_gap_s=min(settings.batch_flush_interval_ms / 4, settings.poll_interval_ms) / 1000,
            events=events,
        )
        self.batcher = Batcher(
            self.buffer,
            self.exporter.flush,
            max_size=settings.batch_max_size,
            max_bytes=settings.batch_max_bytes,
            flush_interval_s=settings.batch_flush_interval_ms / 1000,
            concurrency=settings.worker_concurrency,
        )
        self._feeding: list[asyncio.Task[None]] = []
        self._renewer: asyncio.Task[None] | None = None

    def start(self, supervisor: Supervisor, dsn: str | None) -> None:
        self._feeding = [
            supervisor.spawn(self.poller.run(), "poller"),
            supervisor.spawn(self.batcher.run(), "batcher"),
            supervisor.spawn(self.batcher.run_timer(), "flush-timer"),
        ]
        if dsn is not None:
            self._feeding.append(supervisor.spawn(self.poller.listen(dsn), "notify-listener"))
        self._renewer = supervisor.spawn(self._renew_leases(), "lease-renewer")

    async def _renew_leases(self) -> None:
        interval = self.settings.lease_timeout_s / 3
        while True:
            await asyncio.sleep(interval)
            self.metrics.buffer_depth.set(self.buffer.depth)
            ids = self.buffer.held_ids()
            if not ids:
                continue
            try:
                await self.queue.renew(ids, self.settings.lease_timeout_s, self.token)
            except Exception as exc:
                log_event(
                    "lease_renew_failed",
                    "could not renew leases",
                    reason=type(exc).__name__,
                    level=logging.WARNING,
                    items=len(ids),
                )

    async def _drain(self) -> None:
        await self.batcher.flush_all()
        while self.batcher.flushing:
            await asyncio.wait(set(self.batcher.flushing))

    async def stop(self, supervisor: Supervisor) -> None:
        """Stop claiming, flush what is buffered within SHUTDOWN_GRACE_S, release the rest."""
        for task in self._feeding:
            await supervisor.cancel(task)
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_s):
                await self._drain()
        except TimeoutError:
            log_event(
                "drain_timeout",
                "shutdown grace passed with batches still flushing",
                reason="shutdown_grace",
                level=logging.WARNING,
            )
        flushing = set(self.batcher.flushing)
        for task in flushing:
            task.cancel()
        if flushing:
            await asyncio.wait(flushing)
        if self._renewer is not None:
            await supervisor.cancel(self._renewer)
        left = self.buffer.held_ids()
        try:
            # Always, even with nothing held: a claim cut off by the poller's cancellation
            # may have committed rows that never reached the buffer.
            await self.queue.release(left, self.token)
        except Exception as exc:
            log_event(
                "claims_release_failed",
                "could not release claims; they return when their lease expires",
                reason=type(exc).__name__,
                level=logging.WARNING,
                items=len(left),
            )
            return
        if left:
            log_event(
                "claims_released",
                "unflushed claims released to pending",
                reason="shutdown",
                items=len(left),
            )
            self.buffer.done(left)
