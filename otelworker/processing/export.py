"""Flush a batch: decode, merge, compress, upload; then index and dequeue in one transaction."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from otelworker import gzjoin, otlp
from otelworker.compression import ENCODING, checksum, compress, decompress
from otelworker.exceptions import (
    BadPayload,
    ObjectStoreError,
    StagingRefused,
    StagingUnavailable,
)
from otelworker.logs import log_event
from otelworker.metrics import Metrics
from otelworker.settings import Compression
from otelworker.sinks.base import ObjectStore, object_key
from otelworker.staging.queue import Claimed, Manifest, QueuePort, RetryPolicy

CONTENT_ENCODING = {Compression.GZIP: "gzip", Compression.ZSTD: "zstd", Compression.NONE: None}


@dataclass(slots=True)
class Prepared:
    """A batch's decoded facts and its object body (no reference to the payloads)."""

    good: list[int]
    poison: list[tuple[int, str]]
    body: bytes
    raw_bytes: int
    record_count: int
    min_time: datetime | None
    max_time: datetime | None
    service_names: list[str]


def _ns_to_dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def prepare(
    signal: str, items: Sequence[Claimed], compression: Compression, level: int | None = None
) -> Prepared:
    """CPU work, run in a thread: isolate corrupt payloads, join the rest into one body.

    Concatenated serialized Export*ServiceRequests are the serialization of the one
    request holding all their resource_* entries (repeated fields concatenate on the
    wire), and concatenated gzip members (zstd frames) are one stream of their joined
    contents: so a payload staged in the object's codec is joined as it is, never decoded
    or compressed again. It is only checked whole, so that a corrupt row goes dead alone:
    by the CRC-32 of its stored bytes taken when it was staged (migration 0005), or, for a
    row staged before, decompressed (the codec's CRC and the size). Rows staged in another
    codec are recompressed; rows staged before the door kept their facts (migration 0003)
    are decoded as before. Gzip payloads staged as joinable members (every one since
    otelworker/gzjoin.py) are joined into one member with an index of its pieces; a
    batch with one staged before is concatenated members, as then.
    """
    target = ENCODING[compression]
    good: list[int] = []
    poison: list[tuple[int, str]] = []
    pieces: list[bytes] = []
    # Each piece's deflate fragment, CRC-32, raw bytes and records while every one is a
    # joinable gzip member (otelworker/gzjoin.py); None once one is not.
    fragments: list[tuple[memoryview, int, int, int]] | None = (
        [] if compression is Compression.GZIP else None
    )
    names: set[str] = set()
    low: int | None = None
    high: int | None = None
    records = 0
    raw_bytes = 0
    for item in items:
        facts = item.facts
        try:
            if facts is None:
                message = otlp.decode(signal, item.payload)
                span = otlp.time_range(signal, message)
                services: Iterable[str] = otlp.service_names(signal, message)
                size = len(item.payload)
                piece = compress(item.payload, compression, level)
            else:
                span = (
                    (facts.min_ns, facts.max_ns)
                    if facts.min_ns is not None and facts.max_ns is not None
                    else None
                )
                services = facts.services
                size = facts.raw_bytes
                if facts.encoding == target and facts.crc is not None:
                    # Checked whole by the checksum taken when it was staged.
                    if checksum(item.payload) != facts.crc:
                        raise ValueError("stored payload does not match its staged checksum")
                    piece = item.payload
                else:
                    raw = decompress(item.payload, facts.encoding)
                    if len(raw) != size:
                        raise ValueError(f"payload is {len(raw)} bytes, staged as {size}")
                    piece = (
                        item.payload
                        if facts.encoding == target
                        else compress(raw, compression, level)
                    )
        except BadPayload as exc:
            poison.append((item.id, str(exc)))
            continue
        except Exception as exc:
            # Whatever checking one row raises (a codec's own error: ISA-L's IsalError,
            # zlib.error, zstd's; a ValueError) makes that row poison, alone: never the
            # batch's failure, which would bring the row and its batch-mates back forever.
            poison.append((item.id, f"{type(exc).__name__}: {exc}"))
            continue
        good.append(item.id)
        pieces.append(piece)
        if fragments is not None:
            joinable = gzjoin.fragment(piece)
            if joinable is None or joinable[2] != size & 0xFFFFFFFF:
                fragments = None
            else:
                fragments.append((joinable[0], joinable[1], size, item.record_count))
        records += item.record_count
        raw_bytes += size
        names.update(services)
        if span is not None:
            low = span[0] if low is None else min(low, span[0])
            high = span[1] if high is None else max(high, span[1])
    return Prepared(
        good=good,
        poison=poison,
        body=gzjoin.join(fragments) if fragments else b"".join(pieces),
        raw_bytes=raw_bytes,
        record_count=records,
        min_time=_ns_to_dt(low) if low is not None else None,
        max_time=_ns_to_dt(high) if high is not None else None,
        service_names=sorted(names),
    )


class Exporter:
    def __init__(
        self,
        queue: QueuePort,
        store: ObjectStore,
        metrics: Metrics,
        *,
        token: uuid.UUID,
        prefix: str,
        compression: Compression,
        retry: RetryPolicy,
        compression_level: int | None = None,
        on_uploaded: Callable[[list[int]], None] | None = None,
        on_completed: Callable[[int, int | None, str], None] | None = None,
    ) -> None:
        self.queue = queue
        self.store = store
        self.metrics = metrics
        self.token = token
        self.prefix = prefix
        self.compression = compression
        self.compression_level = compression_level
        self.retry = retry
        # Told the ids of a batch whose object is stored (the buffer frees their room).
        self.on_uploaded = on_uploaded
        # Told (items, commit xid, tenant) of each batch deleted from the queue.
        self.on_completed = on_completed
        # Consecutive outage failures of this worker's flushes (reset by one that the
        # store and the database answer): the backoff's exponent while they fail.
        self._outage = 0
        # Forwarding (otelworker/forwarding): the destinations that want a (signal,
        # tenant)'s objects get deliveries in the commit; the object's bytes are offered
        # to this process's forwarder once stored, and it is woken once committed.
        self.route: Callable[[str, str], Sequence[str]] | None = None
        self.on_stored: Callable[[str, bytes, int], None] | None = None
        self.on_handed: Callable[[Sequence[str]], None] | None = None

    async def flush(self, signal: str, items: list[Claimed]) -> None:
        """Flush one batch. Takes ownership of ``items``: the list is emptied once the
        object is uploaded, so the payloads are not kept while the index commits."""
        prepared = await asyncio.to_thread(
            prepare, signal, items, self.compression, self.compression_level
        )
        if prepared.poison:
            await self._bury(signal, prepared.poison)
        if not prepared.good:
            return
        ids = prepared.good
        tenant = items[0].tenant  # the batcher never mixes tenants in a batch
        wanted = list(self.route(signal, tenant)) if self.route is not None else []
        batch_id = uuid.uuid4()
        key = object_key(self.prefix, signal, batch_id, datetime.now(UTC), self.compression, tenant)
        size = len(prepared.body)
        context: dict[str, Any] = {
            "tenant": tenant,
            "signal": signal,
            "batch_id": str(batch_id),
            "items": len(ids),
            "records": prepared.record_count,
            "bytes": size,
        }
        try:
            started = time.monotonic()
            await self.store.put(
                key, prepared.body, "application/x-protobuf", CONTENT_ENCODING[self.compression]
            )
            self.metrics.upload_duration.observe(time.monotonic() - started)
            if wanted and self.on_stored is not None:
                self.on_stored(key, prepared.body, len(wanted))
            # Stored: neither the object nor the payloads are kept while the index commits.
            prepared.body = b""
            items.clear()
            if self.on_uploaded is not None:
                self.on_uploaded(ids)
            manifest = Manifest(
                batch_id=batch_id,
                signal=signal,
                object_key=key,
                item_count=len(ids),
                record_count=prepared.record_count,
                compressed_bytes=size,
                raw_bytes=prepared.raw_bytes,
                min_time=prepared.min_time,
                max_time=prepared.max_time,
                service_names=prepared.service_names,
                tenant=tenant,
            )
            if wanted:
                committed = await self.queue.complete(manifest, ids, self.token, wanted)
            else:
                committed = await self.queue.complete(manifest, ids, self.token)
        except (ObjectStoreError, StagingUnavailable) as exc:
            reason = getattr(exc, "reason", None) or _cause_name(exc)
            counts = _refused_itself(exc)
            await asyncio.shield(self._fail(signal, ids, reason, str(exc), context, counts))
            return
        self._outage = 0  # the store and the database answered: any outage is over
        if not committed:
            self.metrics.orphans.labels(signal).inc()
            log_event(
                "lease_lost",
                "batch items were claimed by another worker; object left as an orphan",
                reason="lease_expired",
                level=logging.WARNING,
                object_key=key,
                **context,
            )
            return
        if self.on_completed is not None:
            self.on_completed(len(ids), committed if committed is not True else None, tenant)
        if wanted and self.on_handed is not None:
            self.on_handed(wanted)
        self.metrics.batches.labels(signal).inc()
        self.metrics.batch_items.labels(signal).observe(len(ids))
        self.metrics.batch_records.labels(signal).inc(prepared.record_count)
        self.metrics.batch_bytes.labels(signal).inc(size)
        log_event(
            "batch_flushed",
            "batch uploaded and indexed",
            level=logging.DEBUG,
            object_key=key,
            **context,
        )

    async def _fail(
        self,
        signal: str,
        ids: list[int],
        reason: str,
        error: str,
        context: dict[str, Any],
        counts: bool,
    ) -> None:
        """Mark the batch's rows failed, for a retry after a backoff. Only a failure that
        ``counts`` (the store or the database refused this batch itself) is one of the
        rows' attempts, past MAX_ATTEMPTS of which they are dead; an outage (unreachable,
        timed out, failing, throttled) is not theirs: their attempts stay, they never die
        of it, and they back off by this worker's run of outage failures, capped."""
        self.metrics.batch_failures.labels(signal, reason).inc()
        log_event(
            "batch_persist_failed",
            "batch write failed; items marked failed for retry",
            reason=reason,
            level=logging.WARNING,
            counted=counts,
            **context,
        )
        step = None
        if not counts:
            step = min(self._outage, 60)
            self._outage += 1
        try:
            outcome = await self.queue.fail(
                ids, self.token, f"{reason}: {error}", self.retry, counts=counts, step=step
            )
        except StagingUnavailable as exc:
            # The rows stay claimed; their lease expires and another claim retries them.
            log_event(
                "batch_fail_mark_failed",
                "could not mark batch items failed; they return when their lease expires",
                reason=_cause_name(exc),
                level=logging.WARNING,
                **context,
            )
            return
        dead = [item_id for item_id, status in outcome if status == "dead"]
        if dead:
            self.metrics.items_dead.labels(signal, "max_attempts").inc(len(dead))
            log_event(
                "items_dead",
                "items exhausted their attempts and are dead",
                reason="max_attempts",
                level=logging.ERROR,
                signal=signal,
                item_ids=dead[:50],
                count=len(dead),
            )

    async def _bury(self, signal: str, poison: list[tuple[int, str]]) -> None:
        for item_id, error in poison:
            try:
                await self.queue.kill([item_id], self.token, error)
            except StagingUnavailable:
                continue  # still claimed; retried after its lease
            self.metrics.items_dead.labels(signal, "undecodable").inc()
            log_event(
                "items_dead",
                "undecodable payload isolated and marked dead",
                reason="undecodable",
                level=logging.ERROR,
                signal=signal,
                item_ids=[item_id],
                count=1,
            )


def _refused_itself(exc: ObjectStoreError | StagingUnavailable) -> bool:
    """Whether the store or the database refused this batch itself (an object the store
    calls invalid, data the database cannot store), which counts toward its rows'
    attempts; anything else is an outage of the infrastructure, the same for every row."""
    if isinstance(exc, ObjectStoreError):
        return exc.refused
    return isinstance(exc, StagingRefused)


def _cause_name(exc: BaseException) -> str:
    cause = exc.__cause__
    return type(cause).__name__ if cause is not None else type(exc).__name__
