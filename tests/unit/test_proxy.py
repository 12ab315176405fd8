"""The test TCP proxy, against a small echo server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.proxy import TcpProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A threaded echo server on 127.0.0.1."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)
    server.close()


def roundtrip(port: int, payload: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the echo server closes after our EOF
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def cut_off(port: int) -> bool:
    """Whether a connection through ``port`` is reset or closed without an answer."""
    try:
        return roundtrip(port, b"hello") == b""
    except OSError:
        return True


def test_forwards_both_ways_with_half_close(
    echo_port: int, tcp_proxy: Callable[[str, int], TcpProxy]
) -> None:
    proxy = tcp_proxy("127.0.0.1", echo_port)
    payload = bytes(range(256)) * 4096  # 1 MiB, many chunks
    assert roundtrip(proxy.port, payload) == payload


def test_refuse_cuts_open_connections_and_new_ones(
    echo_port: int, tcp_proxy: Callable[[str, int], TcpProxy]
) -> None:
    proxy = tcp_proxy("127.0.0.1", echo_port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as open_conn:
        open_conn.sendall(b"ping")
        assert open_conn.recv(4) == b"ping"
        proxy.refuse()
        with contextlib.suppress(ConnectionResetError):
            assert open_conn.recv(4) == b""
    assert cut_off(proxy.port)
    proxy.pass_through()
    assert roundtrip(proxy.port, b"hello") == b"hello"


def test_delay_slows_each_chunk(echo_port: int, tcp_proxy: Callable[[str, int], TcpProxy]) -> None:
    proxy = tcp_proxy("127.0.0.1", echo_port)
    proxy.delay(0.3)
    started = time.monotonic()
    assert roundtrip(proxy.port, b"slow") == b"slow"
    assert time.monotonic() - started >= 0.6  # once each way
    proxy.pass_through()
    started = time.monotonic()
    assert roundtrip(proxy.port, b"fast") == b"fast"
    assert time.monotonic() - started < 0.3


def test_url_for_keeps_everything_but_the_address() -> None:
    with TcpProxy("127.0.0.1", 9) as proxy:
        port = proxy.port
        assert (
            proxy.url_for("postgresql://u:p@ss@db.example:5432/app?sslmode=disable")
            == f"postgresql://u:p@ss@127.0.0.1:{port}/app?sslmode=disable"
        )
        assert proxy.url_for("http://localhost:9000") == f"http://127.0.0.1:{port}"


def test_unreachable_target_resets_the_client(tcp_proxy: Callable[[str, int], TcpProxy]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound, never listening: connections refused
        proxy = tcp_proxy("127.0.0.1", dead_port)
        assert cut_off(proxy.port)
