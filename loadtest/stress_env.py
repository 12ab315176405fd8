"""What the stress scenarios stand on: the stores, the service process, the ledger, the checks.

- :class:`Harness` provisions PostgreSQL and S3 once (through :mod:`loadtest.provision`,
  the same way the tests do) and gives each scenario a :class:`Target`: a fresh
  database and a fresh bucket.
- :class:`Service` is the real process (``python -m hypercorn otelworker.app:app``),
  configured by environment variables, its JSON log captured to a file and parsed.
- :class:`Ledger` remembers what each request carried and how it was answered.
- :class:`Stores` reads back what the stores hold: ``ingestion_queue``, ``export_batches``
  and every object the manifest lists, decoded down to record ids.
- :func:`check_accounting` is the invariant every scenario ends with.

A broken invariant raises :class:`InvariantBroken`, whose first argument names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from loadtest import otlp_grpc, provision
from loadtest.stress_records import (
    MAX_RECORDS,
    REQUEST_TYPES,
    Template,
    decompress_object,
    ids_in_payload,
    iter_ids,
    signal_of_key,
)
from otelworker.compression import decompress

T = TypeVar("T")

#: Small limits, so that every mechanism is reached with little traffic.
BASE_SETTINGS: dict[str, str] = {
    "ROLE": "all",
    "LOG_LEVEL": "INFO",
    "LOG_AGGREGATION_WINDOW_S": "0.5",
    "SHUTDOWN_GRACE_S": "5",
    "READINESS_DRAIN_DELAY_S": "0",
    "DB_POOL_MIN_SIZE": "1",
    "DB_POOL_MAX_SIZE": "6",
    "GROUP_COMMIT_WORKERS": "2",
    "STAGING_COMMIT_TIMEOUT_S": "20",
    "ENABLE_RATE_LIMITING": "false",
    "STAGING_MAX_BACKLOG": "1000000",
    "OVERFLOW_POLICY": "reject",
    "BACKLOG_REFRESH_INTERVAL_MS": "200",
    "PROCESSING_QUEUE_MAX_DEPTH": "20",
    "POLL_INTERVAL_MS": "100",
    "LEASE_TIMEOUT_S": "15",
    "BATCH_MAX_SIZE": "5",
    "BATCH_FLUSH_INTERVAL_MS": "100",
    "WORKER_CONCURRENCY": "2",
    "MAX_ATTEMPTS": "100",
    "RETRY_BACKOFF_INITIAL_MS": "200",
    "RETRY_BACKOFF_MAX_MS": "1000",
    "S3_PREFIX": "otel",
    "S3_COMPRESSION": "gzip",
    "S3_TIMEOUT_S": "5",
    "S3_CREATE_BUCKET": "false",
}

#: Events that mean a product bug whatever the scenario (no poison payloads are sent).
BUG_EVENTS = ("flush_crashed", "task_died", "items_dead", "startup_failed")

UNKNOWN = 0  # the status of a request with no answer (connection lost, timeout)


class InvariantBroken(AssertionError):
    """An invariant does not hold; ``args[0]`` names it, ``args[1]`` says how."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(name, detail)
        self.name = name
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def check(condition: bool, name: str, detail: str) -> None:
    if not condition:
        raise InvariantBroken(name, detail)


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    within: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Poll ``probe`` until ``done(result)``; a missed deadline (``within`` seconds) breaks
    invariant ``what``."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise InvariantBroken(what, f"not reached within {within:.0f} s (last: {result!r})")
        await asyncio.sleep(interval)


# --- provisioning --------------------------------------------------------------------


@dataclass
class Target:
    """Where one scenario's service writes: its own database and bucket."""

    name: str
    dsn: str
    bucket: str
    s3: provision.S3Handle

    def s3_env(self, endpoint_url: str | None = None) -> dict[str, str]:
        env = self.s3.service_env(self.bucket)
        if endpoint_url is not None:
            env["S3_ENDPOINT_URL"] = endpoint_url
        return env


class Harness:
    """PostgreSQL and S3 for the whole run, a log directory, and clean-up."""

    def __init__(self, workdir: Path, *, keep: bool = False) -> None:
        self.workdir = workdir
        self.keep = keep
        self.pg: provision.PostgresHandle | None = None
        self.s3: provision.S3Handle | None = None
        self.targets: list[Target] = []
        self.services: list[Service] = []

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pg = provision.start_postgres()
        self.s3 = provision.start_s3()

    def describe(self) -> str:
        assert self.pg is not None and self.s3 is not None
        return f"PostgreSQL: {self.pg.source}; S3: {self.s3.source} at {self.s3.endpoint_url}"

    async def target(self, name: str) -> Target:
        assert self.pg is not None and self.s3 is not None
        dsn = await self.pg.fresh_database(f"stress_{name}")
        bucket = await asyncio.to_thread(self.s3.create_bucket, f"stress-{name}")
        target = Target(name, dsn, bucket, self.s3)
        self.targets.append(target)
        return target

    def service(
        self,
        target: Target,
        label: str,
        settings: Mapping[str, str],
        *,
        s3_url: str | None = None,
        base: Mapping[str, str] = BASE_SETTINGS,
        grpc: bool = False,
    ) -> Service:
        """A service (not started); ``grpc``: with OTLP/gRPC on a free port of its own."""
        env = {**base, **target.s3_env(s3_url), "DATABASE_URL": target.dsn}
        port = None
        if grpc:
            port, grpc_port = provision.free_ports(2)
            env.update(provision.grpc_settings(grpc_port))
        env.update(settings)
        n = sum(1 for s in self.services if s.target is target)
        service = Service(target, f"{target.name}-{n}-{label}", env, self.workdir, port=port)
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(service.kill)
        if self.pg is not None:
            if not self.keep:
                for target in self.targets:
                    with contextlib.suppress(Exception):
                        await self.pg.drop_database(target.dsn)
            self.pg.stop()
        if self.s3 is not None:
            if not self.keep and self.s3.source != "moto":
                for target in self.targets:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.s3.delete_bucket, target.bucket)
            self.s3.stop()


# --- the service process -------------------------------------------------------------


class Service:
    """``python -m hypercorn otelworker.app:app`` on a free port, its log in a file."""

    def __init__(
        self,
        target: Target,
        label: str,
        env: dict[str, str],
        workdir: Path,
        *,
        port: int | None = None,
    ) -> None:
        self.target = target
        self.label = label
        self.env = env
        self.port = port
        self.log_path = workdir / f"{label}.log"
        self.proc: provision.AppProcess | None = None
        self._events: list[dict[str, Any]] = []
        self._read_at = 0
        self._partial = b""

    @property
    def url(self) -> str:
        assert self.proc is not None
        return self.proc.url

    def endpoint(self, signal_name: str) -> str:
        return f"{self.url}/v1/{signal_name}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of its OTLP/gRPC server (set up by ``Harness.service(grpc=True)``)."""
        if self.env.get("GRPC_ENABLED", "").lower() != "true" or not self.env.get("GRPC_PORT"):
            raise RuntimeError(f"{self.label} was not started with GRPC_ENABLED and a GRPC_PORT")
        return f"127.0.0.1:{self.env['GRPC_PORT']}"

    async def start(self, within: float = 90.0) -> Service:
        self.log_path.unlink(missing_ok=True)
        self.proc = provision.AppProcess(
            "otelworker.app:app", settings=self.env, log_path=self.log_path, port=self.port
        )
        try:
            await self.proc.wait_ready_async(within)
        except Exception as exc:
            tail = "\n".join(self.proc.log_lines()[-15:])
            await asyncio.to_thread(self.kill)
            raise InvariantBroken(
                "service_starts", f"{self.label}: {exc}\n--- log tail ---\n{tail}"
            ) from None
        return self

    def _tree(self) -> list[psutil.Process]:
        # Only while our child is unreaped: a reaped pid may belong to someone else.
        if not self.alive():
            return []
        assert self.proc is not None
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def server_process(self) -> psutil.Process | None:
        """The process that serves (hypercorn's worker child; the parent supervises)."""
        best: psutil.Process | None = None
        for proc in self._tree():
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(proc.cmdline())
                if "resource_tracker" in cmdline or "semaphore_tracker" in cmdline:
                    continue
                best = proc  # the last one: the deepest child
        return best

    def rss(self) -> int:
        """Resident memory of the serving process, bytes (0 if gone)."""
        proc = self.server_process()
        if proc is None:
            return 0
        try:
            return int(proc.memory_info().rss)
        except psutil.Error:
            return 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    async def stop(self, within: float = 30.0) -> int:
        """SIGTERM: the graceful stop (aggregated log counts are flushed)."""
        if self.proc is None:
            return 0
        return await asyncio.to_thread(self.proc.stop, within)

    def kill(self) -> None:
        """SIGKILL the whole process tree at once: a crash, no shutdown code runs."""
        if self.proc is None:
            return
        tree = self._tree()
        for proc in reversed(tree):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.proc.wait(10)
        for proc in tree[1:]:
            with contextlib.suppress(psutil.Error):
                proc.wait(10)
        self.proc.stop()  # closes the log file; the process is already gone

    # --- the log ---------------------------------------------------------------------
    def events(self, event: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
        """Every JSON log line so far (optionally one event, one reason)."""
        if self.log_path.exists():
            with open(self.log_path, "rb") as fh:
                fh.seek(self._read_at)
                data = self._partial + fh.read()
                self._read_at = fh.tell()
            lines = data.split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                if line.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        self._events.append(json.loads(line))
        return [
            e
            for e in self._events
            if (event is None or e.get("event") == event)
            and (reason is None or e.get("reason") == reason)
        ]

    def event_count(self, event: str, reason: str | None = None) -> int:
        """Occurrences, counting aggregated lines by their ``count``."""
        return sum(int(e.get("count", 1)) for e in self.events(event, reason))

    async def wait_event(self, event: str, reason: str | None, within: float) -> dict[str, Any]:
        async def probe() -> list[dict[str, Any]]:
            return self.events(event, reason)

        found = await wait_until(
            probe, bool, within=within, what=f"log_event_{event}", interval=0.1
        )
        return found[0]

    def bug_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") in BUG_EVENTS]

    # --- metrics ---------------------------------------------------------------------
    async def metrics(self, client: httpx.AsyncClient) -> Metrics:
        response = await client.get(f"{self.url}/metrics", timeout=10)
        response.raise_for_status()
        return Metrics.parse(response.text)


@dataclass
class Metrics:
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        out = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.append((sample.name, dict(sample.labels), float(sample.value)))
        return cls(out)

    def value(self, name: str, **labels: str) -> float:
        """The sum over samples named ``name`` whose labels include ``labels``."""
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        )


# --- what was sent, and how it was answered ------------------------------------------


@dataclass
class Sent:
    index: int
    signal: str
    records: int
    encoding: str
    status: int = -1  # -1: not answered yet; 0: no answer (connection lost)
    retry_after: str | None = None
    body: bytes = b""
    error: str = ""
    latency_s: float = 0.0
    grpc_code: str = ""  # over gRPC: the code name (status is its HTTP analogue)
    retry_info_twice: bool = False  # over gRPC: RetryInfo in the Status and in retryinfo-bin


class Ledger:
    """Every request of a scenario: request ``i`` carries record ids ``i << 16 | n``."""

    def __init__(self) -> None:
        self.requests: dict[int, Sent] = {}
        self._next = 1

    def new(self, signal_name: str, records: int, encoding: str) -> Sent:
        sent = Sent(self._next, signal_name, records, encoding)
        self.requests[sent.index] = sent
        self._next += 1
        return sent

    def by_status(self) -> Counter[int]:
        return Counter(s.status for s in self.requests.values())

    def with_status(self, *statuses: int) -> list[Sent]:
        return [s for s in self.requests.values() if s.status in statuses]

    def records(self, *statuses: int) -> int:
        return sum(s.records for s in self.with_status(*statuses))


ENCODINGS = ("protobuf", "gzip", "json")


class Sender:
    """Builds requests from templates and sends them with httpx, noting each answer.

    ``headers`` go with every request (``{"X-Scope-OrgID": "team-a"}``: a tenant)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        pad: int = 0,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.ledger = ledger
        self.pad = pad
        self.headers = dict(headers or {})
        self.client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        )
        self._templates: dict[tuple[str, int], Template] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    def template(self, signal_name: str, records: int) -> Template:
        key = (signal_name, records)
        if key not in self._templates:
            self._templates[key] = Template(signal_name, records, self.pad)
        return self._templates[key]

    def body(self, sent: Sent) -> tuple[bytes, dict[str, str]]:
        template = self.template(sent.signal, sent.records)
        if sent.encoding == "json":
            return template.make_json(sent.index), {"Content-Type": "application/json"}
        data = template.make(sent.index)
        headers = {"Content-Type": "application/x-protobuf"}
        if sent.encoding == "gzip":
            data = gzip.compress(data, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        return data, headers

    def decompressed_size(self, sent: Sent) -> int:
        """The body's bytes as the service meters them (INGEST_BYTES_PER_S): decompressed."""
        template = self.template(sent.signal, sent.records)
        if sent.encoding == "json":
            return len(template.make_json(sent.index))
        return len(template.make(sent.index))

    async def send(self, service: Service, signal_name: str, records: int, encoding: str) -> Sent:
        sent = self.ledger.new(signal_name, records, encoding)
        return await self.post(service, sent)

    async def post(self, service: Service, sent: Sent) -> Sent:
        """Send ``sent`` (again, for a retry: the same record ids), noting the answer."""
        body, headers = self.body(sent)
        headers.update(self.headers)
        started = time.monotonic()
        try:
            response = await self.client.post(
                service.endpoint(sent.signal), content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            sent.status = UNKNOWN
            sent.error = type(exc).__name__
        else:
            sent.status = response.status_code
            sent.retry_after = response.headers.get("retry-after")
            sent.body = response.content
        sent.latency_s = time.monotonic() - started
        return sent

    async def send_many(
        self,
        service: Service,
        plan: Iterable[tuple[str, int, str]],
        concurrency: int,
        stop: Callable[[Sent], bool] | None = None,
    ) -> list[Sent]:
        """Send every (signal, records, encoding) with ``concurrency`` in flight.

        ``stop(sent)`` returning true ends the run after the requests in flight.
        """
        items = iter(plan)
        done: list[Sent] = []
        halt = False

        async def lane() -> None:
            nonlocal halt
            while not halt:
                try:
                    signal_name, records, encoding = next(items)
                except StopIteration:
                    return
                sent = await self.send(service, signal_name, records, encoding)
                done.append(sent)
                if stop is not None and stop(sent):
                    halt = True

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return done


class GrpcSender(Sender):
    """The same requests over OTLP/gRPC (``service.grpc_target``); each answer noted as the
    HTTP status it is the analogue of (:mod:`loadtest.otlp_grpc`). ``client`` (httpx)
    stays for ``/metrics``."""

    def __init__(
        self, ledger: Ledger, *, pad: int = 0, timeout: float = 30.0, channels: int = 2
    ) -> None:
        super().__init__(ledger, pad=pad, timeout=timeout)
        self.timeout = timeout
        self.channels = channels
        self._exporters: dict[str, list[otlp_grpc.Exporter]] = {}
        self._turn = 0

    async def aclose(self) -> None:
        for exporters in self._exporters.values():
            for exporter in exporters:
                await exporter.channel.close()
        self._exporters.clear()
        await super().aclose()

    def _exporter(self, target: str) -> otlp_grpc.Exporter:
        if target not in self._exporters:
            self._exporters[target] = [
                otlp_grpc.Exporter(otlp_grpc.channel(target)) for _ in range(self.channels)
            ]
        self._turn += 1
        exporters = self._exporters[target]
        return exporters[self._turn % len(exporters)]

    async def send(self, service: Service, signal_name: str, records: int, encoding: str) -> Sent:
        if encoding not in ("protobuf", "gzip"):
            raise ValueError(f"gRPC carries protobuf only, not {encoding!r}")
        sent = self.ledger.new(signal_name, records, encoding)
        body = self.template(signal_name, records).make(sent.index)
        exporter = self._exporter(service.grpc_target)
        started = time.monotonic()
        answer = await exporter.export(
            signal_name, body, deadline_s=self.timeout, gzip=encoding == "gzip"
        )
        sent.latency_s = time.monotonic() - started
        sent.status = answer.status
        sent.grpc_code = answer.code
        sent.body = answer.body
        sent.retry_after = None if answer.retry_after is None else str(answer.retry_after)
        sent.retry_info_twice = answer.retry_info_twice
        if answer.status == UNKNOWN:
            sent.error = f"{answer.code}: {answer.details}"
        return sent


def mixed_plan(
    count: int, *, records: Iterable[int] = (3, 1, 7, 12, 5)
) -> list[tuple[str, int, str]]:
    """``count`` requests cycling through the signals, sizes and encodings."""
    sizes = list(records)
    return [
        (("traces", "logs", "metrics")[i % 3], sizes[i % len(sizes)], ENCODINGS[(i // 3) % 3])
        for i in range(count)
    ]


# --- reading the stores back ---------------------------------------------------------


@dataclass
class Exported:
    """The manifest and the ids found in the objects it lists."""

    manifest_rows: int
    objects_read: int
    records: int
    counts: Counter[int]
    orphans: int  # objects in the bucket that the manifest does not list
    bytes_read: int = 0
    by_signal: dict[str, int] = field(default_factory=dict)
    # With ``per_object``: each manifest row's object, tenant and the ids it holds.
    objects: list[ExportedObject] = field(default_factory=list)


@dataclass
class ExportedObject:
    key: str
    tenant: str | None  # export_batches.tenant (NULL: rows staged before tenants)
    signal: str
    ids: list[int]


class Stores:
    """Read-only views of the scenario's database and bucket."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one connection, shared by the scenario and samplers
        self._s3: Any = None

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        async with self._lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.target.dsn, timeout=30)
            return list(await self._conn.fetch(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0][0] if rows else None

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    async def queue_status(self) -> dict[str, int]:
        rows = await self.fetch("SELECT status, count(*) AS n FROM ingestion_queue GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    async def failed_rows(self) -> list[dict[str, Any]]:
        rows = await self.fetch(
            "SELECT id, status, attempts, last_error FROM ingestion_queue "
            "WHERE attempts > 0 ORDER BY attempts DESC LIMIT 20"
        )
        return [dict(r) for r in rows]

    async def staged_ids(self) -> Counter[int]:
        """Record ids in every row of ``ingestion_queue`` (dead ones too)."""
        rows = await self.fetch("SELECT signal, payload, payload_encoding FROM ingestion_queue")
        counts: Counter[int] = Counter()
        for row in rows:
            payload = decompress(row["payload"], row["payload_encoding"])
            ids = ids_in_payload(row["signal"], payload)
            counts.update(i if i is not None else -1 for i in ids)
        return counts

    async def wait_drained(self, within: float) -> dict[str, int]:
        """Until ``ingestion_queue`` holds no pending, processing or failed row."""
        return await wait_until(
            self.queue_status,
            lambda s: not any(s.get(k) for k in ("pending", "processing", "failed")),
            within=within,
            what="queue_drains",
            interval=0.2,
        )

    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = self.target.s3.client()
        return self._s3

    def _bucket_keys(self) -> list[str]:
        client = self._client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.target.bucket):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def _read(self, rows: list[Any], per_object: bool = False) -> Exported:
        client = self._client()
        objects: list[ExportedObject] = []
        counts: Counter[int] = Counter()
        by_signal: Counter[str] = Counter()
        total = 0
        size = 0
        for row in rows:
            key = row["object_key"]
            try:
                body = client.get_object(Bucket=self.target.bucket, Key=key)["Body"].read()
            except Exception as exc:
                raise InvariantBroken(
                    "manifest_objects_exist", f"{key} is in export_batches but not readable: {exc}"
                ) from None
            size += len(body)
            signal_name = signal_of_key(key)
            check(
                signal_name == row["signal"],
                "manifest_matches_objects",
                f"{key}: manifest signal {row['signal']} but the key says {signal_name}",
            )
            message = REQUEST_TYPES[signal_name]()
            message.ParseFromString(decompress_object(key, body))
            ids = list(iter_ids(signal_name, message))
            check(
                len(ids) == row["record_count"],
                "manifest_matches_objects",
                f"{key}: manifest says {row['record_count']} records, object holds {len(ids)}",
            )
            check(
                None not in ids,
                "no_foreign_records",
                f"{key} holds a record without a harness id",
            )
            counts.update(ids)  # type: ignore[arg-type]
            by_signal[signal_name] += len(ids)
            total += len(ids)
            if per_object:
                objects.append(ExportedObject(key, row["tenant"], signal_name, ids))  # type: ignore[arg-type]
        listed = {row["object_key"] for row in rows}
        orphans = sum(1 for key in self._bucket_keys() if key not in listed)
        return Exported(
            len(rows), len(rows), total, counts, orphans, size, dict(by_signal), objects
        )

    async def exported(self, *, per_object: bool = False) -> Exported:
        """Every object the manifest lists, decoded; ``per_object``: each one's ids and
        tenant kept (``Exported.objects``), not only the totals."""
        rows = await self.fetch(
            "SELECT object_key, signal, record_count, tenant FROM export_batches"
        )
        return await asyncio.to_thread(self._read, rows, per_object)


# --- the accounting invariant ----------------------------------------------------------


@dataclass
class Accounting:
    acked_requests: int
    acked_records: int
    refused_requests: int
    unknown_requests: int
    unknown_present: int
    exported_records: int
    objects: int
    orphans: int
    exported: Exported | None = None  # with ``check_accounting(per_object=True)``

    def line(self) -> str:
        text = (
            f"{self.acked_records} acked records in {self.objects} objects, exactly once; "
            f"{self.refused_requests} refused requests absent"
        )
        if self.unknown_requests:
            text += (
                f"; {self.unknown_requests} unanswered requests "
                f"({self.unknown_present} stored whole, the rest absent)"
            )
        if self.orphans:
            text += f"; {self.orphans} orphan objects (not in the manifest)"
        return text


def account(ledger: Ledger, counts: Counter[int], where: str) -> tuple[int, int]:
    """Records acknowledged with 200 are in ``counts`` exactly once; refused ones absent.

    A request with no answer (status 0) is stored whole or not at all. Returns
    (records found, unanswered requests found whole).
    """
    per_request: Counter[int] = Counter()
    for rid, n in counts.items():
        request, record = rid >> 16, rid & (MAX_RECORDS - 1)
        sent = ledger.requests.get(request)
        check(
            sent is not None and record < sent.records,
            "no_phantom_records",
            f"record id {rid:#x} is in {where} but was never sent",
        )
        assert sent is not None
        check(
            n == 1,
            "none_twice",
            f"record {record} of request {request} ({sent.signal}, answered {sent.status}) "
            f"is in {where} {n} times",
        )
        per_request[request] += 1
    unknown_whole = 0
    for sent in ledger.requests.values():
        found = per_request.get(sent.index, 0)
        if sent.status == 200:
            check(
                found == sent.records,
                "acked_records_present",
                f"request {sent.index} ({sent.signal}, {sent.records} records, {sent.encoding}) "
                f"was answered 200 but {found} of its records are in {where}",
            )
        elif sent.status == UNKNOWN:
            check(
                found in (0, sent.records),
                "unanswered_all_or_nothing",
                f"request {sent.index} had no answer and {found} of its {sent.records} "
                f"records are in {where}",
            )
            unknown_whole += found == sent.records
        else:
            check(
                found == 0,
                "refused_records_absent",
                f"request {sent.index} ({sent.signal}) was answered {sent.status} but {found} "
                f"of its records are in {where}",
            )
    return sum(per_request.values()), unknown_whole


async def check_accounting(
    ledger: Ledger, stores: Stores, *, drain_timeout: float = 90.0, per_object: bool = False
) -> Accounting:
    """Wait for the drain, then hold the stores against the ledger; ``per_object``: keep
    what each object holds (``Accounting.exported``), for checks of their own."""
    await stores.wait_drained(drain_timeout)
    status = await stores.queue_status()
    check(
        not status.get("dead"),
        "no_dead_rows",
        f"{status.get('dead')} rows are dead (no poison was sent): {await stores.failed_rows()}",
    )
    exported = await stores.exported(per_object=per_object)
    _, unknown_whole = account(ledger, exported.counts, "the manifest's objects")
    return Accounting(
        acked_requests=len(ledger.with_status(200)),
        acked_records=ledger.records(200),
        refused_requests=len(
            [s for s in ledger.requests.values() if s.status not in (200, UNKNOWN)]
        ),
        unknown_requests=len(ledger.with_status(UNKNOWN)),
        unknown_present=unknown_whole,
        exported_records=exported.records,
        objects=exported.objects_read,
        orphans=exported.orphans,
        exported=exported if per_object else None,
    )


def no_bug_events(*services: Service) -> None:
    for service in services:
        bugs = service.bug_events()
        check(
            not bugs,
            "no_bug_events",
            f"{service.label} logged {[(e.get('event'), e.get('reason')) for e in bugs][:5]} "
            f"(see {service.log_path})",
        )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")
