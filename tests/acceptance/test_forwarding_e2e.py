"""Forwarding end to end (issue 21): the service as a real process, real destinations.

Each test runs ``hypercorn otelworker.app:app`` (tests/support/procs.py) on a real
PostgreSQL and S3, with a ``DESTINATIONS_FILE`` naming destinations that are: an OTLP/HTTP
sink in the test's own event loop (tests/support/otlp_sink.py: down, refusing, slow, or
counting), rotel receiving OTLP/HTTP and OTLP/gRPC and exporting onward to such a sink,
and a second otelworker. What is checked is what an operator is promised
(docs/forwarding.md): every acknowledged record reaches every destination that wants it,
at least once, per signal and tenant; a destination's Retry-After is honoured; a permanent
refusal parks the delivery dead with the destination's message while the others flow; a
slow destination does not move another's latency; a forwarder killed mid-send duplicates
only what it had in flight; header values are in no log line nor command output.

Settings are short (poll 0.2 s, backoff at most 1 s, lease 2-5 s) so the whole file runs in
about a minute and a half.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.test_workers import service_env, services, start
from tests.support import free_port
from tests.support.objects import (
    S3Access,
    Sent,
    Store,
    Telemetry,
    read_exported,
    wait_drained,
    wait_for,
)
from tests.support.otlp_sink import Behaviour, OtlpSink
from tests.support.procs import REPO_ROOT
from tests.support.provision import create_database, drop_database
from tests.support.secrets import leaked, new_token

pytestmark = pytest.mark.acceptance

READY_S = 180  # deadlines, not waits: generous for a loaded CI machine
DEADLINE_S = 90
SIGNALS = ("traces", "metrics", "logs")


# --- helpers ---------------------------------------------------------------------------------


def forward_env(
    database_url: str,
    s3_server: Any,
    bucket: str,
    destinations: str | None,
    **extra: Any,
) -> dict[str, str]:
    settings: dict[str, Any] = {
        "forward_poll_interval_s": 0.2,
        "forward_backoff_max_s": 1,
        "forward_lease_s": 5,
        **extra,
    }
    env = service_env(database_url, s3_server, bucket, **settings)
    if destinations is not None:
        env["DESTINATIONS_FILE"] = destinations
    return env


def destinations_file(directory: Path, *entries: dict[str, Any]) -> str:
    path = directory / "destinations.yaml"
    path.write_text(yaml.safe_dump({"destinations": list(entries)}, sort_keys=False))
    return str(path)


async def fetch(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def deliveries(dsn: str, destination: str) -> list[dict[str, Any]]:
    return await fetch(
        dsn, "SELECT * FROM deliveries WHERE destination = $1 ORDER BY id", destination
    )


async def not_taken(dsn: str, destination: str, signals: tuple[str, ...] = SIGNALS) -> int:
    """Archived objects of ``signals`` that ``destination`` has not taken (no delivered row)."""
    rows = await fetch(
        dsn,
        "SELECT count(*) AS n FROM export_batches e WHERE e.signal = ANY($2::text[])"
        " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.batch_id = e.batch_id"
        " AND d.destination = $1 AND d.status = 'delivered')",
        destination,
        list(signals),
    )
    return int(rows[0]["n"])


async def wait_taken(
    dsn: str, destination: str, signals: tuple[str, ...] = SIGNALS, within_s: float = DEADLINE_S
) -> None:
    """Until the queue is drained and every archived object went to ``destination``."""
    await wait_drained(dsn, within_s=within_s)
    await wait_for(
        lambda: not_taken(dsn, destination, signals),
        lambda n: n == 0,
        within_s=within_s,
        what=f"every object delivered to {destination}",
    )


def send(url: str, tenant: str, spans: int, points: int, logs: int) -> Sent:
    telemetry = Telemetry(
        url, service_name=f"svc-{tenant}", tag=tenant, headers={"X-Scope-OrgID": tenant}
    )
    sent = telemetry.send_all(spans, points, logs)
    assert not any(sent.refused.values()), sent.refused
    return sent


def assert_every_record_arrived(sink: OtlpSink, sent: dict[str, Sent], by_tenant: bool) -> None:
    for signal in SIGNALS:
        got = sink.ids(signal)
        tenants = sink.ids_by_tenant(signal)
        for tenant, what in sent.items():
            missing = set(what.acked[signal]) - set(got)
            assert not missing, f"{signal}/{tenant}: {len(missing)} acknowledged records missing"
            if by_tenant:
                wrong = set(what.acked[signal]) - tenants.get(tenant, set())
                assert not wrong, f"{signal}: {len(wrong)} of {tenant}'s records under another"


async def metric_total(url: str, name: str, **labels: str) -> float:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{url}/metrics")
    response.raise_for_status()
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m otelworker ARGS`` as an operator runs it, with the service's settings."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "otelworker", *args],
        env={**os.environ, **env, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.asynccontextmanager
async def sinks(*ports_up: tuple[int, bool]) -> Any:
    """OTLP sinks on these ports, started when ``up`` (else down until ``start()``)."""
    made = [OtlpSink(port) for port, _ in ports_up]
    try:
        for sink, (_, up) in zip(made, ports_up, strict=True):
            if up:
                await sink.start()
        yield made
    finally:
        for sink in made:
            await sink.stop()


def no_secret_in(*texts: str) -> None:
    for text in texts:
        found = leaked(text)
        assert not found, f"a header value reached a log line or output: {text[:200]!r}"


# --- a destination down through the whole ingest, then up ------------------------------------


async def test_a_destination_down_during_the_ingest_gets_every_record_once_up(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    async with sinks((free_port(), False)) as (sink,):
        path = destinations_file(tmp_path, {"name": "late", "endpoint": sink.url})
        with services() as started:
            proc = start(started, forward_env(database_url, s3_server, s3_bucket, path))
            await asyncio.to_thread(proc.wait_ready, READY_S)
            sent = {
                tenant: await asyncio.to_thread(send, proc.url, tenant, 30, 15, 15)
                for tenant in ("team-a", "team-b")
            }
            await wait_drained(database_url, within_s=DEADLINE_S)
            # Down: every object waits as a delivery row, retried (connection refused).
            rows = await wait_for(
                lambda: deliveries(database_url, "late"),
                lambda rs: rs and all(r["attempts"] >= 1 for r in rs),
                within_s=DEADLINE_S,
                what="failed attempts on every delivery",
            )
            assert {r["status"] for r in rows} <= {"pending", "processing"}
            assert {r["last_status"] for r in rows} == {"connect_error"}, rows[0]
            assert {r["tenant"] for r in rows} == {"team-a", "team-b"}
            assert proc.events("forward_failed"), "forward_failed not logged"

            await sink.start()
            await wait_taken(database_url, "late")
            delivered = await metric_total(proc.url, "otelworker_forward_delivered_records_total")

    assert_every_record_arrived(sink, sent, by_tenant=True)
    acked = sum(len(ids) for s in sent.values() for ids in s.acked.values())
    assert delivered >= acked
    no_secret_in(proc.log_text())


# --- Retry-After: retried no faster than the destination asks ---------------------------------


async def test_retry_after_of_429_and_503_is_honoured(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    asked_s = 2.0  # Retry-After; FORWARD_BACKOFF_MAX_S is 1, so only it explains the gaps
    async with sinks((free_port(), True), (free_port(), True)) as (busy, unavailable):
        busy.behaviour = Behaviour(429, retry_after_s=asked_s, message="slow down")
        unavailable.behaviour = Behaviour(503, retry_after_s=asked_s, message="restarting")
        path = destinations_file(
            tmp_path,
            {"name": "busy", "endpoint": busy.url, "signals": ["traces"]},
            {"name": "unavailable", "endpoint": unavailable.url, "signals": ["traces"]},
        )
        with services() as started:
            proc = start(started, forward_env(database_url, s3_server, s3_bucket, path))
            await asyncio.to_thread(proc.wait_ready, READY_S)
            telemetry = Telemetry(proc.url, service_name="retry-after")
            await asyncio.to_thread(telemetry.send_spans, telemetry.spans(6), sizes=(6,))
            for sink in (busy, unavailable):
                await wait_for(
                    lambda sink=sink: len(sink.arrivals),
                    lambda n: n >= 3,
                    within_s=DEADLINE_S,
                    what="three refused attempts",
                )
            statuses = {r["last_status"] for r in await deliveries(database_url, "busy")}
            assert statuses == {"http_429"}
            busy.behaviour = unavailable.behaviour = Behaviour()
            for name in ("busy", "unavailable"):
                await wait_taken(database_url, name, ("traces",))

    for sink in (busy, unavailable):
        by_object: dict[tuple[Hashable, ...], list[float]] = {}
        for arrival in sink.arrivals:
            by_object.setdefault(tuple(arrival.ids), []).append(arrival.at)
        gaps = [b - a for times in by_object.values() for a, b in itertools.pairwise(times)]
        assert gaps, "no retry"
        assert min(gaps) >= asked_s - 0.1, f"retried sooner than Retry-After: {gaps}"
        assert max(gaps) < asked_s + 2.5, f"retried much later than asked: {gaps}"
        assert set(sink.ids("traces")) == set(telemetry.sent.acked["traces"])


# --- a permanent refusal: dead with its message, while another destination flows -------------


async def test_a_refused_delivery_is_parked_dead_while_another_destination_flows(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    token = new_token()
    refusal = "tenant team-a is unknown to this backend"
    async with sinks((free_port(), True), (free_port(), True)) as (bad, good):
        bad.behaviour = Behaviour(400, message=refusal)
        auth = {"Authorization": "Bearer ${F3_FORWARD_TOKEN}"}
        path = destinations_file(
            tmp_path,
            {"name": "bad", "endpoint": bad.url, "headers": auth},
            {"name": "good", "endpoint": good.url, "headers": auth},
        )
        env = forward_env(database_url, s3_server, s3_bucket, path, f3_forward_token=token)
        with services() as started:
            proc = start(started, env)
            await asyncio.to_thread(proc.wait_ready, READY_S)
            sent = {"team-a": await asyncio.to_thread(send, proc.url, "team-a", 20, 10, 10)}
            await wait_taken(database_url, "good")
            rows = await wait_for(
                lambda: deliveries(database_url, "bad"),
                lambda rs: rs and all(r["status"] == "dead" for r in rs),
                within_s=DEADLINE_S,
                what="the refused deliveries parked dead",
            )
            objects = len(await fetch(database_url, "SELECT batch_id FROM export_batches"))
            assert len(rows) == objects
            assert {r["last_status"] for r in rows} == {"http_400"}
            assert all(refusal in r["last_error"] for r in rows), rows[0]["last_error"]
            assert all(r["attempts"] == 1 for r in rows), "a permanent refusal was retried"
            dead_events = proc.events("forward_dead")
            assert dead_events and all(e.get("destination") == "bad" for e in dead_events)
            assert any(refusal in json.dumps(e) for e in dead_events)

            # The other destination was not held up: each object taken soon after export.
            taken = await deliveries(database_url, "good")
            lags = [(r["delivered_at"] - r["created_at"]).total_seconds() for r in taken]
            assert max(lags) < 5.0, lags

            # What an operator sees.
            cli_env = {"DATABASE_URL": database_url, "DESTINATIONS_FILE": path, **env}
            listing = await asyncio.to_thread(command, cli_env, "destinations", "--json")
            assert listing.returncode == 0, listing.stderr
            shown = {d["destination"]: d for d in map(json.loads, listing.stdout.splitlines())}
            assert shown["bad"]["dead_objects"] == objects
            assert shown["bad"]["pending_objects"] == 0
            assert shown["bad"]["last_error"]["status"] == "http_400"
            assert refusal in shown["bad"]["last_error"]["message"]
            assert shown["good"]["delivered_objects"] == objects
            assert shown["good"]["dead_objects"] == 0
            table = await asyncio.to_thread(command, cli_env, "destinations")
            assert table.returncode == 0, table.stderr
            assert "bad" in table.stdout and refusal in table.stdout

            # Fixed at the destination: requeue-dead brings them back.
            bad.behaviour = Behaviour()
            requeue = await asyncio.to_thread(
                command, cli_env, "requeue-dead", "--destination", "bad"
            )
            assert requeue.returncode == 0, requeue.stderr
            await wait_taken(database_url, "bad")

    assert_every_record_arrived(good, sent, by_tenant=True)
    assert_every_record_arrived(bad, sent, by_tenant=True)
    # The header was sent, with its value from the environment...
    assert {a.headers.get("authorization") for a in good.arrivals} == {f"Bearer {token}"}
    # ... and its value is in no log line and no command output.
    no_secret_in(proc.log_text(), *(c.stdout + c.stderr for c in (listing, table, requeue)))


# --- a slow destination does not move another's latency --------------------------------------


async def test_a_slow_destination_does_not_delay_another(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    async with sinks((free_port(), True), (free_port(), True)) as (slow, fast):
        slow.behaviour = Behaviour(delay_s=5.0)
        path = destinations_file(
            tmp_path,
            {"name": "slow", "endpoint": slow.url, "signals": ["traces"], "timeout_s": 30},
            {"name": "fast", "endpoint": fast.url, "signals": ["traces"]},
        )
        with services() as started:
            proc = start(started, forward_env(database_url, s3_server, s3_bucket, path))
            await asyncio.to_thread(proc.wait_ready, READY_S)
            telemetry = Telemetry(proc.url, service_name="latency")
            acked_at: dict[Hashable, float] = {}
            for _ in range(12):
                spans = telemetry.spans(3)
                await asyncio.to_thread(telemetry.send_spans, spans, sizes=(3,))
                now = time.time()
                acked_at.update({telemetry.span_id(s): now for s in spans})
                await asyncio.sleep(0.25)
            assert not telemetry.sent.refused["traces"]
            await wait_for(
                lambda: set(acked_at) - set(fast.ids("traces")),
                lambda missing: not missing,
                within_s=DEADLINE_S,
                what="every span at the fast destination",
            )
            slow_left = await not_taken(database_url, "slow", ("traces",))

    first: dict[Hashable, float] = {}
    for arrival in fast.delivered():
        for i in arrival.ids:
            first.setdefault(i, arrival.wall)
    latency = sorted(first[i] - acked_at[i] for i in acked_at)
    # Each slow request takes 5 s; had the slow destination held the fast one up, spans
    # would reach the fast one 5 s or more after their acknowledgement.
    assert latency[-1] < 4.0, f"fast destination's ack-to-delivery: max {latency[-1]:.2f} s"
    assert slow_left > 0, "the slow destination was not still busy (the test proves nothing)"
    assert slow.arrivals, "the slow destination got nothing"


# --- real receivers: rotel over OTLP/HTTP and OTLP/gRPC, and a second otelworker --------------


def rotel_binary() -> str | None:
    explicit = os.environ.get("ROTEL_AGENT")
    if explicit:
        return explicit
    with contextlib.suppress(ImportError):
        import rotel

        if rotel.__file__ is not None:
            candidate = Path(rotel.__file__).parent / "rotel-agent"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("rotel-agent")


@contextlib.contextmanager
def rotel_to(sink_url: str, workdir: Path) -> Iterator[tuple[int, int]]:
    """rotel receiving OTLP/HTTP and OTLP/gRPC on local ports, exporting to ``sink_url``
    over OTLP/HTTP; yields (http_port, grpc_port)."""
    binary = rotel_binary()
    if binary is None:  # rotel is in the test extra: missing fails, never skips
        pytest.fail("no rotel-agent binary: pip install rotel (the test extra), or ROTEL_AGENT")
    http_port, grpc_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [binary, "start", "--exporter", "otlp", "--otlp-exporter-protocol", "http"]
    args += ["--otlp-exporter-endpoint", sink_url, "--batch-timeout", "100ms"]
    args += ["--otlp-http-endpoint", f"127.0.0.1:{http_port}"]
    args += ["--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}"]
    args += ["--pid-file", str(workdir / "rotel.pid"), "--log-file", str(workdir / "rotel.log")]
    with open(workdir / "rotel.out", "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:  # ready when its HTTP receiver answers
            assert proc.poll() is None, (workdir / "rotel.out").read_text(errors="replace")
            with contextlib.suppress(httpx.TransportError):
                httpx.post(
                    f"http://127.0.0.1:{http_port}/v1/traces",
                    content=b"",
                    headers={"Content-Type": "application/x-protobuf"},
                    timeout=2,
                )
                break
            assert time.monotonic() < deadline, "rotel did not start"
            time.sleep(0.05)
        yield http_port, grpc_port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_rotel_receives_over_otlp_http_and_grpc(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    async with sinks((free_port(), True), (free_port(), True)) as (via_http, via_grpc):
        with (
            rotel_to(via_http.url, tmp_path / "rotel-http") as (http_port, _),
            rotel_to(via_grpc.url, tmp_path / "rotel-grpc") as (_, grpc_port),
        ):
            path = destinations_file(
                tmp_path,
                {"name": "rotel-http", "endpoint": f"http://127.0.0.1:{http_port}"},
                {"name": "rotel-grpc", "protocol": "grpc", "endpoint": f"127.0.0.1:{grpc_port}"},
            )
            with services() as started:
                proc = start(started, forward_env(database_url, s3_server, s3_bucket, path))
                await asyncio.to_thread(proc.wait_ready, READY_S)
                sent = {"team-r": await asyncio.to_thread(send, proc.url, "team-r", 30, 15, 15)}
                for name in ("rotel-http", "rotel-grpc"):
                    await wait_taken(database_url, name)
                for sink, name in ((via_http, "rotel-http"), (via_grpc, "rotel-grpc")):
                    try:
                        await wait_for(
                            lambda sink=sink: [
                                s
                                for s in SIGNALS
                                if set(sent["team-r"].acked[s]) - set(sink.ids(s))
                            ],
                            lambda missing: not missing,
                            within_s=DEADLINE_S,
                            what=f"{name} to pass every record on",
                        )
                    except AssertionError as exc:
                        out = (tmp_path / name / "rotel.out").read_text(errors="replace")
                        seen = [(a.signal, a.status, len(a.ids)) for a in sink.arrivals]
                        raise AssertionError(
                            f"{exc}\nsink got {seen}\nrotel:\n{out[-3000:]}"
                        ) from None
    for sink in (via_http, via_grpc):
        assert_every_record_arrived(sink, sent, by_tenant=False)


async def test_a_second_otelworker_as_destination_keeps_the_tenants(
    database_url: str, pg_server: Any, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    peer_dsn = create_database(pg_server.dsn)
    peer_objects = tmp_path / "peer-objects"
    try:
        with services() as started:
            peer = start(
                started,
                {
                    "DATABASE_URL": peer_dsn,
                    "LOCAL_OBJECT_DIR": str(peer_objects),
                    "POLL_INTERVAL_MS": "50",
                    "BATCH_FLUSH_INTERVAL_MS": "50",
                    "LOG_AGGREGATION_WINDOW_S": "0",
                    "DB_POOL_MIN_SIZE": "1",
                    "DB_POOL_MAX_SIZE": "5",
                },
            )
            await asyncio.to_thread(peer.wait_ready, READY_S)
            path = destinations_file(tmp_path, {"name": "peer", "endpoint": peer.url})
            proc = start(started, forward_env(database_url, s3_server, s3_bucket, path))
            await asyncio.to_thread(proc.wait_ready, READY_S)
            sent = {
                tenant: await asyncio.to_thread(send, proc.url, tenant, 20, 10, 10)
                for tenant in ("team-a", "team-b")
            }
            await wait_taken(database_url, "peer")
            await wait_drained(peer_dsn, within_s=DEADLINE_S)
            exported = await read_exported(peer_dsn, Store(local_dir=peer_objects))
    finally:
        drop_database(pg_server.dsn, peer_dsn)

    for signal in SIGNALS:
        tenant_of: dict[Hashable, set[str]] = {}
        for obj, row in zip(exported.objects, exported.manifest, strict=True):
            if obj.signal == signal:
                for i in obj.ids:
                    tenant_of.setdefault(i, set()).add(row["tenant"])
        for tenant, what in sent.items():
            missing = set(what.acked[signal]) - set(tenant_of)
            assert not missing, f"{signal}/{tenant}: {len(missing)} records missing at the peer"
            assert all(tenant_of[i] == {tenant} for i in what.acked[signal]), signal


# --- SIGKILL of the forwarder mid-send, five times ---------------------------------------------


class Load:
    """Spans sent to ``url`` in small requests from a thread until stopped."""

    def __init__(self, url: str) -> None:
        self.telemetry = Telemetry(url, service_name="under-load")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.telemetry.send_spans(self.telemetry.spans(4), sizes=(4,))
            self._stop.wait(0.05)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def queued(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    match = re.search(r"(\d+) object\(s\)", result.stdout)
    assert match, result.stdout
    return int(match.group(1))


async def test_sigkill_of_the_forwarder_mid_send_duplicates_only_what_was_in_flight(
    database_url: str, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    kills = 5
    async with sinks((free_port(), True)) as (sink,):
        sink.behaviour = Behaviour(delay_s=0.3)  # sends stay in flight long enough to cut
        path = destinations_file(
            tmp_path,
            {"name": "sink", "endpoint": sink.url, "signals": ["traces"], "concurrency": 2},
        )
        # The exporting service writes no deliveries itself (no DESTINATIONS_FILE): they
        # are queued by `redeliver`, so the ROLE=forwarder process is the only sender.
        exporter_env = forward_env(database_url, s3_server, s3_bucket, None)
        forwarder_env = forward_env(
            database_url, s3_server, s3_bucket, path, role="forwarder", forward_lease_s=2
        )
        cli_env = {**forwarder_env}
        in_flight: list[set[str]] = []
        with services() as started:
            exporter = start(started, exporter_env)
            await asyncio.to_thread(exporter.wait_ready, READY_S)
            with Load(exporter.url) as load:
                for _ in range(kills):
                    await wait_for(
                        lambda: fetch(database_url, "SELECT 1 FROM export_batches LIMIT 1"),
                        bool,
                        within_s=DEADLINE_S,
                        what="an archived object",
                    )
                    queued(
                        await asyncio.to_thread(
                            command, cli_env, "redeliver", "--destination", "sink", "--since", "1h"
                        )
                    )
                    forwarder = start(started, forwarder_env)
                    arrivals = len(sink.arrivals)
                    await wait_for(
                        lambda arrivals=arrivals: (
                            sink.inflight > 0 and len(sink.arrivals) > arrivals
                        ),
                        bool,
                        within_s=DEADLINE_S,
                        interval=0.02,
                        what="a send in flight",
                    )
                    forwarder.kill()
                    held = await fetch(
                        database_url,
                        "SELECT object_key FROM deliveries WHERE destination = 'sink'"
                        " AND status = 'processing'",
                    )
                    assert held, "the killed forwarder held no delivery"
                    in_flight.append({r["object_key"] for r in held})
            acked = load.telemetry.sent.acked["traces"]
            assert not load.telemetry.sent.refused["traces"]
            await wait_drained(database_url, within_s=DEADLINE_S)
            last = await asyncio.to_thread(
                command, cli_env, "redeliver", "--destination", "sink", "--since", "1h"
            )
            queued(last)
            sink.behaviour = Behaviour()
            forwarder = start(started, forwarder_env)
            await asyncio.to_thread(forwarder.wait_ready, READY_S)
            await wait_taken(database_url, "sink", ("traces",))
            again = await asyncio.to_thread(
                command, cli_env, "redeliver", "--destination", "sink", "--since", "1h"
            )
            exported = await read_exported(
                database_url, Store(s3=S3Access.of(s3_server, s3_bucket))
            )

    # Idempotent: everything is delivered, so nothing is queued twice.
    assert queued(again) == 0
    got = sink.ids("traces")
    missing = set(acked) - set(got)
    assert not missing, f"{len(missing)} acknowledged spans never delivered"
    object_of = {i: obj.key for obj in exported.objects for i in obj.ids}
    records_of = Counter(object_of.values())
    twice = {i: n for i, n in got.items() if n > 1}
    cut = set().union(*in_flight)
    assert {object_of[i] for i in twice} <= cut, "a duplicate from an object not in flight"
    bound = sum(records_of[key] for held in in_flight for key in held)
    extra = sum(n - 1 for n in twice.values())
    # The figures, for the record (pytest -s shows them).
    print(
        f"\n{kills} kills: {len(acked)} spans acknowledged, {sum(got.values())} delivered,"
        f" {extra} duplicates of {len(twice)} spans; in flight at the kills:"
        f" {sum(map(len, in_flight))} objects, {bound} spans (the bound)"
    )
    assert extra <= bound
