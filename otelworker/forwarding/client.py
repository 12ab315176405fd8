"""Send one archived object to one destination: one attempt per request, classified.

:class:`DestinationClient` takes an object's stored bytes (a serialized
Export*ServiceRequest, several joined as one, compressed as stored: gzip, zstd or not at
all) and sends them over OTLP/HTTP (aiohttp, one session per destination, at most
``concurrency`` connections) or OTLP/gRPC (``grpc.aio``, one channel per destination).
It never retries: the forwarder owns retries, backoff and leases; :class:`SendResult`
says what the destination answered and whether to retry.

The fast path: over HTTP with gzip, an object stored gzip'd and no larger than
``max_request_bytes`` is POSTed as it is stored, ``Content-Encoding: gzip``: nothing is
decompressed, decoded or compressed. The flush writes a gzip object as ONE member with an
index of its staged requests (otelworker/gzjoin.py), which every receiver reads; an
object larger than ``max_request_bytes`` is cut along that index into runs of whole
requests, each written out as a gzip member of its own, again without inflating or
deflating (a staged request larger than the limit alone is inflated and cut along its
resources by the replay's splitter, :func:`otelworker.archive.split.pieces`). An object
written before the index (concatenated members, one per staged request) goes as stored
when the destination says ``gzip_members: many`` (it reads every member, as RFC 1952
allows and Go's reader does); else (the default, ``one``: some receivers, rotel among
them, read only the first member and drop the rest, answering 200) its members are
inflated and compressed again as one (ISA-L, in a thread), not decoded. gRPC compresses
each message itself, so an object is decompressed (not decoded) and handed to grpc as
bytes. The parts of an object are sent in order, and the first part not delivered ends
the attempt (the forwarder sends the whole object again: the parts before it are
delivered twice, as at-least-once allows).

Classification, as the OTLP spec and the Collector's exporters: HTTP 2xx is delivered
(its ``partial_success`` rejected records counted, not retried); 429, 502, 503, 504 and
every other 5xx, a connection error or a timeout is retried (after ``Retry-After`` when
given); any other answer (400, 401, 403, 404, 405, 413, other 4xx, a 3xx: redirects are
not followed) is permanent. gRPC: UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, CANCELLED,
DEADLINE_EXCEEDED, OUT_OF_RANGE and DATA_LOSS are retried (``RetryInfo`` from
``grpc-status-details-bin`` gives the delay); any other code is permanent.

No header value reaches a message or a log line: messages come from the destination's
answer (bounded) or name an error's kind.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from isal import igzip, isal_zlib

from otelworker import gzjoin, otlp
from otelworker.archive.split import pieces
from otelworker.compression import compress, decompress_object
from otelworker.exceptions import BadPayload
from otelworker.forwarding.destinations import Destination, ssl_context
from otelworker.otlp_answers import RETRYABLE, detail, parse_retry_after, rejected_records
from otelworker.settings import Compression

if TYPE_CHECKING:
    import grpc

MAX_MESSAGE = 512  # characters of a destination's message kept in a SendResult
_MAX_ANSWER = 64 * 1024  # bytes of an answer's body read
USER_AGENT = "otelworker-forwarder"


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What became of one attempt to send one object."""

    outcome: Outcome
    # "http_200", "http_503", "grpc_UNAVAILABLE", "grpc_OK", "connect_error", "tls_error",
    # "timeout", "disconnected", "transport_error", "corrupt_object", "empty" (no records)
    status: str
    message: str  # the destination's Status message or a short body detail (<= 512 chars)
    retry_after_s: float | None  # Retry-After, or gRPC RetryInfo's retry_delay
    records: int  # records in the parts the destination accepted (rejected ones included)
    rejected_records: int  # partial_success: records the destination rejected for good
    requests: int  # requests made

    @property
    def delivered_records(self) -> int:
        """Records the destination accepted and kept: ``records - rejected_records``."""
        return max(0, self.records - self.rejected_records)


@dataclass(frozen=True, slots=True)
class _Answer:
    """One request's answer, classified."""

    outcome: Outcome
    status: str
    message: str = ""
    retry_after_s: float | None = None
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class _Part:
    """One request's body: ``gzipped`` when it is gzip (HTTP sends it so encoded)."""

    data: bytes
    records: int | None  # None: not counted (the object's count is known whole)
    gzipped: bool


def _bounded(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


# --- preparing an object --------------------------------------------------------------


def _inflate(body: bytes, encoding: str | None) -> bytes:
    """The object's protobuf: every gzip member (ISA-L) or zstd frame, joined."""
    if encoding is None or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            return bytes(igzip.decompress(body))  # type: ignore[no-untyped-call]
        return decompress_object(body, encoding)
    except Exception as exc:  # OSError, EOFError, ValueError, ZstdError, ...
        raise BadPayload(f"corrupt {encoding} object: {exc}") from None


def _prepare(
    signal: str,
    body: bytes,
    encoding: str | None,
    records: int | None,
    max_bytes: int,
    gzip_parts: bool,
) -> list[_Part]:
    """CPU work, run in a thread: the object as requests of at most ``max_bytes``
    (uncompressed), gzip'd when ``gzip_parts``.

    An indexed gzip object (otelworker/gzjoin.py) going out as gzip is cut into runs of
    its entries (:func:`_runs`). Otherwise the object's staged requests (an index's
    entries inflated, or an older object's members: each a whole serialized request;
    concatenated, they are the one request of all their resources) are packed into parts
    as they are, without decoding; only one larger than ``max_bytes`` is decoded and split
    along its resources. A part's record count is taken only when the object's is not
    given (``records``) and the index does not give it; else it is counted when a part
    fails after others went through (:func:`_records_of`)."""
    entries = gzjoin.index(body) if encoding == "gzip" else None
    if entries is not None and gzip_parts:
        return list(_runs(signal, body, entries, max_bytes))
    raws: list[tuple[bytes, int | None]]
    if entries is not None:
        try:
            raws = [(gzjoin.inflate(body, entry), entry.records) for entry in entries]
        except Exception as exc:  # isal_zlib.error, ValueError
            raise BadPayload(f"corrupt gzip object: {exc}") from None
    elif encoding == "gzip":
        raws = [(raw, None) for raw in _gzip_members(body)]
    else:
        raws = [(_inflate(body, encoding), None)]
    parts: list[tuple[bytes, int | None]] = list(_packed(signal, raws, max_bytes))
    del raws
    if len(parts) == 1 and records is not None:
        parts = [(parts[0][0], records)]
    elif records is None:
        parts = [
            (data, n if n is not None else otlp.count_records(signal, otlp.decode(signal, data)))
            for data, n in parts
        ]
    if gzip_parts:
        return [_Part(compress(data, Compression.GZIP), n, True) for data, n in parts]
    return [_Part(data, n, False) for data, n in parts]


def _gzip_members(body: bytes) -> Iterator[bytes]:
    """Each gzip member's decompressed bytes, in order (ISA-L)."""
    rest = body
    try:
        while rest:
            inflater = isal_zlib.decompressobj(wbits=31)
            data = inflater.decompress(rest)
            if not inflater.eof:
                raise BadPayload("corrupt gzip object: a member is truncated")
            yield data
            rest = inflater.unused_data
    except BadPayload:
        raise
    except Exception as exc:  # isal_zlib.error
        raise BadPayload(f"corrupt gzip object: {exc}") from None


def _packed(
    signal: str, raws: Sequence[tuple[bytes, int | None]], max_bytes: int
) -> Iterator[tuple[bytes, int | None]]:
    """Consecutive serialized requests (with their records, when known) joined into
    bodies of at most ``max_bytes`` (records counted when every one's is known); one
    larger than that alone is split along its resources (its pieces counted)."""
    batch: list[bytes] = []
    size = 0
    records: int | None = 0
    for raw, n in raws:
        if len(raw) > max_bytes:
            if batch:
                yield b"".join(batch), records
                batch, size, records = [], 0, 0
            yield from _split(signal, raw, max_bytes)
            continue
        if batch and size + len(raw) > max_bytes:
            yield b"".join(batch), records
            batch, size, records = [], 0, 0
        batch.append(raw)
        size += len(raw)
        records = None if records is None or n is None else records + n
    if batch:
        yield b"".join(batch), records


def _split(signal: str, raw: bytes, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """One serialized request larger than ``max_bytes`` cut along its resources."""
    for piece in pieces(signal, otlp.decode(signal, raw), max_bytes=max_bytes):
        yield piece.body, piece.records


def _runs(
    signal: str, body: bytes, entries: Sequence[gzjoin.Entry], max_bytes: int
) -> Iterator[_Part]:
    """An indexed gzip object (otelworker/gzjoin.py) as gzip requests of at most
    ``max_bytes`` uncompressed: runs of consecutive entries, each cut out as a gzip member
    of its own, nothing inflated or deflated; only an entry larger than ``max_bytes`` is
    inflated and split along its resources."""
    run: list[gzjoin.Entry] = []
    size = 0
    for entry in entries:
        if entry.raw > max_bytes:
            if run:
                yield _Part(gzjoin.member(body, run), sum(e.records for e in run), True)
                run, size = [], 0
            try:
                raw = gzjoin.inflate(body, entry)
            except Exception as exc:  # isal_zlib.error, ValueError
                raise BadPayload(f"corrupt gzip object: {exc}") from None
            for data, n in _split(signal, raw, max_bytes):
                yield _Part(compress(data, Compression.GZIP), n, True)
            continue
        if run and size + entry.raw > max_bytes:
            yield _Part(gzjoin.member(body, run), sum(e.records for e in run), True)
            run, size = [], 0
        run.append(entry)
        size += entry.raw
    if run:
        yield _Part(gzjoin.member(body, run), sum(e.records for e in run), True)


def _records_of(signal: str, parts: Sequence[_Part]) -> int:
    """The records in ``parts``, counting (decoding) those not counted yet."""
    total = 0
    for part in parts:
        if part.records is None:
            data = bytes(igzip.decompress(part.data)) if part.gzipped else part.data  # type: ignore[no-untyped-call]
            total += otlp.count_records(signal, otlp.decode(signal, data))
        else:
            total += part.records
    return total


def _maybe_members(body: bytes) -> bool:
    """Whether a gzip body may hold more than one member: a member's header (magic, and
    deflate) past the first byte. Never False for several members (each starts so); True
    for one member by chance (about once per 16 MB of compressed bytes) costs only a
    needless compression. About 1 ns per span (a memchr-speed scan)."""
    return body.find(b"\x1f\x8b\x08", 1) >= 0


def _count(signal: str, body: bytes, encoding: str | None) -> int:
    return otlp.count_records(signal, otlp.decode(signal, _inflate(body, encoding)))


# --- HTTP -----------------------------------------------------------------------------


def _http_outcome(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in RETRYABLE or status >= 500:
        return Outcome.RETRY
    return Outcome.PERMANENT


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < _MAX_ANSWER:
        chunk = await resp.content.read(_MAX_ANSWER - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class _HttpTransport:
    """OTLP/HTTP protobuf: one session, ``concurrency`` connections, no redirects."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._ssl = (
            ssl_context(destination.tls)
            if any(url.startswith("https://") for url in destination.urls.values())
            else None
        )
        given = {name.lower() for name in destination.headers}
        tenant_header = destination.tenant_header
        # An explicit header of the tenant header's name wins over it.
        self._tenant_header = (
            tenant_header if tenant_header and tenant_header.lower() not in given else None
        )
        base = {"Content-Type": "application/x-protobuf", "User-Agent": USER_AGENT}
        base.update(destination.headers)
        self._headers = {False: base, True: {**base, "Content-Encoding": "gzip"}}
        self._timeout = aiohttp.ClientTimeout(total=destination.timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Made in the running loop, on first use.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.destination.concurrency,
                ssl=self._ssl if self._ssl is not None else True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=True
            )
        return self._session

    async def post(self, signal: str, tenant: str, data: bytes, gzipped: bool) -> _Answer:
        session = self._get_session()
        headers = self._headers[gzipped]
        if self._tenant_header is not None and tenant:
            headers = {**headers, self._tenant_header: tenant}
        url = self.destination.urls[signal]
        try:
            async with session.post(url, data=data, headers=headers, allow_redirects=False) as resp:
                answer = await _read_bounded(resp)
                content_type = resp.headers.get("Content-Type", "")
                status = f"http_{resp.status}"
                outcome = _http_outcome(resp.status)
                if outcome is Outcome.DELIVERED:
                    rejected, message = rejected_records(signal, content_type, answer)
                    return _Answer(outcome, status, _bounded(message), None, rejected)
                message = detail(content_type, answer, MAX_MESSAGE) or (resp.reason or "")
                if resp.status == 413:
                    message = _bounded(
                        f"{message} (the destination's limit is below max_request_bytes"
                        f" {self.destination.max_request_bytes}, or one record is larger)"
                    )
                elif 300 <= resp.status < 400:
                    message = _bounded(f"{message} (redirects are not followed)")
                retry_after = (
                    parse_retry_after(resp.headers.get("Retry-After"))
                    if outcome is Outcome.RETRY
                    else None
                )
                return _Answer(outcome, status, _bounded(message), retry_after)
        except TimeoutError:
            return _Answer(
                Outcome.RETRY, "timeout", f"no answer within {self.destination.timeout_s:g} s"
            )
        except aiohttp.ClientSSLError as exc:  # before its base, ClientConnectorError
            return _Answer(Outcome.RETRY, "tls_error", _bounded(str(exc)))
        except aiohttp.ClientConnectorError as exc:
            return _Answer(Outcome.RETRY, "connect_error", _bounded(str(exc)))
        except aiohttp.ServerDisconnectedError:
            return _Answer(Outcome.RETRY, "disconnected", "the destination closed the connection")
        except aiohttp.ClientError as exc:
            return _Answer(
                Outcome.RETRY, "transport_error", _bounded(f"{type(exc).__name__}: {exc}")
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- gRPC -----------------------------------------------------------------------------

# OTLP/gRPC's retryable codes (RESOURCE_EXHAUSTED: the spec retries it only when the
# server says it can recover, by RetryInfo; it is retried without too, and says so).
_GRPC_RETRYABLE = frozenset(
    {
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "CANCELLED",
        "DEADLINE_EXCEEDED",
        "OUT_OF_RANGE",
        "DATA_LOSS",
    }
)
_SERVICES = {"traces": "TraceService", "metrics": "MetricsService", "logs": "LogsService"}


def _method(signal: str) -> str:
    """``/opentelemetry.proto.collector.trace.v1.TraceService/Export``, from the
    generated descriptors. The call passes bytes (no serializer): the object is already
    a serialized request, and decoding it only to serialize it again costs CPU."""
    service = otlp.REQUEST_TYPES[signal].DESCRIPTOR.file.services_by_name[_SERVICES[signal]]
    return f"/{service.full_name}/Export"


def retry_info_s(trailing: Sequence[tuple[str, Any]] | None) -> float | None:
    """``google.rpc.RetryInfo``'s delay from ``grpc-status-details-bin``, if any."""
    for key, value in trailing or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            return None
        for item in status.details:
            if item.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                item.Unpack(info)
                delay = info.retry_delay
                return max(0.0, float(delay.seconds) + float(delay.nanos) / 1e9)
    return None


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return fh.read()


class _GrpcTransport:
    """OTLP/gRPC: one channel; metadata = the headers (lower-cased) and the tenant's."""

    def __init__(self, destination: Destination) -> None:
        import grpc  # here: only a gRPC destination loads it

        self._grpc = grpc
        self.destination = destination
        self.target = next(iter(destination.urls.values()))
        self._credentials: grpc.ChannelCredentials | None = None
        tls = destination.tls
        if tls is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca_file),
                private_key=_read(tls.key_file),
                certificate_chain=_read(tls.cert_file),
            )
        metadata = [(name.lower(), value) for name, value in destination.headers.items()]
        given = {name for name, _ in metadata}
        tenant_header = destination.tenant_header.lower()
        self._tenant_key = tenant_header if tenant_header and tenant_header not in given else None
        self._metadata = tuple(metadata)
        self._compression = (
            grpc.Compression.Gzip
            if destination.compression == "gzip"
            else grpc.Compression.NoCompression
        )
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, Any] = {}

    def _call(self, signal: str) -> Any:
        call = self._calls.get(signal)
        if call is None:
            if self._channel is None:
                options = [("grpc.primary_user_agent", USER_AGENT)]
                self._channel = (
                    self._grpc.aio.secure_channel(self.target, self._credentials, options)
                    if self._credentials is not None
                    else self._grpc.aio.insecure_channel(self.target, options)
                )
            call = self._calls[signal] = self._channel.unary_unary(_method(signal))
        return call

    async def post(self, signal: str, tenant: str, data: bytes, gzipped: bool) -> _Answer:
        assert not gzipped, "gRPC compresses messages itself"
        metadata = self._metadata
        if self._tenant_key is not None and tenant:
            metadata = (*metadata, (self._tenant_key, tenant))
        try:
            answer: bytes = await self._call(signal)(
                data,
                timeout=self.destination.timeout_s,
                metadata=metadata,
                compression=self._compression,
            )
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code()
            name = code.name if code is not None else "UNKNOWN"
            message = exc.details() or ""
            retry_after = retry_info_s(exc.trailing_metadata())  # type: ignore[arg-type]
            if name in _GRPC_RETRYABLE:
                if name == "RESOURCE_EXHAUSTED" and retry_after is None:
                    message += " (RESOURCE_EXHAUSTED without RetryInfo: retried anyway)"
                return _Answer(Outcome.RETRY, f"grpc_{name}", _bounded(message), retry_after)
            return _Answer(Outcome.PERMANENT, f"grpc_{name}", _bounded(message))
        rejected, message = rejected_records(signal, "application/x-protobuf", answer)
        return _Answer(Outcome.DELIVERED, "grpc_OK", _bounded(message), None, rejected)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._calls.clear()


# --- the client -----------------------------------------------------------------------


class DestinationClient:
    """One destination's sender (HTTP or gRPC, per its protocol). ``send`` may be called
    from many tasks at once; ``close`` when the destination goes away."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._http = destination.protocol != "grpc"
        self._transport: _HttpTransport | _GrpcTransport = (
            _HttpTransport(destination) if self._http else _GrpcTransport(destination)
        )

    def _fast(self, body: bytes, encoding: str | None, raw_bytes: int) -> bool | None:
        """Whether the stored bytes go as they are: True as gzip, False as they are
        uncompressed; None when they must be prepared."""
        d = self.destination
        if not self._http or raw_bytes > d.max_request_bytes:
            return None
        if encoding == "gzip" and d.compression == "gzip":
            # One member (indexed, otelworker/gzjoin.py), or members the destination reads.
            if gzjoin.index(body) is not None or d.gzip_members == "many":
                return True
            return None if _maybe_members(body) else True
        if encoding in (None, "identity") and d.compression == "none":
            return False
        return None

    async def send(
        self,
        signal: str,
        tenant: str,
        body: bytes,
        encoding: str | None,
        raw_bytes: int,
        *,
        records: int | None = None,
    ) -> SendResult:
        """One attempt to send an object (``body`` as stored, compressed per
        ``encoding``; ``raw_bytes`` its uncompressed size; ``records`` its record count,
        counted here, at a cost, when not given). Never raises for what the destination
        or the network does: a corrupt object is PERMANENT (status ``corrupt_object``)."""
        d = self.destination
        fast = self._fast(body, encoding, raw_bytes)
        try:
            if fast is not None:
                if records is None:
                    records = await asyncio.to_thread(_count, signal, body, encoding)
                parts = [_Part(body, records, fast)]
            else:
                parts = await asyncio.to_thread(
                    _prepare,
                    signal,
                    body,
                    encoding,
                    records,
                    d.max_request_bytes,
                    self._http and d.compression == "gzip",
                )
        except BadPayload as exc:
            return SendResult(
                Outcome.PERMANENT, "corrupt_object", _bounded(str(exc)), None, 0, 0, 0
            )
        rejected = requests = 0
        status, message = "empty", ""
        for index, part in enumerate(parts):
            answer = await self._transport.post(signal, tenant, part.data, part.gzipped)
            requests += 1
            if answer.outcome is not Outcome.DELIVERED:
                delivered = (
                    await asyncio.to_thread(_records_of, signal, parts[:index]) if index else 0
                )
                return SendResult(
                    answer.outcome,
                    answer.status,
                    answer.message,
                    answer.retry_after_s,
                    delivered,
                    rejected,
                    requests,
                )
            rejected += answer.rejected
            status = answer.status
            message = answer.message or message
        if records is None:
            records = sum(part.records or 0 for part in parts)  # each counted in _prepare
        return SendResult(Outcome.DELIVERED, status, message, None, records, rejected, requests)

    async def close(self) -> None:
        await self._transport.close()


def make_client(destination: Destination) -> DestinationClient:
    """The destination's client: HTTP or gRPC, per its protocol."""
    return DestinationClient(destination)
