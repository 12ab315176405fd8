"""PostgreSQL and S3 servers for the test session, and per-test databases and buckets.

Each service comes from, in order: the environment (an explicit server; used or failed,
never silently replaced), a testcontainers container when a Docker engine answers, or a
server started here (:class:`otelworker.devdb.EmbeddedPostgres`, moto's S3 server). If a
later option works, earlier failures are forgotten; if none does, :class:`ProvisionError`
names every reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import boto3
from botocore.config import Config as BotoConfig

from otelworker.devdb import EmbeddedPostgres
from tests.support import free_port

T = TypeVar("T")

PG_URL_ENV = "OTELWORKER_TEST_DATABASE_URL"
S3_URL_ENV = "OTELWORKER_TEST_S3_ENDPOINT_URL"
S3_KEY_ENV = "OTELWORKER_TEST_S3_ACCESS_KEY_ID"
S3_SECRET_ENV = "OTELWORKER_TEST_S3_SECRET_ACCESS_KEY"
DEFAULT_S3_KEY = "test"
DEFAULT_S3_SECRET = "test"  # moto accepts anything
REGION = "us-east-1"


class ProvisionError(RuntimeError):
    """No way to get the service; the message says what was tried and why it failed."""


@dataclass(frozen=True)
class PgServer:
    dsn: str  # admin DSN, to the maintenance database
    embedded: EmbeddedPostgres | None = None
    source: str = "env"  # "env", "container" or "embedded"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = REGION
    source: str = "env"  # "env", "container" or "moto"


# --- helpers ---------------------------------------------------------------------------------


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh loop in a worker thread.

    Works from sync code and from inside a running event loop alike (blocking it).
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def with_database(dsn: str, database: str) -> str:
    """``dsn`` with its database (the URL path) replaced."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@functools.cache
def docker_available() -> bool:
    """Whether a Docker engine answers a ping within a few seconds."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _first_working(
    stack: contextlib.ExitStack, attempts: list[tuple[str, Callable[[contextlib.ExitStack], T]]]
) -> T:
    """The result of the first attempt that succeeds; its clean-up joins ``stack``."""
    reasons = []
    for name, attempt in attempts:
        with contextlib.ExitStack() as own:
            try:
                result = attempt(own)
            except Exception as exc:
                reasons.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            stack.enter_context(own.pop_all())
            return result
    raise ProvisionError("; ".join(reasons) or "nothing to try")


# --- PostgreSQL ----------------------------------------------------------------------------


async def _pg_check(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def _pg_from_env(url: str) -> PgServer:
    dsn = url if urlsplit(url).path.strip("/") else with_database(url, "postgres")
    try:
        run_async(lambda: _pg_check(dsn))
    except Exception as exc:
        raise ProvisionError(f"{PG_URL_ENV}={url} does not answer: {exc!r}") from exc
    return PgServer(dsn, None, "env")


def _pg_container(stack: contextlib.ExitStack) -> PgServer:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(
        "postgres:16-alpine",
        username="postgres",
        password="postgres",
        dbname="postgres",
        driver=None,
    ).with_command("postgres -c max_connections=200")
    stack.callback(container.stop)
    container.start()
    dsn = container.get_connection_url(driver=None)
    run_async(lambda: _pg_check(dsn))
    return PgServer(dsn, None, "container")


def _pg_embedded(stack: contextlib.ExitStack) -> PgServer:
    tmp = Path(tempfile.mkdtemp(prefix="otelworker-test-pg-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    embedded = EmbeddedPostgres(tmp / "pgdata")
    stack.callback(embedded.stop, "immediate")  # the data is thrown away anyway
    dsn = embedded.start()
    run_async(lambda: _pg_check(dsn))
    return PgServer(dsn, embedded, "embedded")


@contextlib.contextmanager
def postgres_server() -> Iterator[PgServer]:
    url = os.environ.get(PG_URL_ENV)
    if url:
        yield _pg_from_env(url)
        return
    attempts: list[tuple[str, Callable[[contextlib.ExitStack], PgServer]]] = []
    if docker_available():
        attempts.append(("testcontainers PostgresContainer", _pg_container))
    attempts.append(("embedded PostgreSQL (otelworker.devdb)", _pg_embedded))
    with contextlib.ExitStack() as stack:
        yield _first_working(stack, attempts)


def create_database(admin_dsn: str) -> str:
    """A new empty database on ``admin_dsn``'s server; returns its DSN."""
    name = f"t_{uuid.uuid4().hex}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_async(create)
    return with_database(admin_dsn, name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop ``dsn``'s database, disconnecting whoever is still connected."""
    name = urlsplit(dsn).path.strip("/")

    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_async(drop)


# --- S3 ----------------------------------------------------------------------------------------


def s3_client(server: S3Server) -> Any:
    """A boto3 S3 client for ``server`` (path-style addressing)."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key_id,
        aws_secret_access_key=server.secret_access_key,
        region_name=server.region,
        config=BotoConfig(
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 2},
        ),
    )


def _s3_check(server: S3Server) -> S3Server:
    s3_client(server).list_buckets()
    return server


def _s3_from_env(url: str) -> S3Server:
    server = S3Server(
        url,
        os.environ.get(S3_KEY_ENV, DEFAULT_S3_KEY),
        os.environ.get(S3_SECRET_ENV, DEFAULT_S3_SECRET),
        os.environ.get("OTELWORKER_TEST_S3_REGION", REGION),
        "env",
    )
    try:
        return _s3_check(server)
    except Exception as exc:
        raise ProvisionError(f"{S3_URL_ENV}={url} does not answer: {exc!r}") from exc


def _s3_container(stack: contextlib.ExitStack) -> S3Server:
    try:
        from testcontainers.community.minio import MinioContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.minio import MinioContainer

    container = MinioContainer()
    stack.callback(container.stop)
    container.start()
    config = container.get_config()
    endpoint = f"http://{config['endpoint']}"
    return _s3_check(
        S3Server(endpoint, config["access_key"], config["secret_key"], REGION, "container")
    )


def _s3_moto(stack: contextlib.ExitStack) -> S3Server:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stack.callback(server.stop)
    endpoint = f"http://127.0.0.1:{port}"
    return _s3_check(S3Server(endpoint, DEFAULT_S3_KEY, DEFAULT_S3_SECRET, REGION, "moto"))


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    url = os.environ.get(S3_URL_ENV)
    if url:
        yield _s3_from_env(url)
        return
    attempts: list[tuple[str, Callable[[contextlib.ExitStack], S3Server]]] = []
    if docker_available():
        attempts.append(("testcontainers MinioContainer", _s3_container))
    attempts.append(("moto ThreadedMotoServer", _s3_moto))
    with contextlib.ExitStack() as stack:
        yield _first_working(stack, attempts)


def create_bucket(server: S3Server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    kwargs: dict[str, Any] = {"Bucket": name}
    if server.region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": server.region}
    s3_client(server).create_bucket(**kwargs)
    return name


def delete_bucket(server: S3Server, name: str) -> None:
    """Empty and delete a bucket (objects and unfinished multipart uploads)."""
    client = s3_client(server)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=name)
