"""Hypothesis strategies for hostile OTLP/HTTP requests (see test_hostile_input.py).

Every strategy here ends in a :class:`HostileRequest`: the exact bytes to put on the wire
plus what the test needs to judge the answer (which signal's endpoint, which encoding the
error body must be in). Four families:

* :func:`mutated_protobuf_requests`: valid Export*ServiceRequest bytes, then truncated,
  bit-flipped, spliced, re-typed, with overlong varints and bad length prefixes; or with
  AnyValue arrays / kvlists nested 1..400 deep.
* :func:`hostile_json_requests`: OTLP/JSON with wrong types, bad hex ids, deep nesting
  (1..1500), invalid UTF-8, NaN / Infinity / huge number literals, duplicate keys,
  non-object top levels.
* :func:`corrupt_compressed_requests`: gzip, zstd, deflate / zlib, snappy (block and
  framed) and lz4 streams, stacked up to three deep, then truncated, flipped, with garbage
  around them; bombs; lying snappy lengths; streams under a neighbouring coding's name;
  Content-Encoding values known, unknown and oddly written.
* :func:`odd_header_requests`: Content-Type variants, missing headers, duplicate or
  contradictory framing headers, chunked bodies, long and many headers, odd methods,
  targets and versions, bodies over the size limit.

Each request goes out in one write or trickles in over several (the head first), so that
refusals made before the body has arrived are exercised too. :func:`well_formed_requests`
is the control: valid requests with 0..3 supported codings, which must be accepted.

Not generated, on purpose: framing that would desynchronise a correct server (a
Content-Length that does not match the bytes sent: the test would stall itself; the one
exception is a Content-Length past the body limit, which must be refused at once), an
``Upgrade: h2c`` (the connection would legitimately switch protocols) and Transfer-Encodings
other than ``chunked`` (h11 answers those 501, as RFC 9112 section 6.1 prescribes).
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import cramjam
import zstandard
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.support import payloads

SIGNALS = ("traces", "metrics", "logs")
LIMIT = 256 * 1024  # MAX_REQUEST_BODY_BYTES of the service under test
PROTOBUF = b"application/x-protobuf"
JSON = b"application/json"
HEX_KEYS = ("traceId", "spanId", "parentSpanId")

T = TypeVar("T")


class Draw(Protocol):
    """The ``draw`` of an ``@st.composite`` strategy."""

    def __call__(self, strategy: st.SearchStrategy[T], /) -> T: ...


# --- the request -------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How the body is delimited on the wire.

    ``kind``:

    * "length": Content-Length (``zero_pad`` leading zeros on it);
    * "chunked": chunked, ``tiny_chunks`` 1-byte chunks first, then chunks of the sizes in
      ``chunks``, then the rest in one (``chunk_ext``: a chunk extension on each,
      ``trailer``: a trailer field, ``upper_hex``: sizes in upper case);
    * "length-dup": two identical Content-Length headers;
    * "length-conflict": two different ones (the body matches the first);
    * "length+chunked": both headers, a chunked body, the length that of its encoding;
    * "length-text": the length written as ``length_form`` ("n, n", "+n", hex, ...);
    * "declared-over-limit": a Content-Length of ``declared``, past the body limit, and
      only the body sent: the server must refuse at once, not wait for the rest;
    * "none": no framing header, no body.
    """

    kind: str = "length"
    chunks: tuple[int, ...] = ()
    chunk_ext: bool = False
    trailer: bool = False
    upper_hex: bool = False
    zero_pad: int = 0
    declared: int = 0
    tiny_chunks: int = 0  # this many 1-byte chunks first
    length_form: bytes = b"%d"  # how "length-text" writes the Content-Length

    def encode_chunked(self, body: bytes) -> bytes:
        out = bytearray()
        pos = 0
        sizes = [1] * self.tiny_chunks + [*self.chunks, len(body)]
        for size in sizes:
            piece = body[pos : pos + size]
            pos += len(piece)
            if not piece:
                continue
            size_text = f"{len(piece):X}" if self.upper_hex else f"{len(piece):x}"
            out += size_text.encode() + (b";fuzz=1" if self.chunk_ext else b"") + b"\r\n"
            out += piece + b"\r\n"
        out += b"0\r\n"
        if self.trailer:
            out += b"X-Fuzz-Trailer: 1\r\n"
        out += b"\r\n"
        return bytes(out)

    def headers_and_payload(self, body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
        length = str(len(body)).zfill(len(str(len(body))) + self.zero_pad).encode()
        if self.kind == "length":
            return [(b"Content-Length", length)], body
        if self.kind == "length-dup":
            return [(b"Content-Length", length), (b"Content-Length", length)], body
        if self.kind == "length-conflict":
            other = str(len(body) + 1).encode()
            return [(b"Content-Length", length), (b"Content-Length", other)], body
        if self.kind == "chunked":
            return [(b"Transfer-Encoding", b"chunked")], self.encode_chunked(body)
        if self.kind == "length+chunked":
            wire = self.encode_chunked(body)
            return [
                (b"Content-Length", str(len(wire)).encode()),
                (b"Transfer-Encoding", b"chunked"),
            ], wire
        if self.kind == "none":
            return [], b""
        if self.kind == "length-text":
            n = len(body)
            text = self.length_form % ((n,) * self.length_form.count(b"%"))
            return [(b"Content-Length", text)], body
        if self.kind == "declared-over-limit":
            return [(b"Content-Length", str(self.declared).encode())], body
        raise ValueError(self.kind)


@dataclass(frozen=True)
class HostileRequest:
    """One request as it goes on the wire, and what its answer must look like."""

    signal: str  # the payload's signal (the path's, unless ``target`` says otherwise)
    body: bytes  # the entity body (compressed, if it is)
    content_type: bytes | None = PROTOBUF  # None: no Content-Type header
    content_encoding: bytes | None = None  # None: no Content-Encoding header
    framing: Framing = field(default_factory=Framing)
    headers: tuple[tuple[bytes, bytes], ...] = ()  # further headers, sent after the others
    method: str = "POST"
    target: str | None = None  # default /v1/<signal>
    version: str = "HTTP/1.1"
    content_type_name: bytes = b"Content-Type"
    host: bool = True
    writes: int = 1  # 1: all in one write; n > 1: the head, then the body in n - 1 writes

    @property
    def request_target(self) -> str:
        return self.target if self.target is not None else f"/v1/{self.signal}"

    @property
    def endpoint_signal(self) -> str | None:
        """The signal of the OTLP endpoint this goes to, None if it is not one.

        Only origin-form targets ("/v1/traces?..."): hypercorn routes an absolute-form one
        ("http://host/v1/traces") by its whole text, so it reaches no endpoint."""
        if not self.request_target.startswith("/"):
            return None
        path = urlsplit(self.request_target).path
        for signal in SIGNALS:
            if path == f"/v1/{signal}":
                return signal
        return None

    @property
    def answers_json(self) -> bool:
        """Whether an answer must be OTLP/JSON (else protobuf), by the request's media type
        (case-insensitive, parameters and optional whitespace, SP or HTAB, around it)."""
        if self.content_type is None:
            return False
        return self.content_type.split(b";")[0].strip(b" \t").lower() == JSON

    def raw(self) -> bytes:
        framing_headers, payload = self.framing.headers_and_payload(self.body)
        lines = [f"{self.method} {self.request_target} {self.version}".encode("latin-1")]
        if self.host:
            lines.append(b"Host: 127.0.0.1")
        if self.content_type is not None:
            lines.append(self.content_type_name + b": " + self.content_type)
        if self.content_encoding is not None:
            lines.append(b"Content-Encoding: " + self.content_encoding)
        lines += [name + b": " + value for name, value in (*framing_headers, *self.headers)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + payload

    def pieces(self) -> list[bytes]:
        """The request as the client writes it: whole, or the head and then the body in
        ``writes - 1`` pieces (so a server may answer before the body has all arrived)."""
        raw = self.raw()
        if self.writes <= 1:
            return [raw]
        head_end = raw.index(b"\r\n\r\n") + 4
        body = raw[head_end:]
        step = max(1, -(-len(body) // (self.writes - 1)))
        return [raw[:head_end]] + [body[i : i + step] for i in range(0, len(body), step)]


# --- protobuf wire format ----------------------------------------------------------------

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


def varint(value: int, width: int = 0) -> bytes:
    """``value`` as a base-128 varint, padded with continuation bytes to ``width`` bytes."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            break
    while len(out) < width:  # overlong: 0x80 ... 0x00 keeps the value, adds bytes
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, LEN) + varint(len(payload)) + payload


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


@dataclass(frozen=True)
class WireField:
    """Where one field sits in a serialized message (offsets into the whole buffer)."""

    tag_at: int
    tag_end: int
    number: int
    wire_type: int
    value_at: int  # for LEN: the length prefix; else the value
    value_end: int


def wire_fields(
    data: bytes, start: int = 0, end: int | None = None, depth: int = 0
) -> list[WireField]:
    """The fields of ``data[start:end]`` read as a message, and (recursively) of every
    length-delimited field whose payload also reads as one; [] if it does not parse."""
    end = len(data) if end is None else end
    found: list[WireField] = []
    nested: list[WireField] = []
    pos = start
    try:
        while pos < end:
            tag, tag_end = read_varint(data, pos, end)
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                return []
            if wire_type == VARINT:
                _, value_end = read_varint(data, tag_end, end)
            elif wire_type == I64:
                value_end = tag_end + 8
            elif wire_type == I32:
                value_end = tag_end + 4
            elif wire_type == LEN:
                length, payload_at = read_varint(data, tag_end, end)
                value_end = payload_at + length
                if value_end <= end and depth < 40:
                    nested += wire_fields(data, payload_at, value_end, depth + 1)
            else:
                return []
            if value_end > end:
                return []
            found.append(WireField(pos, tag_end, number, wire_type, tag_end, value_end))
            pos = value_end
    except ValueError:
        return []
    return found + nested


# --- base messages -----------------------------------------------------------------------


@st.composite
def base_messages(
    draw: Draw, min_records: int = 0, signal: str | None = None
) -> tuple[str, Message]:
    """(signal, a valid Export*ServiceRequest) with a few records and drawn ids and times."""
    signal = signal or draw(st.sampled_from(SIGNALS))
    records = draw(st.integers(min_records, 4))
    trace_id = draw(st.binary(min_size=16, max_size=16))
    span_id = draw(st.binary(min_size=8, max_size=8))
    time_ns = draw(st.integers(0, 2**64 - 1))
    if signal == "traces":
        message: Any = payloads.traces(records)
        for span in message.resource_spans[0].scope_spans[0].spans:
            span.trace_id, span.span_id = trace_id, span_id
            span.start_time_unix_nano = span.end_time_unix_nano = time_ns
            span.links.add(trace_id=trace_id, span_id=span_id)
    elif signal == "metrics":
        message = payloads.metrics(records)
        for point in message.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points:
            point.time_unix_nano = time_ns
            point.exemplars.add(trace_id=trace_id, span_id=span_id, as_int=1)
    else:
        message = payloads.logs(records)
        for record in message.resource_logs[0].scope_logs[0].log_records:
            record.time_unix_nano = time_ns
            record.trace_id, record.span_id = trace_id, span_id
    return signal, message


def json_tree(message: Message) -> dict[str, Any]:
    """The OTLP/JSON form of a message: proto3 JSON, but ids in hex."""

    def to_hex(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: base64.b64decode(v).hex() if k in HEX_KEYS else to_hex(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [to_hex(v) for v in node]
        return node

    return to_hex(json_format.MessageToDict(message))  # type: ignore[no-any-return]


def json_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and list indexes) to a value inside a JSON tree, the root excluded."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for k, v in items:
        out.append((*path, k))
        out += json_paths(v, (*path, k))
    return out


def replaced(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``tree`` with the value at ``path`` replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {k: replaced(v, rest, value) if k == head else v for k, v in tree.items()}
    return [replaced(v, rest, value) if i == head else v for i, v in enumerate(tree)]


def renamed_key(tree: Any, path: tuple[Any, ...], new_key: str) -> Any:
    """A copy of ``tree`` with the dict key at the end of ``path`` renamed."""
    if len(path) == 1:
        return {new_key if k == path[0] else k: v for k, v in tree.items()}
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {k: renamed_key(v, rest, new_key) if k == head else v for k, v in tree.items()}
    return [renamed_key(v, rest, new_key) if i == head else v for i, v in enumerate(tree)]


def at(tree: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        tree = tree[step]
    return tree


# --- transport: compression and framing ------------------------------------------------------


def gzip_compress(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def zstd_compress(
    data: bytes, level: int = 3, content_size: bool = True, checksum: bool = False
) -> bytes:
    compressor = zstandard.ZstdCompressor(
        level=level, write_content_size=content_size, write_checksum=checksum
    )
    return compressor.compress(data)


def zlib_compress(data: bytes) -> bytes:
    return zlib.compress(data)


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


def snappy_block(data: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(data))


def snappy_framed(data: bytes) -> bytes:
    return bytes(cramjam.snappy.compress(data))


def lz4_frame(data: bytes) -> bytes:
    return bytes(cramjam.lz4.compress(data))


def lz4_block(data: bytes) -> bytes:
    return bytes(cramjam.lz4.compress_block(data))


# The content codings an OTLP/HTTP client (the Collector's confighttp) may send, each with
# the Content-Encoding names that declare it. RFC 9110's "deflate" is the zlib format.
CODECS: dict[str, tuple[Callable[[bytes], bytes], tuple[bytes, ...]]] = {
    "gzip": (gzip_compress, (b"gzip", b"x-gzip")),
    "zstd": (zstd_compress, (b"zstd",)),
    "deflate": (zlib_compress, (b"deflate", b"zlib")),
    "snappy": (snappy_block, (b"snappy",)),
    "snappy-framed": (snappy_framed, (b"x-snappy-framed",)),
    "lz4": (lz4_frame, (b"lz4",)),
}
# Streams a client may send under a name that means something close, but not the same.
MISLABELLED: tuple[tuple[Callable[[bytes], bytes], bytes], ...] = (
    (raw_deflate, b"deflate"),
    (raw_deflate, b"zlib"),
    (snappy_framed, b"snappy"),
    (snappy_block, b"x-snappy-framed"),
    (lz4_block, b"lz4"),
    (gzip_compress, b"deflate"),
    (zlib_compress, b"gzip"),
    (zstd_compress, b"lz4"),
    (lz4_frame, b"zstd"),
)


def coding_spellings(name: bytes) -> st.SearchStrategy[bytes]:
    """A content-coding name as a client may write it (codings are case-insensitive)."""
    return st.sampled_from((name, name, name.upper(), name.title()))


@st.composite
def coded_bodies(
    draw: Draw, plain: bytes, min_codings: int = 0, max_codings: int = 3
) -> tuple[bytes | None, bytes]:
    """(Content-Encoding, body): ``plain`` with 0..n codings applied, the header listing
    them in the order applied (RFC 9110 section 8.4), with ``identity`` members here and
    there; None for no header."""
    applied = draw(
        st.lists(st.sampled_from(sorted(CODECS)), min_size=min_codings, max_size=max_codings)
    )
    body = plain
    names: list[bytes] = []
    for codec in applied:
        compress, spellings = CODECS[codec]
        body = compress(body)
        names.append(draw(coding_spellings(draw(st.sampled_from(spellings)))))
        if draw(st.integers(0, 4)) == 4:
            names.append(b"identity")
    if not names:
        return draw(st.sampled_from((None, b"identity"))), body
    return draw(st.sampled_from((b", ", b",", b" , "))).join(names), body


def chunked_framings() -> st.SearchStrategy[Framing]:
    return st.builds(
        Framing,
        kind=st.just("chunked"),
        chunks=st.lists(st.integers(0, 4096), max_size=6).map(tuple),
        tiny_chunks=st.one_of(st.just(0), st.integers(1, 3000)),
        chunk_ext=st.booleans(),
        trailer=st.booleans(),
        upper_hex=st.booleans(),
    )


def write_counts() -> st.SearchStrategy[int]:
    """In how many writes the request goes out (1: at once; more: the body trickles in)."""
    return st.one_of(st.just(1), st.integers(2, 8))


def plain_framings() -> st.SearchStrategy[Framing]:
    """Content-Length (most of the time) or a chunked body: how real clients send."""
    return st.one_of(st.just(Framing()), chunked_framings())


@st.composite
def valid_encodings(draw: Draw, body: bytes) -> tuple[bytes | None, bytes]:
    """(Content-Encoding header, body) with the body correctly compressed, or not at all."""
    return draw(coded_bodies(body, max_codings=1))


# --- family 1: mutated protobuf ------------------------------------------------------------


def truncate(draw: Draw, data: bytes) -> bytes:
    return data[: draw(st.integers(0, max(len(data) - 1, 0)))]


def flip_bit(draw: Draw, data: bytes) -> bytes:
    if not data:
        return b"\x80"
    pos = draw(st.integers(0, len(data) - 1))
    bit = draw(st.integers(0, 7))
    return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]


def insert_bytes(draw: Draw, data: bytes) -> bytes:
    pos = draw(st.integers(0, len(data)))
    return data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]


def delete_bytes(draw: Draw, data: bytes) -> bytes:
    if not data:
        return data
    pos = draw(st.integers(0, len(data) - 1))
    return data[:pos] + data[pos + draw(st.integers(1, 16)) :]


def append_garbage(draw: Draw, data: bytes) -> bytes:
    return data + draw(st.binary(min_size=1, max_size=32))


def pick_field(draw: Draw, data: bytes, wire_type: int | None = None) -> WireField | None:
    fields = [f for f in wire_fields(data) if wire_type is None or f.wire_type == wire_type]
    return draw(st.sampled_from(fields)) if fields else None


def wrong_wire_type(draw: Draw, data: bytes) -> bytes:
    """A field's tag rewritten with another wire type (groups and the invalid 6, 7 too)."""
    found = pick_field(draw, data)
    if found is None:
        return flip_bit(draw, data)
    wire_type = draw(st.sampled_from([t for t in range(8) if t != found.wire_type]))
    return data[: found.tag_at] + key(found.number, wire_type) + data[found.tag_end :]


def bad_field_number(draw: Draw, data: bytes) -> bytes:
    """A tag with field number 0 or one past the largest allowed (2**29 - 1)."""
    found = pick_field(draw, data)
    if found is None:
        return flip_bit(draw, data)
    number = draw(st.sampled_from((0, 2**29, 2**32, 2**61)))
    return data[: found.tag_at] + key(number, found.wire_type) + data[found.tag_end :]


def overlong_varint(draw: Draw, data: bytes) -> bytes:
    """A tag, length or varint value re-encoded on 2..12 bytes (more than 10 is invalid)."""
    found = pick_field(draw, data)
    if found is None:
        return flip_bit(draw, data)
    width = draw(st.integers(2, 12))
    targets = ["tag"] + (["value"] if found.wire_type in (VARINT, LEN) else [])
    if draw(st.sampled_from(targets)) == "tag":
        tag, _ = read_varint(data, found.tag_at, len(data))
        return data[: found.tag_at] + varint(tag, width) + data[found.tag_end :]
    value, value_end = read_varint(data, found.value_at, len(data))
    return data[: found.value_at] + varint(value, width) + data[value_end:]


def bad_length_prefix(draw: Draw, data: bytes) -> bytes:
    """A length prefix that runs past the end of the buffer (a little, or absurdly)."""
    found = pick_field(draw, data, LEN)
    if found is None:
        return append_garbage(draw, data)
    _, payload_at = read_varint(data, found.value_at, len(data))
    remaining = len(data) - payload_at
    length = draw(
        st.one_of(
            st.integers(remaining + 1, remaining + 1000),
            st.sampled_from((2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1)),
        )
    )
    return data[: found.value_at] + varint(length) + data[payload_at:]


MUTATORS = (
    truncate,
    flip_bit,
    insert_bytes,
    delete_bytes,
    append_garbage,
    wrong_wire_type,
    bad_field_number,
    overlong_varint,
    bad_length_prefix,
)


@st.composite
def mutated_bytes(draw: Draw, data: bytes, max_mutations: int = 3) -> bytes:
    for _ in range(draw(st.integers(1, max_mutations))):
        mutator = draw(st.sampled_from(MUTATORS))
        data = mutator(draw, data)
    return data


def nested_any_value(depth: int, shape: str) -> bytes:
    """An AnyValue holding arrays and/or kvlists ``depth`` deep around a string."""
    value = length_delimited(1, b"leaf")  # AnyValue.string_value
    for level in range(depth):
        kind = shape if shape != "alternate" else ("array", "kvlist")[level % 2]
        if kind == "array":  # AnyValue.array_value -> ArrayValue.values
            value = length_delimited(5, length_delimited(1, value))
        else:  # AnyValue.kvlist_value -> KeyValueList.values -> KeyValue{key, value}
            pair = length_delimited(1, b"k") + length_delimited(2, value)
            value = length_delimited(6, length_delimited(1, pair))
    return value


RESOURCE_FIELD = {
    "traces": "resource_spans",
    "metrics": "resource_metrics",
    "logs": "resource_logs",
}
SCOPE_FIELD = {"traces": "scope_spans", "metrics": "scope_metrics", "logs": "scope_logs"}


@st.composite
def deeply_nested_protobuf(draw: Draw, signal: str) -> bytes:
    """A request of ``signal`` with one record and a resource attribute nested 1..400 deep."""
    depth = draw(st.integers(1, 400))
    shape = draw(st.sampled_from(("array", "kvlist", "alternate")))
    attribute = length_delimited(1, b"deep") + length_delimited(2, nested_any_value(depth, shape))
    resource = length_delimited(1, attribute)  # Resource.attributes
    _, one = draw(base_messages(min_records=1, signal=signal))
    scope = getattr(getattr(one, RESOURCE_FIELD[signal])[0], SCOPE_FIELD[signal])[0]
    # Export*ServiceRequest.resource_x (1) -> {resource (1), scope_x (2)}
    resource_x = length_delimited(1, resource) + length_delimited(2, scope.SerializeToString())
    return length_delimited(1, resource_x)


@st.composite
def mutated_protobuf_requests(draw: Draw) -> HostileRequest:
    signal, message = draw(base_messages())
    if draw(st.booleans()):
        body = draw(mutated_bytes(message.SerializeToString()))
    else:
        body = draw(deeply_nested_protobuf(signal))
        if draw(st.booleans()):
            body = draw(mutated_bytes(body, max_mutations=1))
    path_signal = draw(st.sampled_from((signal, signal, signal, *SIGNALS)))
    encoding, wire_body = draw(valid_encodings(body))
    return HostileRequest(
        signal=path_signal,
        body=wire_body,
        content_type=PROTOBUF,
        content_encoding=encoding,
        framing=draw(plain_framings()),
        writes=draw(write_counts()),
    )


# --- family 2: hostile JSON ------------------------------------------------------------------

SENTINEL = "@@FUZZ@@"


def dumps(tree: Any) -> bytes:
    return json.dumps(tree, allow_nan=True, separators=(",", ":")).encode()


def hostile_json_values() -> st.SearchStrategy[Any]:
    """Values of every JSON type, including ones no OTLP field takes."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**80), 2**80),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(("1e3", "-1", "0x10", "18446744073709551616", "1.5", "", " 1", "NaN")),
        st.lists(st.integers(-5, 5), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3),
        st.sampled_from(({}, [], [[]], [{}], {"": None})),
    )


@st.composite
def wrong_typed_json(draw: Draw, tree: dict[str, Any]) -> bytes:
    """Some value in a valid request replaced by one of another (or the wrong) type."""
    paths = json_paths(tree)
    for _ in range(draw(st.integers(1, 3))):
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        tree = replaced(tree, path, draw(hostile_json_values()))
        paths = json_paths(tree)
    return dumps(tree)


def bad_hex_ids() -> st.SearchStrategy[Any]:
    hex_digits = "0123456789abcdef"
    return st.one_of(
        st.text(hex_digits, min_size=1, max_size=33).filter(lambda s: len(s) % 2 == 1),
        st.text(min_size=1, max_size=32).filter(lambda s: any(c not in hex_digits for c in s)),
        st.binary(max_size=40).filter(lambda b: len(b) not in (8, 16)).map(bytes.hex),
        st.binary(min_size=16, max_size=16).map(lambda b: base64.b64encode(b).decode()),
        st.binary(min_size=8, max_size=16).map(lambda b: "0x" + b.hex()),
        st.binary(min_size=8, max_size=16).map(lambda b: b.hex().upper()),
        st.binary(min_size=8, max_size=16).map(lambda b: " ".join(f"{x:02x}" for x in b)),
        st.sampled_from(("", "٠١٢٣٤٥٦٧٨٩٠١٢٣٤٥", "\u0000" * 16, "zz" * 8, "0" * 10_000)),
        st.integers(-(2**70), 2**70),
        st.lists(st.integers(0, 255), max_size=16),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        st.none(),
        st.booleans(),
    )


@st.composite
def bad_hex_id_json(draw: Draw) -> tuple[str, bytes]:
    signal, message = draw(base_messages(min_records=1))
    tree = json_tree(message)
    id_paths = [p for p in json_paths(tree) if p[-1] in HEX_KEYS]
    for path in draw(st.lists(st.sampled_from(id_paths), min_size=1, max_size=3)):
        tree = replaced(tree, path, draw(bad_hex_ids()))
    return signal, dumps(tree)


def nested_json_text(depth: int, shape: str) -> bytes:
    """``depth`` levels of arrays, objects or both, around a 0."""
    if shape == "array":
        return b"[" * depth + b"0" + b"]" * depth
    if shape == "object":
        return b'{"a":' * depth + b"0" + b"}" * depth
    opening = b"".join(b"[" if i % 2 else b'{"a":' for i in range(depth))
    closing = b"".join(b"]" if i % 2 else b"}" for i in reversed(range(depth)))
    return opening + b"0" + closing


def nested_attribute_text(depth: int, shape: str) -> bytes:
    """An OTLP/JSON AnyValue of arrayValue / kvlistValue nested ``depth`` deep."""
    value = b'{"stringValue":"leaf"}'
    for level in range(depth):
        kind = shape if shape != "alternate" else ("array", "kvlist")[level % 2]
        if kind == "array":
            value = b'{"arrayValue":{"values":[' + value + b"]}}"
        else:
            value = b'{"kvlistValue":{"values":[{"key":"k","value":' + value + b"}]}}"
    return value


@st.composite
def deeply_nested_json(draw: Draw, signal: str) -> bytes:
    depth = draw(st.integers(1, 1500))
    shape = draw(st.sampled_from(("array", "object", "mixed")))
    where = draw(st.sampled_from(("unknown field", "known field", "top level", "attribute")))
    container = {"traces": "resourceSpans", "metrics": "resourceMetrics", "logs": "resourceLogs"}
    if where == "unknown field":
        return b'{"x":' + nested_json_text(depth, shape) + b"}"
    if where == "known field":
        return b'{"' + container[signal].encode() + b'":' + nested_json_text(depth, shape) + b"}"
    if where == "top level":
        return nested_json_text(depth, shape)
    value = nested_attribute_text(depth, draw(st.sampled_from(("array", "kvlist", "alternate"))))
    tree = json_tree(draw(base_messages(signal=signal))[1])
    tree[container[signal]][0]["resource"]["attributes"].append({"key": "deep", "value": SENTINEL})
    return dumps(tree).replace(json.dumps(SENTINEL).encode(), value)


BAD_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xc3",
    b"\xc3\x28",
    b"\xe2\x82",
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xc0\xaf",  # overlong
    b"\xf8\x88\x80\x80\x80",
    b"\\ud800",  # escaped lone surrogates
    b"\\udfff\\ud800",
    b"\\u0000",
)


@st.composite
def invalid_utf8_json(draw: Draw, tree: dict[str, Any]) -> bytes:
    """A string value (or a key) of a valid request with invalid UTF-8 in it."""
    path = draw(st.sampled_from(json_paths(tree)))
    if isinstance(path[-1], str) and draw(st.booleans()):
        tree = renamed_key(tree, path, SENTINEL)
    else:
        tree = replaced(tree, path, SENTINEL)
    bad = draw(st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=6)))
    return dumps(tree).replace(SENTINEL.encode(), bad)


JSON_LITERALS = (
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"1E309",
    b"123456789012345678901234567890",
    b"-123456789012345678901234567890",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"1" + b"0" * 5000,
    b"-0",
    b"0.0",
    b"1.",
    b".5",
    b"+1",
    b"01",
    b"0x10",
    b"1e",
    b"true",
    b"nul",
    b'"\\u0000"',
)


@st.composite
def raw_literal_json(draw: Draw, tree: dict[str, Any]) -> bytes:
    """A value of a valid request replaced by a raw literal: NaN, Infinity, huge numbers."""
    path = draw(st.sampled_from(json_paths(tree)))
    literal = draw(st.sampled_from(JSON_LITERALS))
    return dumps(replaced(tree, path, SENTINEL)).replace(json.dumps(SENTINEL).encode(), literal)


@st.composite
def duplicate_key_json(draw: Draw, tree: dict[str, Any]) -> bytes:
    """An object of a valid request with one of its keys twice (the copy first or last)."""
    objects = [p for p in [(), *json_paths(tree)] if isinstance(at(tree, p), dict) and at(tree, p)]
    path = draw(st.sampled_from(objects))
    target = at(tree, path)
    name = draw(st.sampled_from(sorted(target)))
    copy = draw(hostile_json_values())
    first = draw(st.booleans())
    new = {SENTINEL: copy, **target} if first else {**target, SENTINEL: copy}
    return dumps(replaced(tree, path, new)).replace(
        json.dumps(SENTINEL).encode(), json.dumps(name).encode()
    )


NON_OBJECTS = (
    b"",
    b" ",
    b"[]",
    b"[{}]",
    b"null",
    b"0",
    b"-1.5e3",
    b'"resourceSpans"',
    b"true",
    b"{}{}",
    b"{} []",
    b"{",
    b"}",
    b'{"resourceSpans":',
    b"\xef\xbb\xbf{}",  # a byte-order mark
    b"\x00",
    b"{}\x00",
)


@st.composite
def hostile_json_requests(draw: Draw) -> HostileRequest:
    signal, message = draw(base_messages())
    tree = json_tree(message)
    kind = draw(
        st.sampled_from(
            (
                "wrong type",
                "bad hex id",
                "deep",
                "invalid utf-8",
                "literal",
                "duplicate key",
                "non-object",
                "bytes",
            )
        )
    )
    if kind == "wrong type":
        body = draw(wrong_typed_json(tree))
    elif kind == "bad hex id":
        signal, body = draw(bad_hex_id_json())
    elif kind == "deep":
        body = draw(deeply_nested_json(signal))
    elif kind == "invalid utf-8":
        body = draw(invalid_utf8_json(tree))
    elif kind == "literal":
        body = draw(raw_literal_json(tree))
    elif kind == "duplicate key":
        body = draw(duplicate_key_json(tree))
    elif kind == "non-object":
        body = draw(st.sampled_from(NON_OBJECTS))
    else:
        body = draw(mutated_bytes(dumps(tree), max_mutations=2))
    encoding, wire_body = draw(valid_encodings(body))
    return HostileRequest(
        signal=signal,
        body=wire_body,
        content_type=JSON,
        content_encoding=encoding,
        framing=draw(plain_framings()),
        writes=draw(write_counts()),
    )


# --- family 3: corrupt compressed bodies -------------------------------------------------------


@st.composite
def multi_part_streams(draw: Draw, plain: bytes) -> tuple[bytes, bytes]:
    """(Content-Encoding, body) in a codec that allows several members / frames back to
    back, cut in two at a drawn place, or with options the plain encoders do not use."""
    cut = draw(st.integers(0, len(plain)))
    parts = [plain[:cut], plain[cut:]]
    codec = draw(st.sampled_from(("gzip", "zstd", "snappy-framed")))
    if codec == "gzip":
        level = draw(st.integers(0, 9))
        return b"gzip", b"".join(gzip_compress(p, level) for p in parts)
    if codec == "snappy-framed":
        return b"x-snappy-framed", b"".join(snappy_framed(p) for p in parts)
    level = draw(st.integers(1, 19))
    content_size = draw(st.booleans())
    checksum = draw(st.booleans())
    frames = b"".join(zstd_compress(p, level, content_size, checksum) for p in parts)
    if draw(st.booleans()):  # a skippable frame in front
        skip = draw(st.binary(max_size=16))
        magic = (0x184D2A50).to_bytes(4, "little")
        frames = magic + len(skip).to_bytes(4, "little") + skip + frames
    return b"zstd", frames


@functools.cache
def bomb(codec: str, expanded: int) -> bytes:
    return CODECS[codec][0](b"\x00" * expanded)


@st.composite
def compression_bombs(draw: Draw) -> tuple[bytes, bytes]:
    """(Content-Encoding, a small stream that expands past the body limit), maybe cut short."""
    codec = draw(st.sampled_from(sorted(CODECS)))
    stream = bomb(codec, draw(st.sampled_from((LIMIT + 1, 2 * LIMIT, 16 * LIMIT))))
    if len(stream) > LIMIT // 2:  # a weak codec: keep the stream itself under the limit
        stream = bomb(codec, LIMIT + 1)
    if draw(st.booleans()):
        stream = stream[: draw(st.integers(0, len(stream)))]
    return CODECS[codec][1][0], stream


@st.composite
def lying_snappy_blocks(draw: Draw, plain: bytes) -> tuple[bytes, bytes]:
    """A snappy block whose leading length varint does not match its content."""
    block = snappy_block(plain)
    _, data_at = read_varint(block, 0, len(block))
    declared = draw(
        st.sampled_from((0, 1, len(plain) - 1, len(plain) + 1, LIMIT, LIMIT + 1, 2**32 - 1))
    )
    return b"snappy", varint(max(declared, 0)) + block[data_at:]


@st.composite
def mislabelled_streams(draw: Draw, plain: bytes) -> tuple[bytes, bytes]:
    compress, name = draw(st.sampled_from(MISLABELLED))
    return name, compress(plain)


@st.composite
def corrupted(draw: Draw, stream: bytes) -> bytes:
    how = draw(
        st.sampled_from(
            ("intact", "truncate", "flip", "append", "prepend", "insert", "delete", "other codec")
        )
    )
    if how == "truncate":
        return truncate(draw, stream)
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            stream = flip_bit(draw, stream)
        return stream
    if how == "append":
        return stream + draw(st.binary(min_size=1, max_size=64))
    if how == "prepend":
        return draw(st.binary(min_size=1, max_size=16)) + stream
    if how == "insert":
        return insert_bytes(draw, stream)
    if how == "delete":
        return delete_bytes(draw, stream)
    if how == "other codec":  # another codec's stream glued on after this one
        return stream + CODECS[draw(st.sampled_from(sorted(CODECS)))][0](b"x")
    return stream


def content_encoding_variants(header: bytes) -> st.SearchStrategy[bytes]:
    """The right Content-Encoding, or a wrong, unknown, or oddly written one."""
    return st.one_of(
        st.just(header),
        st.sampled_from(
            (
                header.upper(),
                b" " + header + b" ",
                header + b", identity",
                b"identity, " + header,
                header + b", br",
                b"br, " + header,
                header + b";q=1",
                header + b",",
                b"," + header,
                b",".join([header] * 6),
                b"identity, " * 40 + header,
                b"gzip, gzip, gzip, gzip, gzip",
                b"br",
                b"compress",
                b"identity",
                b"",
                b"*",
                b",,,",
                b"gzip; zstd",
                b"gzip zstd",
                b"x-snappy-framed, snappy",
                b"lz4, zstd, deflate",
            )
        ),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), min_size=1, max_size=20).map(
            lambda s: s.encode("latin-1")
        ),
    )


@st.composite
def corrupt_compressed_requests(draw: Draw) -> HostileRequest:
    signal, message = draw(base_messages())
    as_json = draw(st.booleans())
    plain = dumps(json_tree(message)) if as_json else message.SerializeToString()
    kind = draw(st.sampled_from(("coded", "multi-part", "bomb", "lying snappy", "mislabelled")))
    if kind == "coded":
        header, stream = draw(coded_bodies(plain, min_codings=1))
        assert header is not None
    elif kind == "multi-part":
        header, stream = draw(multi_part_streams(plain))
    elif kind == "bomb":
        header, stream = draw(compression_bombs())
    elif kind == "lying snappy":
        header, stream = draw(lying_snappy_blocks(plain))
    else:
        header, stream = draw(mislabelled_streams(plain))
    return HostileRequest(
        signal=signal,
        body=draw(corrupted(stream)),
        content_type=JSON if as_json else PROTOBUF,
        content_encoding=draw(content_encoding_variants(header)),
        framing=draw(plain_framings()),
        writes=draw(write_counts()),
    )


# --- control: well-formed requests ---------------------------------------------------------------


@st.composite
def well_formed_requests(draw: Draw) -> HostileRequest:
    """Valid requests compressed with 0..3 supported codings, as real clients send them
    (without this, the properties above would also pass if everything were refused)."""
    signal, message = draw(base_messages())
    as_json = draw(st.booleans())
    plain = dumps(json_tree(message)) if as_json else message.SerializeToString()
    header, body = draw(coded_bodies(plain))
    media = JSON if as_json else PROTOBUF
    return HostileRequest(
        signal=signal,
        body=body,
        content_type=draw(st.sampled_from((media, media + b"; charset=utf-8", media.upper()))),
        content_encoding=header,
        framing=draw(plain_framings()),
        writes=draw(write_counts()),
    )


# --- family 4: odd headers ---------------------------------------------------------------------


def header_value_bytes(max_size: int) -> st.SearchStrategy[bytes]:
    """Latin-1 header values without CR, LF or NUL (control characters in some: h11
    refuses those, which is fine too)."""
    return st.text(
        st.characters(codec="latin-1", exclude_characters="\r\n\x00", min_codepoint=0x09),
        max_size=max_size,
    ).map(lambda s: s.encode("latin-1").strip(b" \t"))


def content_type_values(as_json: bool) -> st.SearchStrategy[bytes | None]:
    media = JSON if as_json else PROTOBUF
    return st.one_of(
        st.sampled_from(
            (
                media,
                media,
                media.upper(),
                media.title(),
                media + b"; charset=utf-8",
                media + b";charset=UTF-8",
                media + b" ; foo=bar",
                media + b";",
                media + b'; charset="utf-8"; x=y',
                b" " + media,
                media + b", " + (PROTOBUF if as_json else JSON),
                media + b"x",
                b"application/protobuf",
                b"application/octet-stream",
                b"application/grpc",
                b"application/jsonl",
                b"application/x-ndjson",
                b"text/json",
                b"text/plain",
                b"multipart/form-data; boundary=x",
                b"*/*",
                b"application/*",
                b"",
                b";",
                None,
            )
        ),
        st.integers(1, 20_000).map(lambda n: media + b"; pad=" + b"a" * n),
        header_value_bytes(40),
    )


def extra_headers() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    one = st.one_of(
        st.integers(1, 70_000).map(lambda n: [(b"X-Fuzz-Long", b"a" * n)]),
        st.integers(1, 400).map(lambda n: [(f"X-Fuzz-{i}".encode(), b"v") for i in range(n)]),
        header_value_bytes(300).map(lambda v: [(b"X-Request-Id", v)]),
        st.sampled_from(
            (
                [(b"Expect", b"100-continue")],
                [(b"Connection", b"close")],
                [(b"Connection", b"keep-alive")],
                [(b"Connection", b"Close, foo")],
                [(b"Accept", b"application/json")],
                [(b"Accept-Encoding", b"gzip, zstd, br")],
                [(b"Content-Encoding", b"identity")],
                [(b"Content-Encoding", b"")],
                [(b"X-Fuzz-Folded", b"a\r\n b")],  # obs-fold
                [(b"Bad Header", b"x")],
                [(b"Content-Type ", b"text/plain")],
                [(b"X-Fuzz-Empty", b"")],
                [(b"", b"nameless")],
                [(b"X-Fuzz-\xff", b"x")],
            )
        ),
    )
    return st.lists(one, max_size=3).map(lambda groups: [h for g in groups for h in g])


def odd_framings() -> st.SearchStrategy[Framing]:
    return st.one_of(
        st.just(Framing()),
        st.builds(Framing, kind=st.just("length"), zero_pad=st.integers(1, 30)),
        chunked_framings(),
        st.builds(Framing, kind=st.sampled_from(("length-dup", "length-conflict", "none"))),
        chunked_framings().map(lambda f: Framing("length+chunked", f.chunks, f.chunk_ext)),
        st.builds(
            Framing,
            kind=st.just("length-text"),
            length_form=st.sampled_from(
                (b"%d, %d", b"%d,%d", b"+%d", b"-%d", b"0x%x", b"%d.0", b"%d ", b"%d;x", b"%de0")
            ),
        ),
        st.builds(
            Framing,
            kind=st.just("declared-over-limit"),
            declared=st.sampled_from((LIMIT + 1, 4 * LIMIT, 2**31, 2**63, 10**19, 10**20)),
        ),
    )


def targets(signal: str) -> st.SearchStrategy[str]:
    """The signal's endpoint most of the time; else near misses and odd request-targets."""
    endpoint = f"/v1/{signal}"
    odd = (
        f"{endpoint}?a=b",
        f"{endpoint}?" + "q" * 5000,
        f"{endpoint}/",
        f"/{endpoint}",
        f"/v1//{signal}",
        f"/V1/{signal.upper()}",
        f"{endpoint}%00",
        f"{endpoint}/../{signal}",
        "/v1/",
        "/",
        "*",
        endpoint + "/x" * 2000,
        f"http://127.0.0.1{endpoint}",
    )
    return st.sampled_from((endpoint,) * len(odd) + odd)


def methods() -> st.SearchStrategy[str]:
    odd = ("post", "PUT", "PATCH", "DELETE", "GET", "OPTIONS", "HEAD", "TRACE", "FOO")
    return st.sampled_from(("POST",) * 2 * len(odd) + odd)


@st.composite
def oversized(draw: Draw, body: bytes, as_json: bool) -> bytes:
    """``body`` grown past the limit, staying well formed (an unknown field / member)."""
    pad = max(LIMIT - len(body), 0) + draw(st.integers(1, 70_000))
    if as_json:
        return (
            b'{"x":"' + b"a" * pad + b'",' + body[1:]
            if body.startswith(b"{")
            else body + b" " * pad
        )
    return body + length_delimited(1000, b"a" * pad)


@st.composite
def odd_header_requests(draw: Draw) -> HostileRequest:
    signal, message = draw(base_messages())
    as_json = draw(st.booleans())
    body = dumps(json_tree(message)) if as_json else message.SerializeToString()
    if draw(st.integers(0, 9)) == 9:
        body = draw(oversized(body, as_json))
    split_codings: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)) == 9:  # codings in separate Content-Encoding field lines
        header, body = draw(coded_bodies(body, min_codings=2, max_codings=3))
        assert header is not None
        split_codings = [(b"Content-Encoding", n.strip()) for n in header.split(b",")]
    return HostileRequest(
        signal=signal,
        body=body,
        content_type=draw(content_type_values(as_json)),
        content_type_name=draw(
            st.sampled_from((b"Content-Type", b"content-type", b"CONTENT-TYPE"))
        ),
        framing=draw(odd_framings()),
        headers=(*split_codings, *draw(extra_headers())),
        method=draw(methods()),
        target=draw(targets(signal)),
        version=draw(st.sampled_from(("HTTP/1.1",) * 9 + ("HTTP/1.0",))),
        host=draw(st.integers(0, 19)) != 19,
        writes=draw(write_counts()),
    )
