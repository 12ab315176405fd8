"""Provision PostgreSQL, S3 and service processes for the benchmark and stress harnesses.

- PostgreSQL: ``DATABASE_URL`` (or ``OTEL_DATABASE_URL``) when set; otherwise a private
  server in a temporary directory through :class:`otelworker.devdb.EmbeddedPostgres`
  (the ``pgserver`` wheel underneath; used directly if ``devdb`` cannot be imported).
  Every harness run works in a fresh database of its own (:meth:`PostgresHandle.fresh_database`),
  so a given server's other databases are never touched.
- S3: ``S3_ENDPOINT_URL`` (or ``OTEL_S3_ENDPOINT_URL``) with ``S3_ACCESS_KEY_ID`` /
  ``S3_SECRET_ACCESS_KEY`` (or the AWS variables) when set; otherwise moto's
  ``ThreadedMotoServer`` on a free local port. Every run uses a fresh bucket.
- Services: :class:`AppProcess` runs ``python -m hypercorn MODULE:app`` as a real process
  on a free local port, logs to a file, waits for ``/readyz`` and stops it with SIGTERM.
- Peers: :class:`RotelProcess` runs rotel (``rotel-agent start --exporter blackhole``, the
  binary in the ``rotel`` wheel, see :func:`rotel_binary`) with its OTLP/HTTP receiver on a
  free local port and its gRPC receiver on another.

Starting and stopping are blocking calls (run them through ``asyncio.to_thread`` in
async code); database set-up is async (asyncpg).

    pg = start_postgres()
    dsn = await pg.fresh_database("bench")
    ...
    await pg.drop_database(dsn)
    pg.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held at once while they are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def grpc_settings(port: int) -> dict[str, str]:
    """What a service needs to serve OTLP/gRPC on ``port`` (hypercorn leaves it off)."""
    return {"GRPC_ENABLED": "true", "GRPC_PORT": str(port)}


def _env(*keys: str) -> str | None:
    for key in keys:
        value = os.environ.get(key)
        if value:
            return value
    return None


def with_database(dsn: str, name: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _normalise_dsn(url: str) -> str:
    for driver in ("postgresql+asyncpg://", "postgres+asyncpg://"):
        if url.startswith(driver):
            return "postgresql://" + url[len(driver) :]
    return url


# --- PostgreSQL ------------------------------------------------------------------------


@dataclass
class PostgresHandle:
    """A PostgreSQL server: ``admin_dsn`` reaches its maintenance database."""

    admin_dsn: str
    source: str  # "env", "embedded" (otelworker.devdb) or "pgserver"
    data_dir: Path | None = None
    _server: Any = None
    _tmp: Path | None = None
    _databases: list[str] = field(default_factory=list)

    def postmaster_pid(self) -> int | None:
        """The server's pid when it runs here (for CPU accounting), else None."""
        if self.data_dir is None:
            return None
        for pid_file in sorted(self.data_dir.rglob("postmaster.pid")):
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(pid_file.read_text().split()[0])
        return None

    async def fresh_database(self, prefix: str = "otelworker_harness") -> str:
        """Create an empty database and return its DSN."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self.admin_dsn, timeout=30)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self._databases.append(name)
        return with_database(self.admin_dsn, name)

    async def drop_database(self, dsn: str) -> None:
        name = urlsplit(dsn).path.lstrip("/")
        conn = await asyncpg.connect(self.admin_dsn, timeout=30)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        with contextlib.suppress(ValueError):
            self._databases.remove(name)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                if self.source == "embedded":
                    server.stop()
                else:
                    server.cleanup()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _admin_dsn_from(dsn: str) -> str:
    # Create and drop databases from the maintenance database of the same server.
    return with_database(dsn, "postgres")


def start_postgres(base_dir: str | Path | None = None) -> PostgresHandle:
    """DATABASE_URL's server, else a private one in a temporary directory."""
    url = _env("OTEL_DATABASE_URL", "DATABASE_URL")
    if url:
        return PostgresHandle(_admin_dsn_from(_normalise_dsn(url)), "env")
    tmp = Path(tempfile.mkdtemp(prefix="otelworker-pg-", dir=base_dir))
    data_dir = tmp / "pgdata"
    try:
        try:
            from otelworker.devdb import EmbeddedPostgres
        except ImportError:
            import pgserver

            server = pgserver.get_server(data_dir, cleanup_mode="delete")
            dsn = server.get_uri()
            return PostgresHandle(_admin_dsn_from(dsn), "pgserver", data_dir, server, tmp)
        embedded = EmbeddedPostgres(str(data_dir))
        dsn = embedded.start()
        return PostgresHandle(_admin_dsn_from(dsn), "embedded", data_dir, embedded, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def postgres(base_dir: str | Path | None = None) -> Iterator[PostgresHandle]:
    handle = start_postgres(base_dir)
    try:
        yield handle
    finally:
        handle.stop()


# --- S3 ----------------------------------------------------------------------------------


@dataclass
class S3Handle:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str
    source: str  # "env", "moto" or "keepalive" (loadtest/s3_keepalive.py)
    _server: Any = None

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, prefix: str = "otelworker-harness") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.client().create_bucket(**kwargs)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty the bucket and remove it."""
        client = self.client()
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)

    def service_env(self, bucket: str) -> dict[str, str]:
        """The settings that point otelworker at this server and bucket."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "S3_BUCKET": bucket,
            "S3_ACCESS_KEY_ID": self.access_key_id,
            "S3_SECRET_ACCESS_KEY": self.secret_access_key,
            "S3_REGION": self.region,
            "S3_FORCE_PATH_STYLE": "true",
        }

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()


def start_s3() -> S3Handle:
    """S3_ENDPOINT_URL's server, else moto's ThreadedMotoServer on a free local port."""
    region = _env("OTEL_S3_REGION", "S3_REGION", "AWS_DEFAULT_REGION", "AWS_REGION") or "us-east-1"
    endpoint = _env("OTEL_S3_ENDPOINT_URL", "S3_ENDPOINT_URL")
    if endpoint:
        key = _env("OTEL_S3_ACCESS_KEY_ID", "S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
        secret = _env("OTEL_S3_SECRET_ACCESS_KEY", "S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise RuntimeError(
                "S3_ENDPOINT_URL is set but S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY are not"
            )
        return S3Handle(endpoint, key, secret, region, "env")
    if os.environ.get("OTELWORKER_BENCH_S3") == "keepalive":
        return _start_keepalive_s3(region)
    import logging

    from moto.server import ThreadedMotoServer

    # werkzeug logs every request to stderr: noise, and CPU taken from the run measured.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    handle = S3Handle(f"http://127.0.0.1:{port}", "testing", "testing", region, "moto", server)
    deadline = time.monotonic() + 30
    while True:
        try:
            handle.client().list_buckets()
            return handle
        except Exception:
            if time.monotonic() > deadline:
                handle.stop()
                raise
            time.sleep(0.05)


class _S3Process:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_keepalive_s3(region: str) -> S3Handle:
    """``OTELWORKER_BENCH_S3=keepalive``: loadtest/s3_keepalive.py in a process of its own,
    an S3 that keeps connections alive (moto's closes one after every request)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.s3_keepalive", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    url = f"http://127.0.0.1:{port}"
    handle = S3Handle(url, "testing", "testing", region, "keepalive", _S3Process(proc))
    deadline = time.monotonic() + 30
    while True:
        try:
            handle.client().list_buckets()
            return handle
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                handle.stop()
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def s3() -> Iterator[S3Handle]:
    handle = start_s3()
    try:
        yield handle
    finally:
        handle.stop()


# --- service processes ---------------------------------------------------------------


def service_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This environment with ``settings`` (bare keys) taking precedence.

    A prefixed ``OTEL_KEY`` in the caller's environment would win over a bare ``KEY``,
    so the prefixed twin of every key set here is removed.
    """
    env = dict(os.environ)
    for key, value in settings.items():
        env.pop(f"OTEL_{key}", None)
        env[key] = value
    return env


class AppProcess:
    """An ASGI app as a real process on a local port: ``python -m hypercorn MODULE:app``
    (``entry="hypercorn"``), ``python -m otelworker serve`` (``"serve"``: the service on
    uvicorn + httptools + uvloop, its own front; ``app`` is ignored, ``-w N`` becomes
    ``--processes N``, OTLP/gRPC off unless ``settings`` say otherwise) or ``python -m
    uvicorn MODULE:app --http httptools --loop uvloop`` (``"uvicorn"``: a bare app on the
    server ``serve`` runs on, e.g. the no-op)."""

    def __init__(
        self,
        app: str,
        *,
        settings: Mapping[str, str] | None = None,
        log_path: str | Path,
        port: int | None = None,
        python: str = sys.executable,
        extra_args: list[str] | None = None,
        cwd: str | Path | None = None,
        entry: str = "hypercorn",
    ) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        extra = list(extra_args or [])
        if entry == "serve":
            self.app = "otelworker serve"
            settings = {"GRPC_ENABLED": "false", **(settings or {})}
            args = [python, "-m", "otelworker", "serve"]
            if extra[:1] == ["-w"]:
                extra = ["--processes", *extra[1:]]
        elif entry == "uvicorn":
            args = [python, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port"]
            args += [str(self.port), "--http", "httptools", "--loop", "uvloop"]
            args += ["--no-access-log", "--log-level", "warning"]
            if extra[:1] == ["-w"]:
                extra = ["--workers", *extra[1:]]
        elif entry == "hypercorn":
            args = [python, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{self.port}"]
        else:
            raise ValueError(f"entry is hypercorn, serve or uvicorn, not {entry!r}")
        env = service_env({**(settings or {}), "HOST": "127.0.0.1", "PORT": str(self.port)})
        args += extra
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd or os.getcwd()
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.app} exited with {self.proc.returncode} during start-up; "
                    f"see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.app} not ready within {timeout} s; see {self.log_path}")
            time.sleep(0.05)

    async def wait_ready_async(self, limit_s: float = 60.0, path: str = "/readyz") -> None:
        await asyncio.to_thread(self.wait_ready, limit_s, path)

    def _tree(self) -> list[Any]:
        """hypercorn's process and its children (it serves from a spawned worker process)."""
        import psutil

        if self.proc.poll() is not None:
            return []  # reaped: the pid may be someone else's now
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL the whole tree at once. Killing only the parent would orphan hypercorn's
        worker process, which would go on serving and polling the database."""
        import psutil

        tree = self._tree()
        for proc in reversed(tree):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for proc in tree[1:]:
            with contextlib.suppress(psutil.Error):
                proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the service's graceful stop), then SIGKILL to the tree after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()


# --- peers ---------------------------------------------------------------------------


def rotel_binary() -> str | None:
    """The ``rotel-agent`` binary: ``ROTEL_AGENT`` when set, else the ``rotel`` wheel's, else
    one on PATH; None when there is none."""
    explicit = os.environ.get("ROTEL_AGENT")
    if explicit:
        return explicit
    try:
        import rotel  # the wheel ships the binary beside its package, not in bin/
    except ImportError:
        rotel = None
    if rotel is not None and rotel.__file__ is not None:
        candidate = Path(rotel.__file__).parent / "rotel-agent"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("rotel-agent")


class RotelProcess:
    """rotel as a peer: OTLP/HTTP on a free local port, blackhole exporter (keeps nothing).

    The gRPC receiver cannot be switched off, so it listens on a second free port. Ready
    when an empty ``/v1/traces`` POST is answered 200. Interface as :class:`AppProcess`
    (``pid``, ``url``, ``wait_ready_async``, ``stop``).
    """

    app = "rotel-agent"

    def __init__(self, binary: str, *, log_path: str | Path) -> None:
        self.port, self.grpc_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [binary, "start", "--exporter", "blackhole"]
        args += ["--otlp-http-endpoint", f"127.0.0.1:{self.port}"]
        args += ["--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}"]
        # Not daemonised (no --daemon): these only keep it off /tmp's shared defaults.
        args += ["--pid-file", str(self.log_path.with_suffix(".pid"))]
        args += ["--log-file", str(self.log_path)]
        self.args = args
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, cwd=os.getcwd()
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def version(self) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [self.args[0], "--version"], capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip()
        return "unknown"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rotel-agent exited with {self.proc.returncode}; see {self.log_path}"
                )
            request = urllib.request.Request(
                self.url + "/v1/traces",
                data=b"",
                method="POST",
                headers={"Content-Type": "application/x-protobuf"},
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"rotel-agent not ready within {timeout} s")
            time.sleep(0.05)

    async def wait_ready_async(self, limit_s: float = 30.0) -> None:
        await asyncio.to_thread(self.wait_ready, limit_s)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
