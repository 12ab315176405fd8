"""Session-wide servers (PostgreSQL, S3) and per-test databases, buckets and TCP proxies.

Where each server comes from: tests/support/provision.py (environment, else a container
when Docker answers, else one started here). A server that cannot be provisioned fails
the tests that need it; nothing is skipped (under CI=true least of all).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from otelworker.logs import JSONFormatter
from tests.support.provision import (
    PgServer,
    ProvisionError,
    S3Server,
    create_bucket,
    create_database,
    delete_bucket,
    drop_database,
    postgres_server,
)
from tests.support.provision import s3_server as provision_s3_server
from tests.support.proxy import TcpProxy
from tests.support.secrets import ISSUED

T = TypeVar("T")


class _SecretsWatch(logging.Handler):
    """Every log record of the session, formatted as the service writes it (JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.json = JSONFormatter()
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.json.format(record)
        if any(token in line for token in ISSUED):
            self.leaks.append(line[:300])


@pytest.fixture(scope="session", autouse=True)
def no_token_in_any_log_line() -> Iterator[None]:
    """No bearer token of tests/support/secrets.py appears in any log line of the session."""
    watch = _SecretsWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    yield
    root.removeHandler(watch)
    assert not watch.leaks, f"tokens in log lines: {watch.leaks[:3]}"


def _provisioned(what: str, manager: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(manager)
        except ProvisionError as exc:
            ci = " (CI=true)" if os.environ.get("CI", "").lower() == "true" else ""
            pytest.fail(f"cannot provision {what} for the tests{ci}: {exc}", pytrace=False)
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL: ``.dsn`` (admin, database ``postgres``), ``.embedded``."""
    yield from _provisioned("PostgreSQL", postgres_server())


@pytest.fixture
def database_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh empty database for this test; dropped (connections forced out) afterwards."""
    dsn = create_database(pg_server.dsn)
    yield dsn
    drop_database(pg_server.dsn, dsn)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's S3: ``.endpoint_url``, ``.access_key_id``, ``.secret_access_key``,
    ``.region``."""
    yield from _provisioned("an S3 server", provision_s3_server())


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket for this test; emptied and deleted afterwards."""
    name = create_bucket(s3_server)
    yield name
    delete_bucket(s3_server, name)


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    """``make_proxy(host, port)``: a :class:`TcpProxy` to that address, closed after the test."""
    proxies: list[TcpProxy] = []

    def make_proxy(target_host: str, target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_host, target_port)
        proxies.append(proxy)
        return proxy

    yield make_proxy
    for proxy in proxies:
        proxy.close()
