"""TLS for ``python -m otelworker serve``: both ports, from TLS_CERT_FILE, TLS_KEY_FILE and
TLS_CLIENT_CA_FILE (mutual TLS: a client certificate signed by that CA is required).

:func:`load` checks the files once at start-up, by building the server's
``ssl.SSLContext`` from them; a file that is missing, unreadable or not what its key says
raises :class:`ConfigError` naming the setting and the path (never the file's content).
The HTTP port keeps hypercorn's own TLS (its context: TLS >= 1.2, ALPN ``h2`` and
``http/1.1``), configured by :func:`configure_hypercorn`; the gRPC port takes
:func:`grpc_credentials`. See docs/security.md.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from otelworker.exceptions import ConfigError

if TYPE_CHECKING:
    import grpc
    from hypercorn.config import Config

    from otelworker.settings import Settings


@dataclass(frozen=True)
class ServerTls:
    """The checked files: their paths (for hypercorn) and PEM bytes (for grpc)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _encrypted_key(path: str) -> bytes:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal.
    raise ConfigError(
        f"TLS_KEY_FILE: {path} is encrypted (passphrase-protected); give an unencrypted key"
    )


def _detail(exc: OSError) -> str:
    """OpenSSL's reason (``key values mismatch``), or the OS error's text."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason).lower().replace("_", " ") if exc.reason else "not PEM"
    return str(exc.strerror or exc)


def load(settings: Settings) -> ServerTls | None:
    """The checked TLS files, or None when TLS_CERT_FILE is unset; ConfigError if one fails."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert_file, key_file, ca_file = (
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
    )
    cert_chain = _read("TLS_CERT_FILE", cert_file)
    private_key = _read("TLS_KEY_FILE", key_file)
    client_ca = _read("TLS_CLIENT_CA_FILE", ca_file) if ca_file is not None else None

    # The certificate file alone first, so that a failure below is the key's.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except OSError as exc:
        raise ConfigError(
            f"TLS_CERT_FILE: no PEM certificate in {cert_file} ({_detail(exc)})"
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=lambda: _encrypted_key(key_file))
    except OSError as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"TLS_KEY_FILE: the key in {key_file} does not match the certificate "
                f"in TLS_CERT_FILE {cert_file}"
            ) from None
        raise ConfigError(
            f"TLS_KEY_FILE: no usable PEM private key in {key_file} ({_detail(exc)})"
        ) from None
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except OSError as exc:
            raise ConfigError(
                f"TLS_CLIENT_CA_FILE: no PEM CA certificate in {ca_file} ({_detail(exc)})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return ServerTls(cert_file, key_file, ca_file, cert_chain, private_key, client_ca, context)


def configure_hypercorn(config: Config, tls: ServerTls | None) -> None:
    """hypercorn's own TLS on its binds (``fd://`` ones too): it builds the context."""
    if tls is None:
        return
    config.certfile = tls.cert_file
    config.keyfile = tls.key_file
    if tls.client_ca_file is not None:
        config.ca_certs = tls.client_ca_file
        config.verify_mode = ssl.CERT_REQUIRED


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials, or None without TLS (an insecure port)."""
    import grpc  # here: the admin commands never load it

    tls = load(settings)
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.mutual,
    )
