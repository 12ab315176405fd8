"""A thread-based TCP proxy on 127.0.0.1 to cut, or slow, the way to a server we do not own.

``proxy = TcpProxy(host, port)`` listens on ``proxy.port``; ``proxy.url_for(dsn)`` is the
same URL through the proxy. ``refuse()``: the server is "down" (connections reset, new ones
too); ``delay(s)``: the server is slow (each chunk forwarded ``s`` late); ``pass_through()``:
back to normal; ``close()`` at the end.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 64 * 1024


def _abort(sock: socket.socket) -> None:
    """Close with a RST (no FIN), waking any thread blocked in recv on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One proxied connection: the client's socket and ours to the target."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.sockets = (client, upstream)
        self.aborted = False
        self._open_directions = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        client, upstream = self.sockets
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def abort(self) -> None:
        self.aborted = True
        for sock in self.sockets:
            _abort(sock)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:  # EOF (or our own abort): pass a half-close on
                    if not self.aborted:
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                    break
                delay = self.proxy.delay_s
                if delay > 0 and self.proxy.closed.wait(delay):
                    break
                if self.aborted:
                    break
                dst.sendall(data)
        except OSError:
            self.abort()
        finally:
            with self._lock:
                self._open_directions -= 1
                done = self._open_directions == 0
            if done:
                for sock in self.sockets:
                    with contextlib.suppress(OSError):
                        sock.close()
                self.proxy._forget(self)


class TcpProxy:
    """Listens on ``127.0.0.1:port`` and forwards each connection to ``target``."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.delay_s = 0.0
        self.refusing = False
        self.closed = threading.Event()
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="tcp-proxy")
        self._thread.start()

    # --- modes -------------------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward everything, promptly."""
        self.refusing = False
        self.delay_s = 0.0

    def refuse(self) -> None:
        """Like a server that is down: reset every connection, accept and reset new ones."""
        self.refusing = True
        self._abort_all()

    def delay(self, seconds: float) -> None:
        """Like a slow server: each chunk, either way, is forwarded ``seconds`` late."""
        self.refusing = False
        self.delay_s = seconds

    # --- addresses ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def url_for(self, url: str) -> str:
        """``url`` (a DSN or an http URL) with its host:port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{self.host}:{self.port}"))

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        with self._lock:
            return len(self._links)

    # --- life cycle --------------------------------------------------------------------

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        self._abort_all()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _abort_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.abort()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self.closed.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._listener and not self.closed.is_set():
                        with contextlib.suppress(OSError):
                            client, _addr = self._listener.accept()
                            threading.Thread(
                                target=self._connect, args=(client,), daemon=True
                            ).start()

    def _connect(self, client: socket.socket) -> None:
        if self.refusing or self.closed.is_set():
            _abort(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _abort(client)
            return
        upstream.settimeout(None)
        link = _Link(self, client, upstream)
        with self._lock:
            if self.refusing or self.closed.is_set():
                link.abort()
                return
            self._links.add(link)
        link.start()
