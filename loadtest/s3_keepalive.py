"""A minimal S3-compatible server that keeps its connections alive, for the benchmarks.

moto's server (the benchmarks' default S3) closes the connection after every request, so
each PUT the service makes there pays a new TCP connection (aiohttp's connect, the
handshake): a cost no real S3 endpoint charges per object. This server answers the calls
the service and the benchmark make (create/head/list/delete bucket, PUT/HEAD/GET/DELETE
object, multi-object delete) on HTTP/1.1 keep-alive connections, and nothing more: no
authentication, no versioning, and by default no bodies (it keeps each object's key and
size, so a benchmark's listing and counts hold without holding gigabytes; ``--keep-bodies``
keeps them, for GETs).

    python -m loadtest.s3_keepalive --port 9000
    OTELWORKER_BENCH_S3=keepalive python -m loadtest.bench ingest --rows all   # provision.py

It runs as its own process, so its CPU is not the benchmark's nor the service's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import re
from datetime import UTC, datetime
from email.utils import formatdate
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape


class Store:
    def __init__(self, keep_bodies: bool) -> None:
        self.keep_bodies = keep_bodies
        # bucket -> key -> (size, etag, modified, body or None)
        self.buckets: dict[str, dict[str, tuple[int, str, datetime, bytes | None]]] = {}


def _xml(body: str) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body.encode()


def _list(store: Store, bucket: str, query: dict[str, list[str]]) -> bytes:
    objects = store.buckets[bucket]
    prefix = query.get("prefix", [""])[0]
    after = query.get("continuation-token", query.get("start-after", [""]))[0]
    limit = int(query.get("max-keys", ["1000"])[0])
    keys = sorted(k for k in objects if k.startswith(prefix) and k > after)
    page, more = keys[:limit], len(keys) > limit
    parts = [
        f"<ListBucketResult><Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
        f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{limit}</MaxKeys>"
        f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"
    ]
    if more:
        parts.append(f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>")
    for key in page:
        size, etag, modified, _ = objects[key]
        stamp = modified.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        parts.append(
            f"<Contents><Key>{escape(key)}</Key><LastModified>{stamp}</LastModified>"
            f"<ETag>&quot;{etag}&quot;</ETag><Size>{size}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
        )
    parts.append("</ListBucketResult>")
    return _xml("".join(parts))


def handle(
    store: Store, method: str, target: str, body: bytes
) -> tuple[int, dict[str, str], bytes]:
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    path = unquote(url.path).lstrip("/")
    bucket, _, key = path.partition("/")
    headers: dict[str, str] = {}
    if not bucket:
        names = "".join(f"<Bucket><Name>{escape(b)}</Name></Bucket>" for b in store.buckets)
        return (
            200,
            headers,
            _xml(f"<ListAllMyBucketsResult><Buckets>{names}</Buckets></ListAllMyBucketsResult>"),
        )
    if not key:
        if method == "PUT":
            store.buckets.setdefault(bucket, {})
            return 200, headers, b""
        if bucket not in store.buckets:
            return 404, headers, _xml("<Error><Code>NoSuchBucket</Code></Error>")
        if method == "HEAD":
            return 200, headers, b""
        if method == "DELETE":
            del store.buckets[bucket]
            return 204, headers, b""
        if method == "POST" and "delete" in query:
            keys = [unquote(k) for k in re.findall(r"<Key>(.*?)</Key>", body.decode())]
            for k in keys:
                store.buckets[bucket].pop(k, None)
            return 200, headers, _xml("<DeleteResult></DeleteResult>")
        if method == "GET":
            return 200, headers, _list(store, bucket, query)
        return 405, headers, b""
    objects = store.buckets.get(bucket)
    if objects is None:
        return 404, headers, _xml("<Error><Code>NoSuchBucket</Code></Error>")
    if method == "PUT":
        etag = hashlib.md5(body, usedforsecurity=False).hexdigest()
        kept = body if store.keep_bodies else None
        objects[key] = (len(body), etag, datetime.now(UTC), kept)
        headers["ETag"] = f'"{etag}"'
        return 200, headers, b""
    found = objects.get(key)
    if found is None:
        return 404, headers, _xml("<Error><Code>NoSuchKey</Code></Error>")
    size, etag, modified, data = found
    if method == "DELETE":
        del objects[key]
        return 204, headers, b""
    headers["ETag"] = f'"{etag}"'
    headers["Last-Modified"] = formatdate(modified.timestamp(), usegmt=True)
    if method == "HEAD":
        headers["Content-Length"] = str(size)
        return 200, headers, b""
    if method == "GET" and data is not None:
        return 200, headers, data
    return 404, headers, _xml("<Error><Code>NoSuchKey</Code></Error>")


async def _read_body(reader: asyncio.StreamReader, head: dict[str, str]) -> bytes:
    if head.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(head.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


async def serve_connection(
    store: Store, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                return
            method, target, _ = request_line.decode("latin-1").split(" ", 2)
            head: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                head[name.strip().lower()] = value.strip()
            if head.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await _read_body(reader, head)
            status, headers, payload = handle(store, method, target, body)
            headers.setdefault("Content-Length", str(len(payload)))
            headers["x-amz-request-id"] = "0"
            headers["Date"] = formatdate(usegmt=True)
            lines = [f"HTTP/1.1 {status} {'OK' if status < 300 else 'Error'}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                writer.write(payload)
            await writer.drain()
            if head.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main_async(host: str, port: int, keep_bodies: bool) -> None:
    store = Store(keep_bodies)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(store, reader, writer)

    server = await asyncio.start_server(on_connect, host, port, limit=1 << 20)
    print(f"s3_keepalive: listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--keep-bodies", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args.host, args.port, args.keep_bodies))


if __name__ == "__main__":
    main()
