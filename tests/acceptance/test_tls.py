"""TLS on both ports of ``python -m otelworker serve`` (TLS_CERT_FILE, TLS_KEY_FILE,
TLS_CLIENT_CA_FILE), against clients as operators run them: httpx, grpc and the
OpenTelemetry SDK's gRPC exporter. Certificates: :mod:`tests.support.pki`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import free_port
from tests.support.objects import queue_rows, span_request
from tests.support.pki import Pki, make_pki

pytestmark = pytest.mark.acceptance

READY_S = 60.0  # deadlines, not waits
PROTOBUF = {"Content-Type": "application/x-protobuf"}
# A connection the server closed without an HTTP answer: EOF, or a reset (unread bytes).
CLOSED_UNANSWERED = (httpx.RemoteProtocolError, httpx.ReadError)


# --- certificates ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA; a server certificate for localhost, 127.0.0.1 and ::1; a client
    certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- the service -------------------------------------------------------------------------


def _env(**settings: str) -> dict[str, str]:
    """The calling environment without any otelworker setting, plus ``settings``."""
    from otelworker.settings import Settings, env_key

    keys = {env_key(n) for n in Settings.model_fields}
    keys |= {f"OTEL_{k}" for k in keys}
    env = {k: v for k, v in os.environ.items() if k.upper() not in keys}
    return {**env, **settings, "PYTHONUNBUFFERED": "1"}


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    grpc_port: int
    stderr: Path
    verify: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        with httpx.Client(verify=self.verify, timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"serve exited with {self.proc.returncode} before it was ready:\n"
                        f"{self.stderr.read_text()}"
                    )
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"serve not ready within {READY_S} s:\n{self.stderr.read_text()}")
                time.sleep(0.05)


def _context(pki: Pki, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(*pki.client)
    return context


@pytest.fixture
def serve(tmp_path: Path, database_url: str, pki: Pki) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(mutual: bool = False, **settings: str) -> Served:
        port, grpc_port = free_port(), free_port()
        env = {
            "DATABASE_URL": database_url,
            "ROLE": "ingress",  # nothing is exported: what was accepted stays in the queue
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "GRPC_PORT": str(grpc_port),
            "SHUTDOWN_GRACE_S": "2",
            "EMBEDDED_DB_DIR": str(tmp_path / "never-used"),
            "TLS_CERT_FILE": str(pki.server_cert),
            "TLS_KEY_FILE": str(pki.server_key),
            **({"TLS_CLIENT_CA_FILE": str(pki.ca)} if mutual else {}),
            **settings,
        }
        stderr = tmp_path / f"stderr-{len(started)}.log"
        with (tmp_path / f"stdout-{len(started)}.log").open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "otelworker", "serve"],
                env=_env(**env),
                cwd=tmp_path,
                stdout=out,
                stderr=err,
            )
        started.append(proc)
        return Served(proc, port, grpc_port, stderr, _context(pki, client_cert=mutual))

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _traces(*ids: int) -> bytes:
    return span_request([i.to_bytes(8, "big") for i in ids], service_name="tls")


def _staged_records(dsn: str) -> int:
    return sum(row["record_count"] for row in asyncio.run(queue_rows(dsn)))


def _sdk_export(endpoint: str, credentials: grpc.ChannelCredentials) -> SpanExportResult:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "tls-sdk"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tls").start_as_current_span("over-tls"):
        pass
    provider.shutdown()
    exporter = OTLPSpanExporter(endpoint=endpoint, credentials=credentials, timeout=10)
    try:
        return exporter.export(memory.get_finished_spans())
    finally:
        exporter.shutdown()


# --- the tests ---------------------------------------------------------------------------


def test_both_ports_speak_tls(serve: Any, database_url: str, pki: Pki) -> None:
    served = serve()
    served.wait_ready()
    assert f"https://127.0.0.1:{served.port}" in served.stderr.read_text()

    with httpx.Client(verify=served.verify, timeout=10) as client:
        answer = client.post(f"{served.url}/v1/traces", content=_traces(1, 2), headers=PROTOBUF)
    assert answer.status_code == 200, answer.text
    assert answer.http_version == "HTTP/1.1"
    # serve's server (uvicorn) speaks HTTP/1.1 only, and ALPN says so: a client offering
    # h2 gets HTTP/1.1 (HTTP/2 stays with the bare hypercorn entry).
    with httpx.Client(verify=served.verify, timeout=10, http2=True) as client:
        answer = client.post(f"{served.url}/v1/traces", content=_traces(3), headers=PROTOBUF)
    assert answer.status_code == 200, answer.text
    assert answer.http_version == "HTTP/1.1"

    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    assert _sdk_export(f"localhost:{served.grpc_port}", credentials) is SpanExportResult.SUCCESS
    # Acknowledged means committed: 2 + 1 spans over HTTPS, 1 over gRPC.
    assert _staged_records(database_url) == 4


def test_plain_http_to_the_tls_port_is_not_answered(serve: Any, database_url: str) -> None:
    served = serve()
    served.wait_ready()
    # The TLS handshake fails on the plain request's first bytes and the connection is
    # closed: no HTTP answer at all (not a 400), and nothing staged. The client sees EOF, or
    # a reset when some of its request was still unread at the close.
    with httpx.Client(timeout=10) as client, pytest.raises(CLOSED_UNANSWERED):
        client.post(f"http://127.0.0.1:{served.port}/v1/traces", content=_traces(1))
    # The same for a plaintext gRPC channel.
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Export(trace_service_pb2.ExportTraceServiceRequest(), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert _staged_records(database_url) == 0
    # The server is unharmed: HTTPS still answers.
    with httpx.Client(verify=served.verify, timeout=10) as client:
        assert client.get(f"{served.url}/readyz").status_code == 200


def test_a_stalled_tls_handshake_is_closed_within_the_header_timeout(serve: Any) -> None:
    served = serve(HTTP_HEADER_TIMEOUT_S="1")
    served.wait_ready()
    # A client that connects and never starts the handshake (asyncio's own bound is 60 s).
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1024) == b""
        assert time.monotonic() - started < 5


def test_mutual_tls_requires_a_client_certificate(serve: Any, database_url: str, pki: Pki) -> None:
    served = serve(mutual=True)
    served.wait_ready()  # with the client certificate
    assert "client certificate required" in served.stderr.read_text()

    # Without a certificate the server fails the handshake and closes the connection. Under
    # TLS 1.3 the client's side of the handshake is already done, so it learns on its first
    # read; no alert reaches it (asyncio's SSL transport drops it), just the close.
    with (
        httpx.Client(verify=_context(pki), timeout=10) as client,
        pytest.raises(CLOSED_UNANSWERED),
    ):
        client.post(f"{served.url}/v1/traces", content=_traces(1), headers=PROTOBUF)
    tls12 = _context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # here the handshake itself fails
    with (
        socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        tls12.wrap_socket(raw, server_hostname="localhost")
    ca = pki.ca.read_bytes()
    with grpc.secure_channel(
        f"localhost:{served.grpc_port}", grpc.ssl_channel_credentials(root_certificates=ca)
    ) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Export(
                trace_service_pb2.ExportTraceServiceRequest.FromString(_traces(2)), timeout=10
            )
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert _staged_records(database_url) == 0

    # With the client certificate: accepted on both ports.
    with httpx.Client(verify=served.verify, timeout=10) as client:
        answer = client.post(f"{served.url}/v1/traces", content=_traces(3), headers=PROTOBUF)
    assert answer.status_code == 200, answer.text
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    assert _sdk_export(f"localhost:{served.grpc_port}", credentials) is SpanExportResult.SUCCESS
    assert _staged_records(database_url) == 2


def test_serve_processes_share_the_tls_ports(serve: Any, database_url: str, pki: Pki) -> None:
    served = serve(PROCESSES="2")
    served.wait_ready()
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection (and handshake) each
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    with httpx.Client(verify=served.verify, limits=fresh, timeout=10) as client:
        while len(seen) < 2:  # both children answer over TLS on their fd:// sockets
            assert time.monotonic() < deadline, f"one process answered every scrape: {seen}"
            text = client.get(f"{served.url}/metrics").text
            seen |= {x for x in text.splitlines() if x.startswith("otelworker_process_index")}
        answer = client.post(f"{served.url}/v1/traces", content=_traces(1), headers=PROTOBUF)
    assert answer.status_code == 200, answer.text
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    assert _sdk_export(f"localhost:{served.grpc_port}", credentials) is SpanExportResult.SUCCESS
    assert _staged_records(database_url) == 2


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_missing_key_file_stops_serve_naming_the_setting(
    serve: Any, tmp_path: Path, processes: str
) -> None:
    absent = tmp_path / "absent-key.pem"
    served = serve(TLS_KEY_FILE=str(absent), PROCESSES=processes)
    try:
        code = served.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("serve still running without its key file")
    stderr = served.stderr.read_text()
    # A configuration error, found before any service process starts.
    assert code == 2, stderr
    assert f"TLS_KEY_FILE: cannot read {absent}: No such file or directory" in stderr
    assert "Traceback" not in stderr
    with socket.socket() as sock:  # nothing was listening
        assert sock.connect_ex(("127.0.0.1", served.port)) != 0


@pytest.mark.parametrize(
    ("setting", "problem", "message"),
    [
        ("TLS_CERT_FILE", "a directory", "TLS_CERT_FILE: cannot read {path}: Is a directory"),
        ("TLS_CERT_FILE", "a key", "TLS_CERT_FILE: no PEM certificate in {path}"),
        ("TLS_KEY_FILE", "a certificate", "TLS_KEY_FILE: no usable PEM private key in {path}"),
        ("TLS_KEY_FILE", "another key", "TLS_KEY_FILE: the key in {path} does not match"),
        ("TLS_KEY_FILE", "encrypted", "TLS_KEY_FILE: {path} is encrypted"),
        ("TLS_CLIENT_CA_FILE", "a key", "TLS_CLIENT_CA_FILE: no PEM CA certificate in {path}"),
    ],
)
def test_a_bad_tls_file_is_named_never_shown(
    pki: Pki, tmp_path: Path, setting: str, problem: str, message: str
) -> None:
    from otelworker import tls
    from otelworker.exceptions import ConfigError
    from otelworker.settings import load_settings

    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        serialization.load_pem_private_key(pki.server_key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    path = {
        "a directory": tmp_path,
        "a key": pki.server_key,
        "a certificate": pki.client_cert,
        "another key": pki.client_key,  # a key, but not the certificate's
        "encrypted": encrypted,  # would make OpenSSL prompt for a passphrase on the tty
    }[problem]
    files = {
        "tls_cert_file": str(pki.server_cert),
        "tls_key_file": str(pki.server_key),
        "tls_client_ca_file": str(pki.ca),
        setting.lower(): str(path),
    }
    with pytest.raises(ConfigError) as refused:
        tls.load(load_settings(**files))
    assert str(refused.value).startswith(message.format(path=path)), refused.value
    assert "-----BEGIN" not in str(refused.value)  # never a file's content
