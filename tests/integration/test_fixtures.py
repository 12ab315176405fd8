"""The session's servers and per-test resources work as the other tests assume."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.support.provision import (
    PgServer,
    S3Server,
    create_database,
    drop_database,
    s3_client,
)
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.integration


async def test_pg_server_dsn_connects(pg_server: PgServer) -> None:
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "postgres"
    finally:
        await conn.close()


async def test_database_url_is_an_empty_database_of_its_own(
    pg_server: PgServer, database_url: str
) -> None:
    name = urlsplit(database_url).path.strip("/")
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == name
        await conn.execute("CREATE TABLE t (x int)")
    finally:
        await conn.close()


def test_two_database_urls_are_different_databases(
    pg_server: PgServer, database_url: str, request: pytest.FixtureRequest
) -> None:
    other = create_database(pg_server.dsn)
    request.addfinalizer(lambda: drop_database(pg_server.dsn, other))
    assert urlsplit(other).path != urlsplit(database_url).path
    assert urlsplit(other).netloc == urlsplit(database_url).netloc


def test_s3_bucket_accepts_put_and_get(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_client(s3_server)
    key = f"probe/{uuid.uuid4().hex}"
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"hello"
    assert s3_server.region == "us-east-1"


async def test_proxy_cuts_and_restores_postgres(
    database_url: str, tcp_proxy: Callable[[str, int], TcpProxy]
) -> None:
    parts = urlsplit(database_url)
    assert parts.hostname and parts.port
    proxy = tcp_proxy(parts.hostname, parts.port)
    dsn = proxy.url_for(database_url)

    conn = await asyncpg.connect(dsn, timeout=5)
    assert await conn.fetchval("SELECT 1") == 1
    proxy.refuse()
    with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        await conn.fetchval("SELECT 1", timeout=5)
    await conn.close(timeout=1)
    with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        await asyncpg.connect(dsn, timeout=5)

    proxy.pass_through()
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
