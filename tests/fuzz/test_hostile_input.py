"""Hostile input against the real service: property-based (hypothesis), over raw HTTP/1.1.

One service process (``ROLE=ingress``: nothing drains, every accepted payload stays in
``ingestion_queue``; ``STAGING_MAX_BACKLOG`` raised so that the rows piling up never meet
the admission gate's 429) serves the whole module from its own database; the properties talk
to it synchronously over one keep-alive connection (tests/fuzz/rawhttp.py), with the
hostile requests built in tests/fuzz/strategies.py: mutated protobuf, hostile JSON,
corrupt compressed bodies, odd headers and framing.

Invariants, for every example:

1. The answer is a complete HTTP response with a status below 500 (the database is up,
   so not even a 503 is expected).
2. A non-2xx answer from an OTLP endpoint (POST /v1/traces|metrics|logs) carries a
   google.rpc.Status with a non-empty ``message``, in the request's encoding: OTLP/JSON
   if its Content-Type was application/json (any case, any parameters), protobuf
   otherwise, with a matching Content-Type. A 2xx answer carries the signal's
   Export*ServiceResponse in the same encoding. Exempt: h11's own protocol-level refusals
   (a 4xx with no Content-Type and no body that closes the connection) and answers to
   HEAD (which have no body by definition).
3. The service keeps serving the connection: a valid one-span trace request sent next on
   the same connection is answered 200 within 5 s (0.5 s once a stall has been seen, so
   that shrinking one fits the test timeout). Only if the hostile answer announced
   ``Connection: close`` may the test reconnect first.

The control property sends well-formed requests (0..3 supported codings, either
encoding, either framing) and asserts the same, and that they are answered 200.

And at the end of the module:

4. Every ``ingestion_queue`` row parses as its signal's Export*ServiceRequest and its
   ``record_count`` is the number of spans / data points / log records in it.
5. The service log holds no Python traceback, up to and including a graceful stop.

Size of the run: ``OTELWORKER_FUZZ_EXAMPLES`` examples per property (default in
tests/fuzz/conftest.py). For a larger run:

    OTELWORKER_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/fuzz -q -p no:cacheprovider

Under ``CI=true`` the examples are derandomized (the same every run); without it each run
draws new ones. ``--hypothesis-show-statistics`` tells which answers the examples got.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from hypothesis import currently_in_test_context, event, given, settings
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.fuzz.conftest import PROFILE
from tests.fuzz.rawhttp import RawClient, Reply, Stall, TransportFailure
from tests.fuzz.strategies import (
    LIMIT,
    HostileRequest,
    corrupt_compressed_requests,
    hostile_json_requests,
    mutated_protobuf_requests,
    odd_header_requests,
    well_formed_requests,
)
from tests.support import payloads
from tests.support.payloads import unstage
from tests.support.procs import ServiceProcess, run_service
from tests.support.provision import PgServer, create_database, drop_database, run_async

pytestmark = pytest.mark.integration

FUZZ = settings.get_profile(PROFILE)
TIMEOUT_S = 5.0  # a probe (or any answer) slower than this is a stall
# Once a stall has been seen, later ones are recognised sooner: hypothesis re-runs a failing
# example many times while it shrinks it, and 5 s each would not fit the test timeout.
RECHECK_TIMEOUT_S = 0.5  # a healthy probe is answered in milliseconds
WIRE_SHOWN = 2000  # bytes of a failing request shown in the report

REQUEST_TYPES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceRequest,
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
}
RESPONSE_TYPES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceResponse,
    "metrics": metrics_service_pb2.ExportMetricsServiceResponse,
    "logs": logs_service_pb2.ExportLogsServiceResponse,
}


# --- the service under test ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_database(pg_server: PgServer) -> Iterator[str]:
    dsn = create_database(pg_server.dsn)
    yield dsn
    drop_database(pg_server.dsn, dsn)


@pytest.fixture(scope="module", params=["hypercorn", "serve"])
def service(fuzz_database: str, request: pytest.FixtureRequest) -> Iterator[ServiceProcess]:
    """The bare hypercorn entry, then ``serve`` (uvicorn): each takes the whole suite."""
    proc = run_service(
        {
            "DATABASE_URL": fuzz_database,
            "ROLE": "ingress",
            "MAX_REQUEST_BODY_BYTES": str(LIMIT),
            "LOG_LEVEL": "INFO",
            # Nothing drains: keep the admission gate from refusing the probes with 429s.
            "STAGING_MAX_BACKLOG": str(10**9),
        },
        entry=request.param,
    )
    proc.wait_ready()
    yield proc
    proc.terminate(30)


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[RawClient]:
    connection = RawClient("127.0.0.1", service.port, timeout=TIMEOUT_S)
    yield connection
    connection.close()


# --- the invariants ----------------------------------------------------------------------------


class Unanswered(AssertionError):
    """Invariant 1: the hostile request got no complete response."""


class ServerError(AssertionError):
    """Invariant 1: the hostile request got a 5xx."""


class BadErrorBody(AssertionError):
    """Invariant 2: a non-2xx answer is not a google.rpc.Status with a message."""


class BadSuccessBody(AssertionError):
    """Invariant 2: a 2xx answer is not the signal's Export*ServiceResponse."""


class StoppedServing(AssertionError):
    """Invariant 3: the valid request after the hostile one failed on that connection."""


class NotAccepted(AssertionError):
    """Control: a well-formed request was not accepted."""


def parse_answer(body: bytes, message: Message, as_json: bool) -> Message:
    if as_json:
        json_format.Parse(body, message)
    else:
        message.ParseFromString(body)
    return message


def media_type(reply: Reply) -> str:
    return (reply.header("content-type") or "").split(";")[0].strip().lower()


def is_protocol_refusal(reply: Reply) -> bool:
    """h11's own answer to a malformed request: a bare 4xx, and the connection closes."""
    return (
        400 <= reply.status < 500
        and reply.announces_close
        and reply.header("content-type") is None
        and not reply.body
    )


def check_answer_body(request: HostileRequest, reply: Reply) -> None:
    signal = request.endpoint_signal
    if signal is None or request.method.upper() == "HEAD":
        return
    expected_type = "application/json" if request.answers_json else "application/x-protobuf"
    encoding = "OTLP/JSON" if request.answers_json else "protobuf"
    if 200 <= reply.status < 300:
        try:
            parse_answer(reply.body, RESPONSE_TYPES[signal](), request.answers_json)
        except (json_format.ParseError, DecodeError, UnicodeDecodeError) as exc:
            raise BadSuccessBody(
                f"{reply.status}: not a {encoding} Export*ServiceResponse ({exc}): {reply!r}"
            ) from None
        return
    if is_protocol_refusal(reply):
        return
    try:
        status = parse_answer(reply.body, status_pb2.Status(), request.answers_json)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError) as exc:
        raise BadErrorBody(
            f"{reply.status}: body is not a {encoding} google.rpc.Status ({exc}): {reply!r}"
        ) from None
    if not status.message:  # type: ignore[attr-defined]
        raise BadErrorBody(f"{reply.status}: google.rpc.Status without a message: {reply!r}")
    if media_type(reply) != expected_type:
        raise BadErrorBody(f"{reply.status}: Status body labelled {media_type(reply)!r}: {reply!r}")


def probe_bytes() -> bytes:
    return HostileRequest("traces", payloads.traces(1).SerializeToString()).raw()


def check_still_serving(client: RawClient, hostile: Reply) -> None:
    if hostile.announces_close:
        client.reconnect()  # allowed: the answer said so, and it arrived whole
    after = (
        f"after a {hostile.status} with Connection: close, on a new connection"
        if hostile.announces_close
        else f"after a {hostile.status} without Connection: close, on the same connection"
    )
    try:
        reply = client.exchange(probe_bytes())
    except TransportFailure as exc:
        raise StoppedServing(
            f"{after}, a valid trace request: {type(exc).__name__}: {exc}"
            f"\n  (the hostile answer was {hostile!r})"
        ) from exc
    if reply.status != 200:
        raise StoppedServing(f"{after}, a valid trace request got {reply!r}")
    if reply.announces_close:  # e.g. hypercorn's keep_alive_max_requests
        client.reconnect()


def exchange(client: RawClient, request: HostileRequest, *, must_accept: bool = False) -> None:
    """Send one hostile request and assert invariants 1-3 on what follows (and, for a
    well-formed request, that it was accepted)."""
    client.ensure_fresh()
    try:
        try:
            reply = client.exchange(request.pieces(), head_request=request.method.upper() == "HEAD")
        except TransportFailure as exc:
            raise Unanswered(f"{type(exc).__name__}: {exc}") from exc
        if currently_in_test_context():  # for --hypothesis-show-statistics
            event(f"answered {reply.status}{', Connection: close' * reply.announces_close}")
        if reply.status >= 500:
            raise ServerError(f"answered {reply!r}")
        check_answer_body(request, reply)
        if must_accept and reply.status != 200:
            raise NotAccepted(f"a well-formed request was answered {reply!r}")
        check_still_serving(client, reply)
    except BaseException as exc:
        client.close()  # the next example starts on a fresh connection
        if isinstance(exc.__cause__, Stall):
            client.timeout = RECHECK_TIMEOUT_S
        if isinstance(exc, AssertionError):
            wire = b"".join(request.pieces())
            shown = repr(wire[:WIRE_SHOWN]) + (
                f" + {len(wire) - WIRE_SHOWN} more bytes" if len(wire) > WIRE_SHOWN else ""
            )
            exc.add_note(f"on the wire, in {len(request.pieces())} write(s): {shown}")
        raise


# --- the properties ----------------------------------------------------------------------------


@FUZZ
@given(request=mutated_protobuf_requests())
def test_mutated_protobuf(client: RawClient, request: HostileRequest) -> None:
    exchange(client, request)


@FUZZ
@given(request=hostile_json_requests())
def test_hostile_json(client: RawClient, request: HostileRequest) -> None:
    exchange(client, request)


@FUZZ
@given(request=corrupt_compressed_requests())
def test_corrupt_compressed_bodies(client: RawClient, request: HostileRequest) -> None:
    exchange(client, request)


@FUZZ
@given(request=odd_header_requests())
def test_odd_headers(client: RawClient, request: HostileRequest) -> None:
    exchange(client, request)


@FUZZ
@given(request=well_formed_requests())
def test_well_formed_requests_are_accepted(client: RawClient, request: HostileRequest) -> None:
    """The control: what real clients send is accepted (200), whatever the coding."""
    exchange(client, request, must_accept=True)


# --- after all of them (file order; the last one stops the service) ------------------------------


def count_records(signal: str, message: Any) -> int:
    """Spans, data points or log records, written out field by field."""
    if signal == "traces":
        return sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
    if signal == "logs":
        return sum(len(s.log_records) for r in message.resource_logs for s in r.scope_logs)
    total = 0
    for r in message.resource_metrics:
        for s in r.scope_metrics:
            for metric in s.metrics:
                total += len(metric.gauge.data_points) + len(metric.sum.data_points)
                total += len(metric.histogram.data_points) + len(metric.summary.data_points)
                total += len(metric.exponential_histogram.data_points)
    return total


def queue_rows(dsn: str) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(
                await conn.fetch(
                    "SELECT id, signal, payload, record_count FROM ingestion_queue ORDER BY id"
                )
            )
        finally:
            await conn.close()

    return run_async(fetch)


def test_staged_rows_parse_and_are_counted(service: ServiceProcess, fuzz_database: str) -> None:
    rows = queue_rows(fuzz_database)
    assert rows, "nothing staged at all: the probes alone should have left rows"
    problems = []
    for row in rows:
        message = REQUEST_TYPES[row["signal"]]()
        try:
            message.ParseFromString(unstage(row["payload"]))
        except DecodeError as exc:
            problems.append(f"row {row['id']} ({row['signal']}): payload does not parse: {exc}")
            continue
        counted = count_records(row["signal"], message)
        if counted != row["record_count"]:
            problems.append(
                f"row {row['id']} ({row['signal']}): record_count {row['record_count']},"
                f" {counted} records in the payload {bytes(row['payload'])[:200]!r}"
            )
    assert not problems, f"{len(problems)} of {len(rows)} rows:\n" + "\n".join(problems[:20])


def test_service_log_has_no_traceback(service: ServiceProcess, client: RawClient) -> None:
    """Checked through a graceful stop, so that what shutdown logs counts too (a connection
    left hanging by some earlier example is cancelled then, with a traceback)."""
    client.close()
    code = service.terminate(30)
    log = service.log_text()
    marker = "Traceback (most recent call last)"
    where = log.find(marker)
    assert where < 0, (
        f"{log.count(marker)} traceback(s) in the service log; the first:\n"
        + log[max(0, where - 500) : where + 4000]
    )
    assert code == 0, f"the service exited with {code} on SIGTERM:\n{service.log_tail()}"
