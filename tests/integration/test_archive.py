"""The archive commands end to end: ``batches``, ``replay``, ``prune`` as an operator runs
them (``python -m otelworker ...`` in a subprocess) against a real database and store.

``replay`` goes to a second otelworker instance (its own database and bucket) or to a
fake OTLP/HTTP target in the test's loop that answers as it is told (429, 503, 400, or
not at all until released).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import signal as signals
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiohttp import web
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otelworker import otlp
from tests.integration.test_failures import FAST, cli_env, gc_orphans_hours_later, s3_settings
from tests.support.objects import (
    S3Access,
    Store,
    Telemetry,
    read_exported,
    record_ids,
    until,
    wait_drained,
)
from tests.support.provision import create_bucket, create_database, delete_bucket, drop_database
from tests.support.server import running_service

pytestmark = pytest.mark.integration

DEADLINE_S = 60  # a deadline, not a wait
HOUR_NS = 3600 * 10**9
SIGNALS = ("traces", "metrics", "logs")


# --- running the commands ------------------------------------------------------------------


@dataclass
class Run:
    code: int | None
    out: str
    err: str


async def start_cli(env: dict[str, str], cwd: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otelworker",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_cli(env: dict[str, str], cwd: Path, *args: str) -> Run:
    """``python -m otelworker ARGS`` to its end, without blocking the loop."""
    proc = await start_cli(env, cwd, *args)
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    return Run(proc.returncode, out.decode(), err.decode())


def ok(run: Run) -> Run:
    assert run.code == 0, (run.code, run.out, run.err)
    return run


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


# --- records with timestamps of our choosing ----------------------------------------------


def _service(resource: Any, name: str) -> None:
    attr = resource.attributes.add()
    attr.key = "service.name"
    attr.value.string_value = name


@dataclass
class Timed:
    """Hand-built requests (one per signal) whose records carry the given timestamps."""

    service: str
    times: dict[str, int]  # a group name -> unix ns
    ids: dict[str, dict[str, list[Hashable]]] = field(default_factory=dict)  # group -> signal
    requests: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = {group: {s: [] for s in SIGNALS} for group in self.times}
        traces = trace_service_pb2.ExportTraceServiceRequest()
        rs = traces.resource_spans.add()
        _service(rs.resource, self.service)
        spans = rs.scope_spans.add()
        spans.scope.name = "tests.archive"
        logs = logs_service_pb2.ExportLogsServiceRequest()
        rl = logs.resource_logs.add()
        _service(rl.resource, self.service)
        records = rl.scope_logs.add()
        metrics = metrics_service_pb2.ExportMetricsServiceRequest()
        rm = metrics.resource_metrics.add()
        _service(rm.resource, self.service)
        metric = rm.scope_metrics.add().metrics.add()
        metric.name = f"timed.{self.service}"
        value = 0
        for group, t in self.times.items():
            for i in range(3):
                span = spans.spans.add()
                span.trace_id = os.urandom(16)
                span.span_id = os.urandom(8)
                span.name = f"timed-{group}-{i}"
                span.start_time_unix_nano = t + i
                span.end_time_unix_nano = t + i + 1000
                self.ids[group]["traces"].append(span.span_id.hex())
                log = records.log_records.add()
                log.body.string_value = f"timed-{self.service}-{group}-{i}"
                if i == 2:  # no time: selected by its observed time
                    log.observed_time_unix_nano = t + i
                else:
                    log.time_unix_nano = t + i
                self.ids[group]["logs"].append(log.body.string_value)
                value += 1
                point = metric.gauge.data_points.add()
                point.as_int = value
                point.time_unix_nano = t + i
                self.ids[group]["metrics"].append((metric.name, value, t + i))
        self.requests = {
            "traces": traces.SerializeToString(),
            "logs": logs.SerializeToString(),
            "metrics": metrics.SerializeToString(),
        }

    async def send(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        async with httpx.AsyncClient() as client:
            for signal, body in self.requests.items():
                response = await client.post(
                    f"{base_url}/v1/{signal}",
                    content=body,
                    headers={"Content-Type": "application/x-protobuf", **(headers or {})},
                )
                assert response.status_code == 200, response.text


def sdk_ids(telemetry: Telemetry) -> dict[str, list[Hashable]]:
    assert not any(telemetry.sent.refused.values()), telemetry.sent.refused
    return {s: list(telemetry.sent.acked[s]) for s in SIGNALS}


def merged(*groups: dict[str, list[Hashable]]) -> dict[str, Counter[Hashable]]:
    return {s: Counter(i for g in groups for i in g[s]) for s in SIGNALS}


# --- a fake OTLP/HTTP target -----------------------------------------------------------------

Answer = Callable[[int], tuple[int, dict[str, str]]]  # arrival number -> status, headers


def always_ok(_: int) -> tuple[int, dict[str, str]]:
    return 200, {}


@dataclass
class Arrival:
    at: float
    signal: str
    status: int
    ids: list[Hashable]
    headers: dict[str, str]


class FakeTarget:
    """Decodes every request and answers per ``answer``; the ids of the requests it
    answered 200 are what it "stored". While ``hold`` is set, requests wait for
    :meth:`release` and are then refused with 503 (their client is gone by then)."""

    def __init__(self, answer: Answer = always_ok) -> None:
        self.answer = answer
        self.arrivals: list[Arrival] = []
        self.hold = False
        self.held = 0
        self._released = asyncio.Event()
        self.url = ""

    def accepted(self, signal: str | None = None) -> list[Hashable]:
        return [
            i
            for a in self.arrivals
            if a.status == 200 and (signal is None or a.signal == signal)
            for i in a.ids
        ]

    def release(self) -> None:
        self.hold = False
        self._released.set()

    async def handle(self, request: web.Request) -> web.Response:
        signal = request.match_info["signal"]
        body = await request.read()  # aiohttp undoes the Content-Encoding
        if body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        message = otlp.decode(signal, body)
        headers = dict(request.headers)
        if self.hold:
            self.held += 1
            await self._released.wait()
            return web.Response(status=503)
        status, extra = self.answer(len(self.arrivals))
        self.arrivals.append(
            Arrival(time.monotonic(), signal, status, record_ids(signal, message), headers)
        )
        if status == 200:
            return web.Response(
                body=otlp.success(signal, otlp.PROTOBUF), content_type="application/x-protobuf"
            )
        detail = status_pb2.Status(code=3, message=f"fake target says {status}")
        return web.Response(
            status=status,
            headers=extra,
            body=detail.SerializeToString(),
            content_type="application/x-protobuf",
        )


@contextlib.asynccontextmanager
async def fake_target(answer: Answer = always_ok) -> AsyncIterator[FakeTarget]:
    target = FakeTarget(answer)
    app = web.Application()
    app.router.add_post("/v1/{signal}", target.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    target.url = f"http://127.0.0.1:{port}"
    try:
        yield target
    finally:
        target.release()
        await runner.cleanup()


# --- a source archive --------------------------------------------------------------------


@dataclass
class Archive:
    env: dict[str, str]
    dsn: str
    store: Store
    by_object: dict[str, dict[str, list[Hashable]]]  # key -> signal -> ids

    def ids(self) -> dict[str, Counter[Hashable]]:
        out: dict[str, Counter[Hashable]] = {s: Counter() for s in SIGNALS}
        for per_signal in self.by_object.values():
            for s, ids in per_signal.items():
                out[s].update(ids)
        return out


async def read_archive(env: dict[str, str], dsn: str, store: Store) -> Archive:
    exported = await read_exported(dsn, store)
    by_object: dict[str, dict[str, list[Hashable]]] = {}
    for obj in exported.objects:
        by_object[obj.key] = {s: (obj.ids if s == obj.signal else []) for s in SIGNALS}
    return Archive(env, dsn, store, by_object)


async def spans_archive(database_url: str, s3_server: Any, bucket: str, requests: int) -> Archive:
    """An archive of ``requests`` objects of a few spans each (one request per object)."""
    async with running_service(
        database_url=database_url,
        **s3_settings(s3_server, bucket),
        **{**FAST, "batch_max_size": 1},
    ) as svc:
        telemetry = Telemetry(svc.url, service_name="kill")
        await asyncio.to_thread(telemetry.send_spans, telemetry.spans(requests * 3), sizes=(3,))
        await wait_drained(database_url, within_s=DEADLINE_S)
    store = Store(s3=S3Access.of(s3_server, bucket))
    archive = await read_archive(cli_env(database_url, s3_server, bucket), database_url, store)
    assert len(archive.by_object) == requests
    return archive


async def small_archive(database_url: str, s3_server: Any, bucket: str) -> Archive:
    async with running_service(
        database_url=database_url, **s3_settings(s3_server, bucket), **FAST
    ) as svc:
        telemetry = Telemetry(svc.url, service_name="small")
        await asyncio.to_thread(telemetry.send_all, 12, 8, 8)
        await wait_drained(database_url, within_s=DEADLINE_S)
    store = Store(s3=S3Access.of(s3_server, bucket))
    archive = await read_archive(cli_env(database_url, s3_server, bucket), database_url, store)
    assert archive.ids() == merged(sdk_ids(telemetry))
    return archive


# --- replay: a time window of one service into a second otelworker ---------------------------


async def test_replay_sends_exactly_the_window_of_one_service_to_a_second_instance(
    database_url: str, pg_server: Any, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    now = time.time_ns()
    inside = Timed("checkout", {"inside": now - HOUR_NS // 2})
    outside = Timed("checkout", {"early": now - 3 * HOUR_NS, "late": now + 2 * HOUR_NS})
    straddling = Timed(
        "checkout",
        {"in": now - HOUR_NS // 4, "before": now - 5 * HOUR_NS, "after": now + 5 * HOUR_NS // 4},
    )
    others = Timed("other", {"inside": now - HOUR_NS // 2})
    async with running_service(
        database_url=database_url, **s3_settings(s3_server, s3_bucket), **FAST
    ) as first:
        checkout = Telemetry(first.url, service_name="checkout", tag="c")
        other = Telemetry(first.url, service_name="other", tag="o")
        await asyncio.to_thread(checkout.send_all, 20, 15, 15)
        await asyncio.to_thread(other.send_all, 6, 6, 6)
        for timed in (inside, outside, straddling, others):
            await timed.send(first.url)
        await wait_drained(database_url, within_s=DEADLINE_S)
    source = Store(s3=S3Access.of(s3_server, s3_bucket))
    everything = await read_exported(database_url, source)
    # SDK records of both services, and 7 groups of 3 records of each signal.
    assert sum(len(everything.ids(s)) for s in SIGNALS) == 50 + 18 + 7 * 9

    second_dsn = create_database(pg_server.dsn)
    second_bucket = create_bucket(s3_server)
    try:
        async with running_service(
            database_url=second_dsn, **s3_settings(s3_server, second_bucket), **FAST
        ) as second:
            until_at = datetime.fromtimestamp(now / 1e9, UTC) + timedelta(hours=1)
            run = ok(
                await run_cli(
                    cli_env(database_url, s3_server, s3_bucket),
                    tmp_path,
                    "replay",
                    "--to",
                    second.url,
                    "--service",
                    "checkout",
                    "--since",
                    "1h",
                    "--until",
                    until_at.isoformat().replace("+00:00", "Z"),
                    "--max-request-bytes",
                    "2000",  # cut the objects into several requests each
                    "--concurrency",
                    "3",
                )
            )
            await wait_drained(second_dsn, within_s=DEADLINE_S)
            replayed = await read_exported(
                second_dsn, Store(s3=S3Access.of(s3_server, second_bucket))
            )
    finally:
        drop_database(pg_server.dsn, second_dsn)
        delete_bucket(s3_server, second_bucket)

    expected = merged(sdk_ids(checkout), inside.ids["inside"], straddling.ids["in"])
    for signal in SIGNALS:
        assert Counter(replayed.ids(signal)) == expected[signal], signal
    records = sum(sum(c.values()) for c in expected.values())
    summary = re.search(r"replayed (\d+) records in (\d+) requests .* from (\d+) objects", run.out)
    assert summary, run.out
    assert int(summary[1]) == records
    # How many requests depends on how the first instance's flushes happened to batch
    # (an object can overlap the window by its time range and still hold no record in
    # it: the cutting itself is in tests/unit/test_archive.py); cut at 2,000 bytes, more
    # than one per object that had records in the window.
    assert 0 < int(summary[2]) <= records
    assert int(summary[3]) >= 1
    assert all(row["service_names"] == ["checkout"] for row in replayed.manifest)


# --- replay against a target that throttles, then is unavailable, then recovers ----------------


async def test_replay_retries_429_and_503_honouring_retry_after_and_delivers_once(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    archive = await small_archive(database_url, s3_server, s3_bucket)

    def answer(n: int) -> tuple[int, dict[str, str]]:
        if n == 0:
            return 429, {"Retry-After": "1"}
        if n in (1, 2):
            return 503, {}
        if n == 3:
            soon = datetime.now(UTC) + timedelta(seconds=1)
            return 503, {"Retry-After": format_datetime(soon, usegmt=True)}
        if n == 4:
            return 502, {"Retry-After": "0"}
        return 200, {}

    async with fake_target(answer) as target:
        run = ok(
            await run_cli(
                archive.env,
                tmp_path,
                "replay",
                "--to",
                target.url,
                "--concurrency",
                "1",
                "--header",
                "Authorization=Bearer s3cr3t-token",
                "--header",
                "X-Scope-OrgID=tenant-a",
            )
        )
    statuses = [a.status for a in target.arrivals]
    assert statuses[:6] == [429, 503, 503, 503, 502, 200], statuses
    # Retry-After: 1 was waited for before the next attempt.
    assert target.arrivals[1].at - target.arrivals[0].at >= 0.95
    for signal in SIGNALS:
        assert Counter(target.accepted(signal)) == archive.ids()[signal], signal
    first = target.arrivals[0].headers
    assert first["Authorization"] == "Bearer s3cr3t-token"
    assert first["X-Scope-OrgID"] == "tenant-a"
    assert first["Content-Type"] == "application/x-protobuf"
    assert first["Content-Encoding"] == "gzip"
    # Header values carry tokens: never in the output or the logs.
    assert "s3cr3t" not in run.out + run.err
    retried = [r for r in json_lines_of(run.err) if r.get("event") == "replay_request_retried"]
    assert [r["reason"] for r in retried][:5] == [
        "status_429",
        "status_503",
        "status_503",
        "status_503",
        "status_502",
    ]
    assert all(r["object_key"] in archive.by_object for r in retried)


def json_lines_of(text: str) -> list[dict[str, Any]]:
    """The JSON log records among the lines (progress lines skipped)."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


async def test_replay_stops_on_400_naming_the_object(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    archive = await small_archive(database_url, s3_server, s3_bucket)
    checkpoint = tmp_path / "replay.checkpoint"
    async with fake_target(lambda n: (400, {})) as target:
        run = await run_cli(
            archive.env,
            tmp_path,
            "replay",
            "--to",
            target.url,
            "--checkpoint",
            str(checkpoint),
            "--concurrency",
            "1",
        )
    assert run.code == 1, (run.code, run.out, run.err)
    assert len(target.arrivals) == 1  # not retried
    assert "answered 400" in run.err and "fake target says 400" in run.err, run.err
    named = [key for key in archive.by_object if key in run.err]
    assert len(named) == 1, run.err
    failed = [r for r in json_lines_of(run.err) if r.get("event") == "replay_object_failed"]
    assert [r["object_key"] for r in failed] == named
    assert checkpoint.read_text() == ""


async def test_replay_dry_run_sends_nothing(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    archive = await small_archive(database_url, s3_server, s3_bucket)
    async with fake_target() as target:
        run = ok(await run_cli(archive.env, tmp_path, "replay", "--to", target.url, "--dry-run"))
    assert target.arrivals == []
    assert all(f"would send {key}" in run.out for key in archive.by_object), run.out
    records = sum(sum(c.values()) for c in archive.ids().values())
    assert f"would send {records} records" in run.out


# --- replay killed halfway, resumed from its checkpoint ---------------------------------------


async def test_replay_killed_halfway_resumes_from_checkpoint_without_resending(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    archive = await spans_archive(database_url, s3_server, s3_bucket, requests=10)
    checkpoint = tmp_path / "replay.checkpoint"
    args = ("replay", "--to", "", "--checkpoint", str(checkpoint), "--concurrency", "1")

    def first_four(n: int) -> tuple[int, dict[str, str]]:
        if n == 3:
            target.hold = True  # every request after this one waits
        return 200, {}

    async with fake_target(first_four) as target:
        argv = [a if a else target.url for a in args]
        proc = await start_cli(archive.env, tmp_path, *argv)
        try:
            await until(lambda: target.held >= 1, within_s=DEADLINE_S, what="a held request")
        finally:
            proc.send_signal(signals.SIGKILL)
            await proc.communicate()
        assert proc.returncode == -signals.SIGKILL
        done_before = checkpoint.read_text().splitlines()
        assert len(done_before) == 4, done_before  # one object per request
        first_run = len(target.arrivals)

        target.answer = always_ok
        target.release()
        run = ok(await run_cli(archive.env, tmp_path, *argv))

    assert "4 objects skipped" in run.out, run.out
    # Nothing checkpointed before the kill was sent again.
    again = {i for arrival in target.arrivals[first_run:] for i in arrival.ids}
    for key in done_before:
        assert not again & set(archive.by_object[key]["traces"]), key
    # And the target holds every record.
    assert set(target.accepted("traces")) == set(archive.ids()["traces"])
    assert sorted(checkpoint.read_text().splitlines()) == sorted(archive.by_object)


# --- prune ---------------------------------------------------------------------------------------


async def test_prune_deletes_old_rows_then_their_objects_and_keeps_the_rest(
    database_url: str, tmp_path: Path
) -> None:
    objects = tmp_path / "objects"
    async with running_service(
        database_url=database_url, local_object_dir=str(objects), **{**FAST, "batch_max_size": 1}
    ) as svc:
        telemetry = Telemetry(svc.url, service_name="prune")
        await asyncio.to_thread(telemetry.send_spans, telemetry.spans(8), sizes=(1,))
        await wait_drained(database_url, within_s=DEADLINE_S)
    store = Store(local_dir=objects)
    keys = sorted((await read_exported(database_url, store)).keys)
    assert len(keys) == 8 and store.keys() == keys
    old, young = keys[:5], keys[5:]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE export_batches SET created_at = now() - interval '40 days'"
            " WHERE object_key = ANY($1::text[])",
            old,
        )
    finally:
        await conn.close()
    # What a prune that crashed between its commit and the deletes leaves: an old orphan.
    # A young one may be an upload whose row is still on its way: it stays.
    partition = "otel/year=2020/month=01/day=01/hour=00/minute=00"
    crashed = f"{partition}/traces_{uuid.uuid4()}.binpb.gz"
    fresh = f"{partition}/traces_{uuid.uuid4()}.binpb.gz"
    store.put(crashed, b"left by a crashed prune")
    store.put(fresh, b"an upload in progress")
    forty_days_ago = time.time() - 40 * 86400
    os.utime(objects / crashed, (forty_days_ago, forty_days_ago))

    env = {**cli_env(database_url), "LOCAL_OBJECT_DIR": str(objects)}
    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "30d", "--dry-run"))
    assert "would delete 5 manifest row(s)" in run.out and "would remove 1 orphan" in run.out
    assert store.keys() == sorted([*keys, crashed, fresh])

    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "30d"))
    assert "deleted 5 manifest row(s)" in run.out and "removed 1 orphan" in run.out, run.out
    remaining = await read_exported(database_url, store)  # every row's object is there
    assert sorted(remaining.keys) == young
    assert store.keys() == sorted([*young, fresh])

    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "30d"))
    assert "deleted 0 manifest row(s)" in run.out
    assert store.keys() == sorted([*young, fresh])


# --- batches ----------------------------------------------------------------------------------


async def test_batches_filters_and_totals(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    now = time.time_ns()
    early = Timed("early", {"early": now - 3 * HOUR_NS})
    async with running_service(
        database_url=database_url, **s3_settings(s3_server, s3_bucket), **FAST
    ) as svc:
        await early.send(svc.url)
        await wait_drained(database_url, within_s=DEADLINE_S)  # objects of their own
        await asyncio.to_thread(Telemetry(svc.url, service_name="a", tag="a").send_all, 9, 6, 6)
        await asyncio.to_thread(Telemetry(svc.url, service_name="b", tag="b").send_all, 4, 3, 3)
        await wait_drained(database_url, within_s=DEADLINE_S)
    exported = await read_exported(database_url, Store(s3=S3Access.of(s3_server, s3_bucket)))
    rows = {row["object_key"]: row for row in exported.manifest}
    env = cli_env(database_url, s3_server, s3_bucket)

    async def listed(*args: str) -> tuple[set[str], dict[str, int]]:
        lines = json_lines(ok(await run_cli(env, tmp_path, "batches", "--json", *args)).out)
        *objects, last = lines
        keys = {o["object_key"] for o in objects}
        assert len(keys) == len(objects)
        totals = last["totals"]
        assert totals == {
            "objects": len(keys),
            "records": sum(rows[k]["record_count"] for k in keys),
            "bytes": sum(rows[k]["compressed_bytes"] for k in keys),
        }
        return keys, totals

    def where(predicate: Callable[[dict[str, Any]], bool]) -> set[str]:
        return {k for k, row in rows.items() if predicate(row)}

    keys, totals = await listed()
    assert keys == set(rows)
    assert totals["records"] == 9 + 6 + 6 + 4 + 3 + 3 + 9
    keys, _ = await listed("--signal", "metrics")
    assert keys == where(lambda r: r["signal"] == "metrics")
    keys, _ = await listed("--service", "b")
    assert keys == where(lambda r: "b" in r["service_names"]) and keys
    assert keys != set(rows)
    keys, _ = await listed("--until", "2h")
    assert keys == where(lambda r: "early" in r["service_names"]) and len(keys) == 3
    keys, _ = await listed("--since", "1h", "--signal", "traces")
    assert keys == where(lambda r: r["signal"] == "traces" and "early" not in r["service_names"])
    keys, totals = await listed("--limit", "2")
    assert totals["objects"] == 2

    table = ok(await run_cli(env, tmp_path, "batches", "--signal", "logs")).out
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["KEY", "SIGNAL", "RECORDS"]
    logs = where(lambda r: r["signal"] == "logs")
    assert {line.split()[0] for line in lines[1:-1]} == logs
    records = sum(rows[k]["record_count"] for k in logs)
    assert lines[-1].startswith(f"total: {len(logs)} objects, {records} records,")


# --- tenants ------------------------------------------------------------------------------------


async def test_tenants_select_list_replay_and_prune_one_tenant(
    database_url: str, pg_server: Any, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    now = time.time_ns()
    sent = {
        "team-a": Timed("svc-a", {"a": now - HOUR_NS // 2, "a-early": now - 3 * HOUR_NS}),
        "team-b": Timed("svc-b", {"b": now - HOUR_NS // 2}),
        "default": Timed("svc-d", {"d": now - HOUR_NS // 2}),  # sent without a tenant
    }
    async with running_service(
        database_url=database_url, **s3_settings(s3_server, s3_bucket), **FAST
    ) as first:
        for tenant, timed in sent.items():
            headers = {"X-Scope-OrgID": tenant} if tenant != "default" else None
            await timed.send(first.url, headers)
        await wait_drained(database_url, within_s=DEADLINE_S)
    access = S3Access.of(s3_server, s3_bucket)
    source = Store(s3=access)
    manifest = (await read_exported(database_url, source)).manifest
    assert {row["tenant"] for row in manifest} == set(sent)
    assert all(row["object_key"].startswith(f"otel/{row['tenant']}/year=") for row in manifest)

    # An object of before tenants: its key without the tenant, its row without one.
    [legacy] = [r for r in manifest if r["tenant"] == "default" and r["signal"] == "traces"]
    legacy_key = legacy["object_key"].replace("otel/default/", "otel/", 1)
    source.put(legacy_key, source.get(legacy["object_key"]))
    access.client().delete_object(Bucket=s3_bucket, Key=legacy["object_key"])
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE export_batches SET object_key = $1, tenant = NULL WHERE batch_id = $2",
            legacy_key,
            legacy["batch_id"],
        )
    finally:
        await conn.close()
    exported = await read_exported(database_url, source)  # every row's object is there
    tenant_of = {row["object_key"]: row["tenant"] or "default" for row in exported.manifest}
    ids_of = {  # record id -> tenant
        i: tenant for obj in exported.objects for i in obj.ids for tenant in [tenant_of[obj.key]]
    }
    env = cli_env(database_url, s3_server, s3_bucket)

    async def listed(*args: str) -> dict[str, str]:
        """batches --json: object key -> the tenant it shows."""
        *objects, last = json_lines(
            ok(await run_cli(env, tmp_path, "batches", "--json", *args)).out
        )
        assert last["totals"]["objects"] == len(objects)
        return {o["object_key"]: o["tenant"] for o in objects}

    assert await listed() == tenant_of  # the row without a tenant shown as the default's
    assert tenant_of[legacy_key] == "default"
    for tenant in ("team-a", "default"):  # the default's: with the object of before tenants
        assert await listed("--tenant", tenant) == {
            k: t for k, t in tenant_of.items() if t == tenant
        }, tenant
    # The other filters still apply, the tenant on top.
    [a_traces] = [r for r in manifest if r["tenant"] == "team-a" and r["signal"] == "traces"]
    assert await listed("--tenant", "team-a", "--signal", "traces") == {
        a_traces["object_key"]: "team-a"
    }
    table = ok(await run_cli(env, tmp_path, "batches", "--tenant", "team-a")).out.splitlines()
    column = table[0].index("TENANT")
    assert {line[column:].split()[0] for line in table[1:-1]} == {"team-a"}
    assert table[-1].startswith("total: 3 objects, 18 records,"), table[-1]
    refused = await run_cli(env, tmp_path, "batches", "--tenant", "team/a")
    assert refused.code == 2 and "argument --tenant: not a tenant name" in refused.err

    # replay one tenant into a second otelworker, which stores it as that tenant's.
    second_dsn = create_database(pg_server.dsn)
    second_bucket = create_bucket(s3_server)
    try:
        async with running_service(
            database_url=second_dsn, **s3_settings(s3_server, second_bucket), **FAST
        ) as second:
            run = ok(
                await run_cli(env, tmp_path, "replay", "--tenant", "team-a", "--to", second.url)
            )
            await wait_drained(second_dsn, within_s=DEADLINE_S)
            replayed = await read_exported(
                second_dsn, Store(s3=S3Access.of(s3_server, second_bucket))
            )
    finally:
        drop_database(pg_server.dsn, second_dsn)
        delete_bucket(s3_server, second_bucket)
    expected = merged(sent["team-a"].ids["a"], sent["team-a"].ids["a-early"])
    for signal in SIGNALS:
        assert Counter(replayed.ids(signal)) == expected[signal], signal
    assert replayed.manifest and {row["tenant"] for row in replayed.manifest} == {"team-a"}
    assert all(row["object_key"].startswith("otel/team-a/year=") for row in replayed.manifest)
    assert "replayed 18 records" in run.out, run.out
    [started] = [r for r in json_lines_of(run.err) if r.get("event") == "replay_started"]
    assert (started["tenant"], started["tenant_header"]) == ("team-a", "X-Scope-OrgID")

    # The tenant header: each request names its object's tenant (the default's by name),
    # under another name if told, or not at all.
    async with fake_target() as target:
        ok(await run_cli(env, tmp_path, "replay", "--to", target.url))
        everything = list(target.arrivals)
        assert Counter(i for a in everything for i in a.ids) == Counter(
            i for obj in exported.objects for i in obj.ids
        )
        for arrival in everything:
            assert {arrival.headers["X-Scope-OrgID"]} == {ids_of[i] for i in arrival.ids}
        target.arrivals.clear()
        ok(
            await run_cli(
                env,
                tmp_path,
                "replay",
                "--to",
                target.url,
                "--tenant",
                "team-b",
                "--tenant-header",
                "X-Tenant",
            )
        )
        assert Counter(target.accepted()) == Counter(
            i for ids in sent["team-b"].ids["b"].values() for i in ids
        )
        assert all(a.headers["X-Tenant"] == "team-b" for a in target.arrivals)
        assert not any("x-scope-orgid" in map(str.lower, a.headers) for a in target.arrivals)
        target.arrivals.clear()
        ok(await run_cli(env, tmp_path, "replay", "--to", target.url, "--no-tenant-header"))
        assert len(target.accepted()) == len(ids_of)
        assert not any("x-scope-orgid" in map(str.lower, a.headers) for a in target.arrivals)

    # gc-orphans: orphans of both layouts under S3_PREFIX go, nothing else does.
    orphans = [
        f"otel/year=2020/month=01/day=01/hour=00/minute=00/traces_{uuid.uuid4()}.binpb.gz",
        f"otel/team-a/year=2020/month=01/day=01/hour=00/minute=00/logs_{uuid.uuid4()}.binpb.gz",
    ]
    outside = f"elsewhere/team-a/year=2020/traces_{uuid.uuid4()}.binpb.gz"
    for key in [*orphans, outside]:
        source.put(key, b"no row names it")
    assert await gc_orphans_hours_later(database_url, s3_server, s3_bucket) == 2
    assert source.keys() == sorted([*tenant_of, outside])

    # prune of one tenant: its rows and objects only.
    run = ok(await run_cli(env, tmp_path, "prune", "--older-than", "0s", "--tenant", "team-b"))
    b_keys = [k for k, t in tenant_of.items() if t == "team-b"]
    assert f"deleted {len(b_keys)} manifest row(s)" in run.out, run.out
    assert "of tenant team-b" in run.out
    assert await listed() == {k: t for k, t in tenant_of.items() if t != "team-b"}
    assert source.keys() == sorted([*(k for k in tenant_of if k not in b_keys), outside])
