"""Issue 20's regressions: one client never fails anyone else's commit, a claim never
returns a row its worker holds, short outages kill no row, corrupt rows are buried alone,
and gc-orphans never removes an object younger than prune's minimum age."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from otelworker.archive.manifest import ArchiveIndex
from otelworker.archive.prune import gc_orphans
from otelworker.exceptions import StagingRefused
from otelworker.gzjoin import PIECE_HEADER
from otelworker.metrics import Metrics
from otelworker.processing.export import Exporter
from otelworker.settings import Compression
from otelworker.sinks.local import LocalObjectStore
from otelworker.staging.database import create_pool
from otelworker.staging.group_commit import GroupCommitter
from otelworker.staging.queue import Facts, RetryPolicy, StagingQueue
from tests.integration.test_failures import FAST, s3_settings
from tests.support.objects import manifest_rows, migrate, queue_rows, until, wait_drained
from tests.support.payloads import traces
from tests.support.server import running_service

pytestmark = pytest.mark.integration

PROTOBUF = "application/x-protobuf"
ZERO = timedelta(0)


def nul_trace_json() -> bytes:
    """An OTLP/JSON trace whose service name and a span attribute hold U+0000."""
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [
                            {"key": "service.name", "value": {"stringValue": "json\u0000svc"}}
                        ]
                    },
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": "0af7651916cd43dd8448eb211c80319c",
                                    "spanId": "b7ad6b7169203331",
                                    "name": "nul\u0000span",
                                    "startTimeUnixNano": "1700000000000000000",
                                    "endTimeUnixNano": "1700000000000001000",
                                    "attributes": [
                                        {"key": "k", "value": {"stringValue": "a\u0000b"}}
                                    ],
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    ).encode()


def nul_trace_protobuf() -> bytes:
    request = traces(2, service="proto\x00svc")
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.add(key="k\x00").value.string_value = "v\x00"
    return request.SerializeToString()


# --- 0: characters PostgreSQL's text refuses ------------------------------------------------


async def test_nul_in_service_names_and_attributes_never_fails_the_shared_commit(
    database_url: str, tmp_path: Path
) -> None:
    good = [traces(1, service=f"good-{i}").SerializeToString() for i in range(24)]
    bad: list[tuple[bytes, str]] = [
        (nul_trace_protobuf(), PROTOBUF) if i % 2 else (nul_trace_json(), "application/json")
        for i in range(8)
    ]
    async with (
        running_service(
            database_url=database_url,
            role="all",
            local_object_dir=str(tmp_path / "objects"),
            batch_flush_interval_ms=50,
            poll_interval_ms=50,
            group_commit_workers=1,
        ) as svc,
        httpx.AsyncClient(timeout=30) as client,
    ):
        # One client in four sends NULs, all at once, so that they share commits.
        async def send(body: bytes, content_type: str) -> int:
            response = await client.post(
                svc.endpoint("traces"), content=body, headers={"content-type": content_type}
            )
            return response.status_code

        sends = [send(b, PROTOBUF) for b in good] + [send(b, t) for b, t in bad]
        statuses = await asyncio.gather(*sends)
        assert statuses[: len(good)] == [200] * len(good)
        # Made storable: the NUL is replaced in the facts, the payload keeps it.
        assert statuses[len(good) :] == [200] * len(bad)

        # A lone surrogate never reaches the database: the JSON parser refuses it (400).
        lone = nul_trace_json().replace(b"json\\u0000svc", b"\\ud800")
        response = await client.post(
            svc.endpoint("traces"), content=lone, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400

        await wait_drained(database_url)
        manifest = await manifest_rows(database_url)
    names = {n for row in manifest for n in row["service_names"]}
    assert {f"good-{i}" for i in range(24)} <= names
    assert {"proto\ufffdsvc", "json\ufffdsvc"} <= names
    assert sum(row["record_count"] for row in manifest) == 24 + 4 * 2 + 4


async def test_a_row_the_database_refuses_fails_alone_with_its_batch_mates_committed(
    database_url: str,
) -> None:
    """The group commit's mechanism, whatever the data error: the refused entry is
    answered as invalid (not 503), every other entry of its commit is committed."""
    await migrate(database_url)
    pool = await create_pool(
        database_url, min_size=1, max_size=4, connect_timeout_s=5, startup_timeout_s=10
    )
    queue = StagingQueue(pool)
    held = asyncio.Event()
    release = asyncio.Event()

    async def stage_many(*args: Any) -> int | None:
        held.set()
        await release.wait()
        return await queue.stage_many(*args)

    committer = GroupCommitter(stage_many, max_items=100, max_bytes=1 << 20, timeout_s=10)
    runner = asyncio.create_task(committer.run(), name="committer")
    try:
        first = asyncio.create_task(committer.stage("traces", b"first", 1))
        await held.wait()  # the committer is busy: the next ones gather into one commit
        facts = Facts("identity", 1, None, None, ("svc",), None)
        # A signal outside the table's CHECK: a data error the database raises for one row.
        signals = ["traces", "logs", "bogus", "metrics", "traces", "bogus", "logs"]
        staged = [
            asyncio.create_task(committer.stage(s, f"p{i}".encode(), 1, facts))
            for i, s in enumerate(signals)
        ]
        await until(lambda: committer.waiting == len(signals), what="all entries waiting")
        release.set()
        outcomes = await asyncio.gather(first, *staged, return_exceptions=True)
        await asyncio.wait_for(committer.drain(), 10)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        rows = await pool.fetch("SELECT signal, payload FROM ingestion_queue ORDER BY id")
        await pool.close()

    refused = [o for o in outcomes[1:] if isinstance(o, BaseException)]
    assert len(refused) == 2 and all(isinstance(o, StagingRefused) for o in refused)
    assert all(isinstance(o, int) for o in [outcomes[0], *outcomes[1:]] if o not in refused)
    stored = sorted(bytes(r["payload"]) for r in rows)
    expected = sorted(
        [b"first"] + [f"p{i}".encode() for i, s in enumerate(signals) if s != "bogus"]
    )
    assert stored == expected


# --- 5: every error checking one row makes that row poison, alone ---------------------------


async def test_a_row_of_corrupt_deflate_goes_dead_alone_and_its_batch_mates_are_exported(
    database_url: str, tmp_path: Path
) -> None:
    objects = str(tmp_path / "objects")
    async with (
        running_service(database_url=database_url, role="ingress", s3_compression="gzip") as svc,
        httpx.AsyncClient(timeout=30) as client,
    ):
        for i in range(6):
            body = traces(2, service=f"mate-{i}").SerializeToString()
            response = await client.post(
                svc.endpoint("traces"), content=body, headers={"content-type": PROTOBUF}
            )
            assert response.status_code == 200
    conn = await asyncpg.connect(database_url)
    try:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM ingestion_queue ORDER BY id")]
        corrupt = ids[2]
        # Staged before the checksum column (no payload_crc): checked by decompression. Its
        # deflate stream is corrupt after the gzip header: ISA-L raises its own IsalError.
        payload = bytes(
            await conn.fetchval("SELECT payload FROM ingestion_queue WHERE id = $1", corrupt)
        )
        # The header is 10 bytes, 16 with the joinable mark (otelworker/gzjoin.py).
        start = len(PIECE_HEADER) if payload.startswith(PIECE_HEADER) else 10
        payload = (
            payload[:start]
            + bytes(b ^ 0xFF for b in payload[start : start + 20])
            + payload[start + 20 :]
        )
        await conn.execute(
            "UPDATE ingestion_queue SET payload = $2, payload_crc = NULL WHERE id = $1",
            corrupt,
            payload,
        )
        # A row staged before the facts (identity, decoded at the flush) whose service name
        # holds a NUL: the manifest stores it storable.
        await conn.execute(
            "INSERT INTO ingestion_queue (signal, payload, record_count) VALUES ('traces', $1, 2)",
            traces(2, service="old\x00row").SerializeToString(),
        )
    finally:
        await conn.close()
    async with running_service(
        database_url=database_url,
        role="worker",
        local_object_dir=objects,
        s3_compression="gzip",
        batch_max_size=50,
        batch_flush_interval_ms=300,
        poll_interval_ms=50,
        lease_timeout_s=5,
    ):
        status = await wait_drained(database_url, within_s=60)
        rows = await queue_rows(database_url)
    assert status == {"dead": 1}
    assert [r["id"] for r in rows] == [corrupt]
    assert rows[0]["attempts"] == 1 and "IsalError" in rows[0]["last_error"]
    manifest = await manifest_rows(database_url)
    names = {n for row in manifest for n in row["service_names"]}
    assert names == {f"mate-{i}" for i in range(6) if i != 2} | {"old\ufffdrow"}
    assert sum(row["record_count"] for row in manifest) == 5 * 2 + 2


# --- 1: a claim never returns a row its worker holds ------------------------------------------


async def test_a_claim_never_returns_a_row_its_worker_holds_after_its_lease_ran_out(
    database_url: str,
) -> None:
    await migrate(database_url)
    pool = await create_pool(
        database_url, min_size=1, max_size=4, connect_timeout_s=5, startup_timeout_s=10
    )
    queue = StagingQueue(pool)
    me, other = uuid.uuid4(), uuid.uuid4()
    try:
        await queue.stage_many(["traces"] * 4, [b"a", b"b", b"c", b"d"], [1] * 4)
        mine = await queue.claim(2, 0.05, me)
        held = [c.id for c in mine]
        # A claim whose answer was lost: the rows carry this worker's token, not held.
        lost = await queue.claim(1, 0.05, me)

        async def expired() -> bool:
            rows = await pool.fetch(
                "SELECT count(*) FROM ingestion_queue WHERE lease_expires_at < now()"
            )
            return bool(rows[0][0] == 3)

        await until(expired, what="the leases to run out (a stall past the lease)")
        # The poller, woken first, claims again: never the rows it holds...
        again = await queue.claim(10, 30, me, held=held)
        assert sorted(c.id for c in again) == [lost[0].id, 4]
        # ...which another worker may take over, as from a stalled worker.
        taken = await queue.claim(10, 30, other)
        assert sorted(c.id for c in taken) == sorted(held)
    finally:
        await pool.close()


# --- 3: gc-orphans shares prune's minimum age -------------------------------------------------


async def gc_orphans_cli(database_url: str, objects: Path, *args: str) -> tuple[int, str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "S3_", "DATABASE_URL", "LOCAL_OBJECT_DIR"))
    }
    env.update(DATABASE_URL=database_url, LOCAL_OBJECT_DIR=str(objects))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otelworker",
        "gc-orphans",
        *args,
        env=env,
        cwd=objects.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_gc_orphans_racing_an_export_never_removes_its_object(
    database_url: str, tmp_path: Path
) -> None:
    """An export uploads its object, then commits its manifest row: in between, the object
    is named by no row. gc-orphans --older-than-s 0 deleted it then; the row committed
    after named a missing object and the records were gone. Below prune's minimum age
    gc-orphans is a usage error now, and at it a just-uploaded object is never taken."""
    await migrate(database_url)
    objects = tmp_path / "objects"
    pool = await create_pool(
        database_url, min_size=1, max_size=4, connect_timeout_s=5, startup_timeout_s=10
    )
    queue = StagingQueue(pool)
    uploaded = asyncio.Event()
    commit = asyncio.Event()

    class Racing:
        """The queue, its index commit held until the race has run."""

        def __getattr__(self, name: str) -> Any:
            return getattr(queue, name)

        async def complete(self, *args: Any, **kwargs: Any) -> int | bool:
            uploaded.set()
            await commit.wait()
            return await queue.complete(*args, **kwargs)

    token = uuid.uuid4()
    exporter = Exporter(
        Racing(),  # type: ignore[arg-type]
        LocalObjectStore(objects),
        Metrics(),
        token=token,
        prefix="otel",
        compression=Compression.GZIP,
        retry=RetryPolicy(5, 10, 100),
    )
    try:
        body = traces(3).SerializeToString()
        await queue.stage_many(["traces"], [body], [3])
        claimed = await queue.claim(10, 60, token)
        flush = asyncio.create_task(exporter.flush("traces", list(claimed)), name="flush")
        await asyncio.wait_for(uploaded.wait(), 30)
        [key] = [p.relative_to(objects).as_posix() for p in objects.rglob("*.gz")]

        code, out, err = await gc_orphans_cli(database_url, objects, "--older-than-s", "0")
        assert code == 2, (out, err)
        assert "--older-than-s" in err and "3600" in err
        code, out, err = await gc_orphans_cli(database_url, objects)
        assert code == 0 and "removed 0 orphan object(s)" in out, (out, err)
        with pytest.raises(ValueError, match="at least 3600"):
            await gc_orphans(
                LocalObjectStore(objects), ArchiveIndex(pool), prefix="otel", older_than=ZERO
            )
        assert (objects / key).is_file()

        commit.set()
        await asyncio.wait_for(flush, 30)
        manifest = await manifest_rows(database_url)
        assert [row["object_key"] for row in manifest] == [key]
        assert (objects / key).is_file()
    finally:
        commit.set()
        await pool.close()


# --- 4: an outage is not a row's failure --------------------------------------------------------


async def test_an_s3_outage_of_many_backoff_periods_kills_no_row_and_the_cap_engages(
    database_url: str,
    s3_server: Any,
    s3_bucket: str,
    tcp_proxy: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's 3-minute outage, scaled down: with MAX_ATTEMPTS 2 and a 20-200 ms
    backoff, the old rule made every row dead within a second of failures; they left the
    backlog, so the staging cap stopped engaging during the very outage it exists for."""
    caplog.set_level(logging.INFO, logger="otelworker")
    parts = urlsplit(s3_server.endpoint_url)
    proxy = tcp_proxy(parts.hostname, parts.port)
    cap = 6
    async with (
        running_service(
            database_url=database_url,
            **s3_settings(
                s3_server, s3_bucket, s3_endpoint_url=proxy.url_for(s3_server.endpoint_url)
            ),
            **{**FAST, "batch_max_size": 2},
            max_attempts=2,
            retry_backoff_initial_ms=20,
            retry_backoff_max_ms=200,
            staging_max_backlog=cap,
            backlog_refresh_interval_ms=50,
        ) as svc,
        httpx.AsyncClient(timeout=30) as client,
    ):
        proxy.refuse()  # S3 unreachable

        async def post() -> int:
            body = traces(2, service="outage").SerializeToString()
            response = await client.post(
                svc.endpoint("traces"), content=body, headers={"content-type": PROTOBUF}
            )
            return response.status_code

        for _ in range(cap):
            assert await post() == 200

        # Many times MAX_ATTEMPTS failures of every batch, each after its backoff.
        def failures() -> list[logging.LogRecord]:
            return [
                r for r in caplog.records if getattr(r, "event", None) == "batch_persist_failed"
            ]

        await until(lambda: len(failures()) >= 10 * cap, within_s=120, what="many failed tries")
        assert not any(r.counted for r in failures())
        rows = await queue_rows(database_url)
        assert len(rows) == cap
        assert {r["status"] for r in rows} <= {"failed", "processing", "pending"}, rows
        assert all(r["attempts"] == 0 for r in rows), rows
        # The failed rows are the backlog: the cap engages during the outage.
        await until(
            lambda: svc.service.backlog is not None and svc.service.backlog.value >= cap,
            what="the backlog recount",
        )
        assert await post() == 429

        proxy.pass_through()  # S3 back: everything drains, nothing dead
        status = await wait_drained(database_url, within_s=120)
        assert status == {}
        manifest = await manifest_rows(database_url)
    assert sum(row["record_count"] for row in manifest) == cap * 2
