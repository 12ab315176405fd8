"""The forwarder's OTLP client against port-level fakes: a small aiohttp server (OTLP/HTTP)
and a grpc.aio server implementing TraceService (OTLP/gRPC).

Each answer class (delivered, retry, permanent), Retry-After as seconds and as a date,
gRPC RetryInfo, partial_success, the fast path (the stored bytes sent unchanged),
splitting along resources, the tenant header and an explicit header overriding it, TLS.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard
from aiohttp import web
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import otelworker.forwarding.client as client_module
from otelworker import gzjoin
from otelworker.compression import compress
from otelworker.forwarding.client import (
    MAX_MESSAGE,
    DestinationClient,
    Outcome,
    SendResult,
    make_client,
)
from otelworker.forwarding.destinations import Destination, parse_destinations
from otelworker.settings import Compression
from tests.support import free_port
from tests.support.objects import gzip_members as members
from tests.support.objects import record_ids
from tests.support.pki import Pki, make_pki
from tests.support.secrets import new_token

# --- objects ----------------------------------------------------------------------------


def spans_request(
    resources: int, spans: int, pad: int = 0
) -> trace_service_pb2.ExportTraceServiceRequest:
    """``resources`` resource entries of ``spans`` spans each (fresh ids)."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    now = time.time_ns()
    for r in range(resources):
        entry = request.resource_spans.add()
        attr = entry.resource.attributes.add(key="service.name")
        attr.value.string_value = f"svc-{r}"
        scope = entry.scope_spans.add()
        scope.scope.name = "test"
        for i in range(spans):
            span = scope.spans.add()
            span.trace_id = os.urandom(16)
            span.span_id = os.urandom(8)
            span.name = f"op-{i}" + "x" * pad
            span.start_time_unix_nano = now
            span.end_time_unix_nano = now + 1000
    return request


@dataclass
class Stored:
    """An archived object as the flush writes it: requests joined, gzip members joined."""

    body: bytes
    raw: bytes
    ids: list[Any]
    records: int


def stored(*requests: Any, encoding: str = "gzip") -> Stored:
    raws = [r.SerializeToString() for r in requests]
    if encoding == "gzip":
        body = b"".join(gzip.compress(raw) for raw in raws)
    elif encoding == "zstd":
        body = b"".join(zstandard.ZstdCompressor().compress(raw) for raw in raws)
    else:
        body = b"".join(raws)
    ids = [i for r in requests for i in record_ids("traces", r)]
    return Stored(body, b"".join(raws), ids, len(ids))


def indexed(*requests: Any) -> Stored:
    """An archived object as the flush writes it now: the staged requests' joinable
    members joined into one gzip member, indexed (otelworker/gzjoin.py)."""
    raws = [r.SerializeToString() for r in requests]
    counts = [len(record_ids("traces", r)) for r in requests]
    parts = []
    for raw, n in zip(raws, counts, strict=True):
        fragment = gzjoin.fragment(compress(raw, Compression.GZIP, 1))
        assert fragment is not None
        parts.append((fragment[0], fragment[1], fragment[2], n))
    body = gzjoin.join(parts)
    ids = [i for r in requests for i in record_ids("traces", r)]
    return Stored(body, b"".join(raws), ids, len(ids))


# --- the HTTP fake ----------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes  # as it came on the wire

    def request(self) -> trace_service_pb2.ExportTraceServiceRequest:
        raw = (
            gzip.decompress(self.body)
            if self.headers.get("Content-Encoding") == "gzip"
            else self.body
        )
        out = trace_service_pb2.ExportTraceServiceRequest()
        out.ParseFromString(raw)
        return out


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/x-protobuf"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class HttpFake:
    """OTLP/HTTP on a local port; answers each request with the next of ``answers`` (the
    last one repeated); keeps every request's bytes as they arrived (no decompression)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answers: list[Answer] = [Answer()]
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, ssl_context: Any = None) -> None:
        app = web.Application(handler_args={"auto_decompress": False}, client_max_size=2**26)
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=ssl_context)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        answer = self.answers[min(len(self.received), len(self.answers)) - 1]
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        return web.Response(
            status=answer.status,
            body=answer.body,
            headers={"Content-Type": answer.content_type, **answer.headers},
        )

    def ids(self) -> list[Any]:
        return [i for r in self.received for i in record_ids("traces", r.request())]


@pytest.fixture
async def fake() -> AsyncIterator[HttpFake]:
    server = HttpFake()
    await server.start()
    yield server
    await server.stop()


def destination(text: str, env: dict[str, str] | None = None) -> Destination:
    (d,) = parse_destinations(
        ("destinations:\n  - " + text.strip().replace("\n", "\n    ")).encode(), "t.yaml", env or {}
    )
    return d


async def send(
    d: Destination, obj: Stored, tenant: str = "team-a", encoding: str | None = "gzip", **kw: Any
) -> SendResult:
    client = make_client(d)
    try:
        return await client.send("traces", tenant, obj.body, encoding, len(obj.raw), **kw)
    finally:
        await client.close()


def http_dest(fake: HttpFake, extra: str = "") -> Destination:
    return destination(f"name: fake\nendpoint: http://127.0.0.1:{fake.port}\n{extra}")


def status_body(message: str) -> bytes:
    return status_pb2.Status(code=3, message=message).SerializeToString()


# --- HTTP: the fast path --------------------------------------------------------------


async def test_fast_path_posts_the_stored_bytes_unchanged(fake: HttpFake) -> None:
    # Two requests joined, two gzip members joined: one object as the flush writes it.
    obj = stored(spans_request(2, 5), spans_request(1, 3))
    result = await send(http_dest(fake, "gzip_members: many"), obj, records=obj.records)
    assert result == SendResult(Outcome.DELIVERED, "http_200", "", None, 13, 0, 1)
    (got,) = fake.received
    assert got.path == "/v1/traces"
    assert got.body == obj.body  # byte for byte: not decompressed, not recompressed
    assert got.headers["Content-Encoding"] == "gzip"
    assert got.headers["Content-Type"] == "application/x-protobuf"
    assert got.headers["X-Scope-OrgID"] == "team-a"
    assert fake.ids() == obj.ids


async def test_fast_path_counts_records_when_not_told(fake: HttpFake) -> None:
    obj = stored(spans_request(3, 4))
    result = await send(http_dest(fake), obj)
    assert result.records == 12
    assert fake.received[0].body == obj.body


async def test_one_member_object_goes_as_stored_by_default(fake: HttpFake) -> None:
    obj = stored(spans_request(2, 5))
    assert members(obj.body) == 1
    result = await send(http_dest(fake), obj, records=obj.records)
    assert (result.outcome, result.records, result.requests) == (Outcome.DELIVERED, 10, 1)
    assert fake.received[0].body == obj.body


async def test_several_members_are_sent_as_one_by_default(fake: HttpFake) -> None:
    # Some receivers read only a gzip body's first member (rotel): by default a body is
    # one member, whatever the object's; its records are not decoded, only re-framed.
    obj = stored(spans_request(2, 5), spans_request(1, 3), spans_request(1, 1))
    assert members(obj.body) == 3
    result = await send(http_dest(fake), obj, records=obj.records)
    assert (result.outcome, result.records, result.requests) == (Outcome.DELIVERED, 14, 1)
    (got,) = fake.received
    assert got.headers["Content-Encoding"] == "gzip"
    assert members(got.body) == 1
    assert gzip.decompress(got.body) == obj.raw
    assert fake.ids() == obj.ids


async def test_uncompressed_destination_gets_plain_protobuf(fake: HttpFake) -> None:
    obj = stored(spans_request(1, 3))
    result = await send(http_dest(fake, "compression: none"), obj)
    assert result.outcome is Outcome.DELIVERED
    (got,) = fake.received
    assert "Content-Encoding" not in got.headers
    assert got.body == obj.raw


async def test_uncompressed_object_to_uncompressed_destination_as_is(fake: HttpFake) -> None:
    obj = stored(spans_request(1, 3), encoding="none")
    result = await send(http_dest(fake, "compression: none"), obj, encoding=None, records=3)
    assert (result.outcome, result.records) == (Outcome.DELIVERED, 3)
    assert fake.received[0].body == obj.body


async def test_zstd_object_is_sent_gzip(fake: HttpFake) -> None:
    obj = stored(spans_request(2, 3), spans_request(1, 1), encoding="zstd")
    result = await send(http_dest(fake), obj, encoding="zstd")
    assert (result.outcome, result.records, result.requests) == (Outcome.DELIVERED, 7, 1)
    (got,) = fake.received
    assert got.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(got.body) == obj.raw
    assert fake.ids() == obj.ids


# --- HTTP: splitting --------------------------------------------------------------------


async def test_large_object_is_split_along_resources_and_every_record_arrives(
    fake: HttpFake,
) -> None:
    obj = stored(spans_request(6, 10, pad=40), spans_request(4, 10, pad=40))
    limit = len(obj.raw) // 5
    result = await send(http_dest(fake, f"max_request_bytes: {limit}"), obj, records=obj.records)
    assert result.outcome is Outcome.DELIVERED
    assert result.requests == len(fake.received) >= 5
    assert result.records == 100
    assert sorted(fake.ids()) == sorted(obj.ids)  # every record once
    for got in fake.received:
        assert got.headers["Content-Encoding"] == "gzip"
        assert len(gzip.decompress(got.body)) <= limit
        assert got.headers["X-Scope-OrgID"] == "team-a"


async def test_one_resource_larger_than_the_limit_is_split_by_its_records(
    fake: HttpFake,
) -> None:
    obj = stored(spans_request(1, 50, pad=40))
    limit = len(obj.raw) // 4
    result = await send(http_dest(fake, f"max_request_bytes: {limit}"), obj)
    assert (result.outcome, result.records) == (Outcome.DELIVERED, 50)
    assert len(fake.received) >= 4
    assert sorted(fake.ids()) == sorted(obj.ids)
    for got in fake.received:  # each part keeps its resource
        assert got.request().resource_spans[0].resource.attributes[0].value.string_value == "svc-0"


async def test_a_part_not_delivered_ends_the_attempt(fake: HttpFake) -> None:
    obj = stored(spans_request(4, 10, pad=40))
    limit = len(obj.raw) // 4 + 50
    fake.answers = [Answer(), Answer(status=503, headers={"Retry-After": "7"})]
    result = await send(http_dest(fake, f"max_request_bytes: {limit}"), obj)
    assert result.outcome is Outcome.RETRY
    assert result.status == "http_503"
    assert result.retry_after_s == 7.0
    assert result.requests == 2  # no part sent after the one refused
    assert result.records == 10  # the first part's
    assert len(fake.received) == 2


async def test_an_object_of_many_members_is_packed_by_member_without_decoding(
    fake: HttpFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch of staged requests is one gzip member each: past max_request_bytes they are
    # packed member by member into parts (each member a whole request), not decoded.
    requests = [spans_request(1, 5, pad=40) for _ in range(9)]
    obj = stored(*requests)
    assert members(obj.body) == 9
    one = len(requests[0].SerializeToString())
    decoded: list[str] = []
    real_decode = client_module.otlp.decode
    monkeypatch.setattr(
        client_module.otlp, "decode", lambda sig, raw: decoded.append(sig) or real_decode(sig, raw)
    )
    result = await send(
        http_dest(fake, f"max_request_bytes: {3 * one + 10}"), obj, records=obj.records
    )
    assert (result.outcome, result.records, result.requests) == (Outcome.DELIVERED, 45, 3)
    assert decoded == []
    assert fake.ids() == obj.ids  # every span once, in order
    assert all(members(got.body) == 1 for got in fake.received)

    # A part refused after others went through: the records delivered are counted then.
    fake.received.clear()
    fake.answers = [Answer(), Answer(status=503)]
    result = await send(
        http_dest(fake, f"max_request_bytes: {3 * one + 10}"), obj, records=obj.records
    )
    assert (result.outcome, result.records, result.requests) == (Outcome.RETRY, 15, 2)


async def test_an_indexed_object_goes_as_stored_by_default(fake: HttpFake) -> None:
    obj = indexed(spans_request(2, 5), spans_request(1, 3), spans_request(1, 1))
    assert members(obj.body) == 1
    result = await send(http_dest(fake), obj, records=obj.records)
    assert (result.outcome, result.records, result.requests) == (Outcome.DELIVERED, 14, 1)
    assert fake.received[0].body == obj.body  # one member already: nothing re-framed
    assert fake.ids() == obj.ids


async def test_an_indexed_object_is_cut_into_members_without_inflating(
    fake: HttpFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max_request_bytes an indexed object is cut into runs of whole staged
    requests, each written out as a gzip member of its own: nothing inflated, deflated
    or decoded, and the records of a part come from the index."""
    requests = [spans_request(1, 5, pad=40) for _ in range(9)]
    obj = indexed(*requests)
    one = len(requests[0].SerializeToString())
    calls: list[str] = []
    for module, name in [
        (client_module.otlp, "decode"),
        (client_module.gzjoin, "inflate"),
        (client_module, "compress"),
        (client_module.igzip, "decompress"),
    ]:
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k)
        )
    d = http_dest(fake, f"max_request_bytes: {3 * one + 10}")
    result = await send(d, obj, records=obj.records)
    assert (result.outcome, result.records, result.requests) == (Outcome.DELIVERED, 45, 3)
    assert calls == []
    assert fake.ids() == obj.ids  # every span once, in order
    for got in fake.received:
        assert members(got.body) == 1
        assert len(gzip.decompress(got.body)) <= 3 * one + 10

    # A part refused after others went through: its predecessors' records, from the index.
    fake.received.clear()
    fake.answers = [Answer(), Answer(status=503)]
    result = await send(d, obj, records=obj.records)
    assert (result.outcome, result.records, result.requests) == (Outcome.RETRY, 15, 2)
    assert calls == []


async def test_an_indexed_entry_larger_than_the_limit_is_split_along_its_resources(
    fake: HttpFake,
) -> None:
    big = spans_request(4, 10, pad=40)
    obj = indexed(spans_request(1, 2), big, spans_request(1, 3))
    limit = len(big.SerializeToString()) // 3 + 50
    result = await send(http_dest(fake, f"max_request_bytes: {limit}"), obj, records=obj.records)
    assert result.outcome is Outcome.DELIVERED
    assert result.records == obj.records == 45
    assert sorted(fake.ids()) == sorted(obj.ids)
    assert len(fake.ids()) == len(obj.ids)
    for got in fake.received:
        assert members(got.body) == 1
        assert len(gzip.decompress(got.body)) <= limit


async def test_permanent_part_after_split(fake: HttpFake) -> None:
    obj = stored(spans_request(3, 10, pad=40))
    limit = len(obj.raw) // 3 + 50
    fake.answers = [Answer(), Answer(status=413, body=b"too big", content_type="text/plain")]
    result = await send(http_dest(fake, f"max_request_bytes: {limit}"), obj)
    assert (result.outcome, result.status, result.requests) == (Outcome.PERMANENT, "http_413", 2)
    assert result.message.startswith("too big")
    assert "max_request_bytes" in result.message


# --- HTTP: answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (507, Outcome.RETRY),
        (400, Outcome.PERMANENT),
        (401, Outcome.PERMANENT),
        (403, Outcome.PERMANENT),
        (404, Outcome.PERMANENT),
        (405, Outcome.PERMANENT),
        (409, Outcome.PERMANENT),
        (413, Outcome.PERMANENT),
        (422, Outcome.PERMANENT),
        (301, Outcome.PERMANENT),
    ],
)
async def test_http_status_classes(fake: HttpFake, status: int, outcome: Outcome) -> None:
    fake.answers = [
        Answer(status=status, body=status_body(f"said {status}") if status >= 300 else b"")
    ]
    obj = stored(spans_request(1, 2))
    result = await send(http_dest(fake), obj)
    assert result.outcome is outcome
    assert result.status == f"http_{status}"
    assert result.requests == 1
    if outcome is Outcome.DELIVERED:
        assert result.records == 2
    else:
        assert result.records == 0
        assert result.message.startswith(f"said {status}")


async def test_redirect_is_not_followed(fake: HttpFake) -> None:
    fake.answers = [Answer(status=307, headers={"Location": f"http://127.0.0.1:{fake.port}/x"})]
    result = await send(http_dest(fake), stored(spans_request(1, 1)))
    assert (result.outcome, result.status) == (Outcome.PERMANENT, "http_307")
    assert "redirects are not followed" in result.message
    assert len(fake.received) == 1


async def test_retry_after_seconds(fake: HttpFake) -> None:
    fake.answers = [Answer(status=429, headers={"Retry-After": "12"})]
    result = await send(http_dest(fake), stored(spans_request(1, 1)))
    assert (result.outcome, result.retry_after_s) == (Outcome.RETRY, 12.0)


async def test_retry_after_http_date(fake: HttpFake) -> None:
    at = datetime.now(UTC) + timedelta(seconds=90)
    fake.answers = [Answer(status=503, headers={"Retry-After": format_datetime(at, usegmt=True)})]
    result = await send(http_dest(fake), stored(spans_request(1, 1)))
    assert result.outcome is Outcome.RETRY
    assert result.retry_after_s is not None
    assert 85 <= result.retry_after_s <= 91


async def test_retry_after_absent_or_garbled(fake: HttpFake) -> None:
    fake.answers = [Answer(status=503), Answer(status=503, headers={"Retry-After": "soon"})]
    d = http_dest(fake)
    client = make_client(d)
    obj = stored(spans_request(1, 1))
    try:
        for _ in range(2):
            result = await client.send("traces", "t", obj.body, "gzip", len(obj.raw))
            assert (result.outcome, result.retry_after_s) == (Outcome.RETRY, None)
    finally:
        await client.close()


async def test_retry_after_is_ignored_on_a_permanent_answer(fake: HttpFake) -> None:
    fake.answers = [Answer(status=400, headers={"Retry-After": "5"})]
    result = await send(http_dest(fake), stored(spans_request(1, 1)))
    assert (result.outcome, result.retry_after_s) == (Outcome.PERMANENT, None)


async def test_partial_success_protobuf(fake: HttpFake) -> None:
    response = trace_service_pb2.ExportTraceServiceResponse()
    response.partial_success.rejected_spans = 3
    response.partial_success.error_message = "3 spans too old"
    fake.answers = [Answer(body=response.SerializeToString())]
    result = await send(http_dest(fake), stored(spans_request(1, 10)))
    assert result.outcome is Outcome.DELIVERED
    assert (result.records, result.rejected_records, result.delivered_records) == (10, 3, 7)
    assert result.message == "3 spans too old"


async def test_partial_success_json(fake: HttpFake) -> None:
    body = b'{"partialSuccess": {"rejectedSpans": "4", "errorMessage": "dropped"}}'
    fake.answers = [Answer(body=body, content_type="application/json")]
    result = await send(http_dest(fake), stored(spans_request(1, 10)))
    assert (result.outcome, result.rejected_records, result.message) == (
        Outcome.DELIVERED,
        4,
        "dropped",
    )


async def test_partial_success_summed_over_parts(fake: HttpFake) -> None:
    response = trace_service_pb2.ExportTraceServiceResponse()
    response.partial_success.rejected_spans = 1
    fake.answers = [Answer(body=response.SerializeToString())]
    obj = stored(spans_request(3, 10, pad=40))
    result = await send(http_dest(fake, f"max_request_bytes: {len(obj.raw) // 3 + 50}"), obj)
    assert result.requests == 3
    assert (result.records, result.rejected_records) == (30, 3)


async def test_refusal_message_is_bounded(fake: HttpFake) -> None:
    fake.answers = [Answer(status=400, body=status_body("x" * 5000))]
    result = await send(http_dest(fake), stored(spans_request(1, 1)))
    assert len(result.message) <= MAX_MESSAGE
    fake.answers = [Answer(status=400, body=b"y" * 5000, content_type="text/plain")]
    result = await send(http_dest(fake), stored(spans_request(1, 1)))
    assert 0 < len(result.message) <= MAX_MESSAGE


async def test_connection_refused_is_retried() -> None:
    d = destination(f"name: down\nendpoint: http://127.0.0.1:{free_port()}")
    result = await send(d, stored(spans_request(1, 1)))
    assert (result.outcome, result.status, result.requests) == (Outcome.RETRY, "connect_error", 1)


async def test_timeout_is_retried(fake: HttpFake) -> None:
    fake.answers = [Answer(delay_s=0.6)]
    result = await send(http_dest(fake, "timeout_s: 0.2"), stored(spans_request(1, 1)))
    assert (result.outcome, result.status) == (Outcome.RETRY, "timeout")


async def test_corrupt_object_is_permanent(fake: HttpFake) -> None:
    d = http_dest(fake, "compression: none")
    client = make_client(d)
    try:
        result = await client.send("traces", "t", b"\x1f\x8bnot gzip at all", "gzip", 10)
    finally:
        await client.close()
    assert (result.outcome, result.status, result.requests) == (
        Outcome.PERMANENT,
        "corrupt_object",
        0,
    )
    assert not fake.received


# --- HTTP: headers ------------------------------------------------------------------------


async def test_headers_and_tenant_header(fake: HttpFake) -> None:
    token = new_token()
    d = destination(
        f"name: fake\nendpoint: http://127.0.0.1:{fake.port}\n"
        'headers: {Authorization: "Bearer ${T}", X-Extra: "1"}',
        {"T": token},
    )
    await send(d, stored(spans_request(1, 1)), tenant="team-b")
    headers = fake.received[0].headers
    assert headers["Authorization"] == f"Bearer {token}"
    assert headers["X-Extra"] == "1"
    assert headers["X-Scope-OrgID"] == "team-b"


async def test_custom_tenant_header_and_none(fake: HttpFake) -> None:
    await send(http_dest(fake, "tenant_header: X-Tenant"), stored(spans_request(1, 1)))
    assert fake.received[-1].headers["X-Tenant"] == "team-a"
    assert "X-Scope-OrgID" not in fake.received[-1].headers
    await send(http_dest(fake, 'tenant_header: ""'), stored(spans_request(1, 1)))
    assert "X-Scope-OrgID" not in fake.received[-1].headers


async def test_explicit_header_of_the_tenant_header_name_wins(fake: HttpFake) -> None:
    await send(http_dest(fake, "headers: {x-scope-orgid: fixed}"), stored(spans_request(1, 1)))
    got = fake.received[0]
    values = [v for k, v in got.headers.items() if k.lower() == "x-scope-orgid"]
    assert values == ["fixed"]


async def test_per_signal_url(fake: HttpFake) -> None:
    d = destination(
        f"name: loki\nsignals: [logs]\nlogs_endpoint: http://127.0.0.1:{fake.port}/otlp/v1/logs"
    )
    request = logs_service_pb2.ExportLogsServiceRequest()
    request.resource_logs.add().scope_logs.add().log_records.add().body.string_value = "hi"
    raw = request.SerializeToString()
    client = make_client(d)
    try:
        result = await client.send("logs", "t", gzip.compress(raw), "gzip", len(raw))
    finally:
        await client.close()
    assert (result.outcome, result.records) == (Outcome.DELIVERED, 1)
    assert fake.received[0].path == "/otlp/v1/logs"


async def test_concurrent_sends_share_one_client(fake: HttpFake) -> None:
    fake.answers = [Answer(delay_s=0.05)]
    client = make_client(http_dest(fake, "concurrency: 2"))
    objs = [stored(spans_request(1, 2)) for _ in range(8)]
    try:
        results = await asyncio.gather(
            *(client.send("traces", "t", o.body, "gzip", len(o.raw), records=2) for o in objs)
        )
    finally:
        await client.close()
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    assert sorted(fake.ids()) == sorted(i for o in objs for i in o.ids)


# --- HTTPS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_context(pki: Pki, mutual: bool) -> Any:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if mutual:
        context.load_verify_locations(cafile=pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_https_with_ca_file_and_client_certificate(pki: Pki) -> None:
    server = HttpFake()
    await server.start(_server_context(pki, mutual=True))
    try:
        d = destination(
            f"name: tls\nendpoint: https://localhost:{server.port}\n"
            f"tls: {{ca_file: {pki.ca}, cert_file: {pki.client_cert}, key_file: {pki.client_key}}}"
        )
        result = await send(d, stored(spans_request(1, 2)))
        assert result.outcome is Outcome.DELIVERED
        # Without the CA the server is not trusted: a TLS error, retried.
        untrusted = destination(f"name: tls\nendpoint: https://localhost:{server.port}")
        result = await send(untrusted, stored(spans_request(1, 2)))
        assert (result.outcome, result.status) == (Outcome.RETRY, "tls_error")
        assert "certificate" in result.message.lower()
        assert len(server.received) == 1
    finally:
        await server.stop()


async def test_https_insecure_skip_verify(pki: Pki) -> None:
    server = HttpFake()
    await server.start(_server_context(pki, mutual=False))
    try:
        d = destination(
            f"name: tls\nendpoint: https://localhost:{server.port}\n"
            "tls: {insecure_skip_verify: true}"
        )
        assert (await send(d, stored(spans_request(1, 2)))).outcome is Outcome.DELIVERED
    finally:
        await server.stop()


# --- gRPC -------------------------------------------------------------------------------


@dataclass
class GrpcAnswer:
    code: grpc.StatusCode | None = None  # None: OK
    message: str = ""
    retry_delay_s: float | None = None
    rejected: int = 0
    delay_s: float = 0.0


class TraceFake(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.answers: list[GrpcAnswer] = [GrpcAnswer()]

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        if answer.code is not None:
            trailing: tuple[tuple[str, bytes], ...] = ()
            if answer.retry_delay_s is not None:
                info = error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(
                        seconds=int(answer.retry_delay_s),
                        nanos=round(answer.retry_delay_s % 1 * 1e9),
                    )
                )
                status = status_pb2.Status(code=answer.code.value[0], message=answer.message)
                status.details.add().Pack(info)
                trailing = (("grpc-status-details-bin", status.SerializeToString()),)
            await context.abort(answer.code, answer.message, trailing_metadata=trailing)
        response = trace_service_pb2.ExportTraceServiceResponse()
        if answer.rejected:
            response.partial_success.rejected_spans = answer.rejected
            response.partial_success.error_message = "some rejected"
        return response

    def ids(self) -> list[Any]:
        return [i for r in self.requests for i in record_ids("traces", r)]


@dataclass
class GrpcServer:
    fake: TraceFake
    port: int
    server: Any


async def _grpc_server(credentials: Any = None) -> GrpcServer:
    fake = TraceFake()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(fake, server)
    port = free_port()
    if credentials is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    return GrpcServer(fake, port, server)


@pytest.fixture
async def grpc_fake() -> AsyncIterator[GrpcServer]:
    served = await _grpc_server()
    yield served
    await served.server.stop(None)


def grpc_dest(
    served: GrpcServer, extra: str = "", env: dict[str, str] | None = None
) -> Destination:
    return destination(f"name: g\nprotocol: grpc\nendpoint: 127.0.0.1:{served.port}\n{extra}", env)


async def test_grpc_delivers_with_metadata(grpc_fake: GrpcServer) -> None:
    token = new_token()
    d = grpc_dest(grpc_fake, 'headers: {Authorization: "Bearer ${T}"}', {"T": token})
    obj = stored(spans_request(2, 5), spans_request(1, 3))
    result = await send(d, obj, tenant="team-c", records=obj.records)
    assert result == SendResult(Outcome.DELIVERED, "grpc_OK", "", None, 13, 0, 1)
    assert grpc_fake.fake.ids() == obj.ids
    metadata = grpc_fake.fake.metadata[0]
    assert metadata["authorization"] == f"Bearer {token}"
    assert metadata["x-scope-orgid"] == "team-c"
    assert metadata["user-agent"].startswith("otelworker-forwarder")


async def test_grpc_uncompressed_and_zstd_object(grpc_fake: GrpcServer) -> None:
    obj = stored(spans_request(1, 4), encoding="zstd")
    result = await send(grpc_dest(grpc_fake, "compression: none"), obj, encoding="zstd")
    assert (result.outcome, result.records) == (Outcome.DELIVERED, 4)
    assert grpc_fake.fake.ids() == obj.ids


async def test_grpc_tenant_header_override_and_none(grpc_fake: GrpcServer) -> None:
    await send(grpc_dest(grpc_fake, "headers: {X-Scope-OrgID: fixed}"), stored(spans_request(1, 1)))
    assert grpc_fake.fake.metadata[-1]["x-scope-orgid"] == "fixed"
    await send(grpc_dest(grpc_fake, 'tenant_header: ""'), stored(spans_request(1, 1)))
    assert "x-scope-orgid" not in grpc_fake.fake.metadata[-1]


async def test_grpc_indexed_object_packed_by_entry(grpc_fake: GrpcServer) -> None:
    requests = [spans_request(1, 5, pad=40) for _ in range(6)]
    obj = indexed(*requests)
    limit = 2 * len(requests[0].SerializeToString()) + 10
    result = await send(grpc_dest(grpc_fake, f"max_request_bytes: {limit}"), obj)
    assert (result.outcome, result.records, result.requests) == (Outcome.DELIVERED, 30, 3)
    assert grpc_fake.fake.ids() == obj.ids


async def test_grpc_split(grpc_fake: GrpcServer) -> None:
    obj = stored(spans_request(5, 10, pad=40))
    limit = len(obj.raw) // 5
    result = await send(grpc_dest(grpc_fake, f"max_request_bytes: {limit}"), obj)
    assert result.outcome is Outcome.DELIVERED
    assert result.requests == len(grpc_fake.fake.requests) >= 5
    assert sorted(grpc_fake.fake.ids()) == sorted(obj.ids)
    assert all(r.ByteSize() <= limit for r in grpc_fake.fake.requests)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (grpc.StatusCode.UNAVAILABLE, Outcome.RETRY),
        (grpc.StatusCode.ABORTED, Outcome.RETRY),
        (grpc.StatusCode.CANCELLED, Outcome.RETRY),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Outcome.RETRY),
        (grpc.StatusCode.OUT_OF_RANGE, Outcome.RETRY),
        (grpc.StatusCode.DATA_LOSS, Outcome.RETRY),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Outcome.RETRY),
        (grpc.StatusCode.INVALID_ARGUMENT, Outcome.PERMANENT),
        (grpc.StatusCode.UNAUTHENTICATED, Outcome.PERMANENT),
        (grpc.StatusCode.PERMISSION_DENIED, Outcome.PERMANENT),
        (grpc.StatusCode.NOT_FOUND, Outcome.PERMANENT),
        (grpc.StatusCode.UNIMPLEMENTED, Outcome.PERMANENT),
        (grpc.StatusCode.INTERNAL, Outcome.PERMANENT),
        (grpc.StatusCode.FAILED_PRECONDITION, Outcome.PERMANENT),
    ],
)
async def test_grpc_status_classes(
    grpc_fake: GrpcServer, code: grpc.StatusCode, outcome: Outcome
) -> None:
    grpc_fake.fake.answers = [GrpcAnswer(code=code, message=f"said {code.name}")]
    result = await send(grpc_dest(grpc_fake), stored(spans_request(1, 2)))
    assert result.outcome is outcome
    assert result.status == f"grpc_{code.name}"
    assert result.message.startswith(f"said {code.name}")
    assert (result.records, result.requests, result.retry_after_s) == (0, 1, None)


async def test_grpc_retry_info(grpc_fake: GrpcServer) -> None:
    grpc_fake.fake.answers = [
        GrpcAnswer(code=grpc.StatusCode.RESOURCE_EXHAUSTED, message="slow down", retry_delay_s=2.5)
    ]
    result = await send(grpc_dest(grpc_fake), stored(spans_request(1, 2)))
    assert (result.outcome, result.status, result.retry_after_s) == (
        Outcome.RETRY,
        "grpc_RESOURCE_EXHAUSTED",
        2.5,
    )
    assert result.message == "slow down"


async def test_grpc_resource_exhausted_without_retry_info_says_so(grpc_fake: GrpcServer) -> None:
    grpc_fake.fake.answers = [GrpcAnswer(code=grpc.StatusCode.RESOURCE_EXHAUSTED, message="full")]
    result = await send(grpc_dest(grpc_fake), stored(spans_request(1, 2)))
    assert result.outcome is Outcome.RETRY
    assert "without RetryInfo" in result.message


async def test_grpc_partial_success(grpc_fake: GrpcServer) -> None:
    grpc_fake.fake.answers = [GrpcAnswer(rejected=2)]
    result = await send(grpc_dest(grpc_fake), stored(spans_request(1, 5)))
    assert (result.outcome, result.records, result.rejected_records) == (Outcome.DELIVERED, 5, 2)
    assert result.message == "some rejected"


async def test_grpc_unreachable_is_unavailable() -> None:
    d = destination(f"name: g\nprotocol: grpc\nendpoint: 127.0.0.1:{free_port()}\ntimeout_s: 2")
    result = await send(d, stored(spans_request(1, 1)))
    assert (result.outcome, result.status) == (Outcome.RETRY, "grpc_UNAVAILABLE")


async def test_grpc_timeout_is_deadline_exceeded(grpc_fake: GrpcServer) -> None:
    grpc_fake.fake.answers = [GrpcAnswer(delay_s=2.0)]
    result = await send(grpc_dest(grpc_fake, "timeout_s: 0.2"), stored(spans_request(1, 1)))
    assert (result.outcome, result.status) == (Outcome.RETRY, "grpc_DEADLINE_EXCEEDED")


async def test_grpc_tls_with_ca_file(pki: Pki) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
    )
    served = await _grpc_server(credentials)
    try:
        d = destination(
            f"name: g\nprotocol: grpc\nendpoint: localhost:{served.port}\n"
            f"tls: {{ca_file: {pki.ca}}}"
        )
        result = await send(d, stored(spans_request(1, 3)))
        assert (result.outcome, result.records) == (Outcome.DELIVERED, 3)
        plain = destination(
            f"name: g\nprotocol: grpc\nendpoint: http://localhost:{served.port}\ntimeout_s: 2"
        )
        result = await send(plain, stored(spans_request(1, 3)))
        assert result.outcome is Outcome.RETRY
    finally:
        await served.server.stop(None)


async def test_grpc_mutual_tls(pki: Pki) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    served = await _grpc_server(credentials)
    try:
        d = destination(
            f"name: g\nprotocol: grpc\nendpoint: https://localhost:{served.port}\n"
            f"tls: {{ca_file: {pki.ca}, cert_file: {pki.client_cert},"
            f" key_file: {pki.client_key}}}"
        )
        result = await send(d, stored(spans_request(1, 3)))
        assert (result.outcome, result.records) == (Outcome.DELIVERED, 3)
        # Without the client certificate the handshake fails: retried, nothing arrives.
        anonymous = destination(
            f"name: g\nprotocol: grpc\nendpoint: localhost:{served.port}\n"
            f"tls: {{ca_file: {pki.ca}}}\ntimeout_s: 2"
        )
        result = await send(anonymous, stored(spans_request(1, 3)))
        assert result.outcome is Outcome.RETRY
        assert len(served.fake.requests) == 1
    finally:
        await served.server.stop(None)


def test_make_client_is_a_destination_client(tmp_path: Path) -> None:
    http = destination("name: a\nendpoint: http://x")
    grpc_d = destination("name: b\nprotocol: grpc\nendpoint: x:4317")
    assert isinstance(make_client(http), DestinationClient)
    assert isinstance(make_client(grpc_d), DestinationClient)
    assert make_client(grpc_d).destination is grpc_d
