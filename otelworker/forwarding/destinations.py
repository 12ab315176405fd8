"""DESTINATIONS_FILE: where archived objects are forwarded, and which of them.

The file (YAML, or JSON: the same shape) is a list under ``destinations``::

    destinations:
      - name: tempo                      # [a-z0-9_-]{1,64}, unique
        endpoint: http://tempo:4318      # http/protobuf: POST {endpoint}/v1/{signal}
        protocol: http/protobuf          # or grpc (endpoint host:port, or http(s)://host:port)
        signals: [traces]                # default: all three
        tenants: [team-a, team-b]        # default: all
        headers: {Authorization: "Bearer ${TEMPO_TOKEN}"}   # ${VAR} from the environment
        tenant_header: X-Scope-OrgID     # default; "" sends none; value = the object's tenant
        compression: gzip                # gzip (default) or none
        timeout_s: 10
        max_request_bytes: 4194304       # objects are split along resources to fit
        concurrency: 4
        tls: {ca_file: ..., cert_file: ..., key_file: ..., insecure_skip_verify: false}
        traces_endpoint: https://...     # http/protobuf: a signal's full URL (Loki, Mimir)
        gzip_members: one                # one (default) or many: see below

Everything is checked at load: an unknown key (a typo) is an error, as is a key given
twice, a ``${VAR}`` whose variable is unset (named), a TLS file that does not load. The
error names the file and the entry (``destinations[1] (loki): ...``) and never a header
value: a :class:`Destination`'s ``repr`` leaves its headers out, and a YAML or JSON
syntax error is reported by line and column, without the line's text.

gRPC: the endpoint is ``host:port`` (TLS when ``tls`` is given) or ``http://host:port``
(plain) or ``https://host[:port]`` (TLS); ``urls`` maps every signal to the channel's
target ``host:port``, and ``tls`` is not None exactly when the channel uses TLS.
HTTP: TLS is the URL's scheme's; ``tls`` configures the https URLs.

``gzip_members`` (HTTP with gzip) matters only for objects written before joinable
members (otelworker/gzjoin.py; those written since are one gzip member, indexed, and go
as stored): such an object is as many gzip members back to back as the flush joined
payloads. RFC 1952 makes that one valid gzip body, and Go's reader (the Collector,
Tempo, Loki, Mimir, Jaeger) and otelworker read every member: ``many`` sends them as
stored. But some receivers read only the first member and drop the rest while answering
200 (rotel does: Rust's single-member ``GzDecoder``), so the default, ``one``, compresses
such an object again as one member (ISA-L: about half a microsecond per span).

:class:`DestinationsFile` re-reads the file when it changes (checked at most once a
second); a version that does not load leaves the last good one in force and logs one
``config_file_reload_failed``.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

# No stubs in the lint extra (types-PyYAML): Any here, either way.
import yaml  # type: ignore[import-untyped, unused-ignore]

from otelworker.config_file import Watched
from otelworker.exceptions import ConfigError
from otelworker.settings import TENANT_PATTERN

SIGNALS = ("traces", "metrics", "logs")
PROTOCOLS = ("http/protobuf", "grpc")
COMPRESSIONS = ("gzip", "none")
GZIP_MEMBERS = ("one", "many")
SETTING = "DESTINATIONS_FILE"

DEFAULT_TENANT_HEADER = "X-Scope-OrgID"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_CONCURRENCY = 4
MAX_TIMEOUT_S = 3600.0
MAX_REQUEST_BYTES_LIMIT = 256 * 1024 * 1024
MAX_CONCURRENCY = 256

_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_TENANT = re.compile(TENANT_PATTERN)
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_GRPC_KEY = re.compile(r"[0-9a-z_.-]+")
# ${NAME} is the variable's value, $$ a literal $; any other ${ is an error.
_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_ENDPOINT_KEYS = {signal: f"{signal}_endpoint" for signal in SIGNALS}
_KEYS = frozenset(
    {
        "name",
        "endpoint",
        "protocol",
        "signals",
        "tenants",
        "headers",
        "tenant_header",
        "compression",
        "timeout_s",
        "max_request_bytes",
        "concurrency",
        "tls",
        "gzip_members",
        *_ENDPOINT_KEYS.values(),
    }
)
_TLS_KEYS = frozenset({"ca_file", "cert_file", "key_file", "insecure_skip_verify"})
# Headers otelworker sets itself (HTTP), and what gRPC reserves for its own metadata.
_RESERVED_HTTP = frozenset(
    {"content-type", "content-encoding", "content-length", "transfer-encoding", "host"}
)
_RESERVED_GRPC = frozenset({"content-type", "te", "host", "user-agent", "connection"})


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Client TLS: the CA to verify the destination by (None: the system's), a client
    certificate and key (mutual TLS), or no verification at all (HTTP only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class Destination:
    """One checked entry of DESTINATIONS_FILE. Its ``repr`` leaves the headers out."""

    name: str
    protocol: str  # "http/protobuf" | "grpc"
    endpoint: str  # as given ("" when every wanted signal has its own URL)
    # http/protobuf: signal -> the full URL; grpc: signal -> the target "host:port".
    urls: Mapping[str, str]
    signals: frozenset[str]
    tenants: frozenset[str] | None  # None: every tenant
    headers: Mapping[str, str] = field(repr=False)  # ${VAR}s expanded; secrets
    tenant_header: str = DEFAULT_TENANT_HEADER  # "": none
    compression: str = "gzip"  # "gzip" | "none"
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    concurrency: int = DEFAULT_CONCURRENCY
    tls: TlsConfig | None = None
    # HTTP with gzip: "one" sends every body as one gzip member (an archived object of
    # several, as the flush joins them, is compressed again as one); "many" sends objects
    # as stored, several members back to back (RFC 1952 allows it; not every receiver
    # reads past the first: rotel drops the rest, and says 200).
    gzip_members: str = "one"

    def wants(self, signal: str, tenant: str) -> bool:
        """Whether an object of this signal and tenant goes to this destination."""
        return signal in self.signals and (self.tenants is None or tenant in self.tenants)

    @property
    def header_names(self) -> tuple[str, ...]:
        """The configured headers' names (their values are never shown)."""
        return tuple(self.headers)


class _Invalid(Exception):
    """What is wrong with an entry (the caller names the file and the entry)."""


def _fail(what: str) -> NoReturn:
    raise _Invalid(what)


# --- the document -------------------------------------------------------------------


class _Loader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """safe_load, but a key given twice in a mapping is an error (not the last one wins)."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping says so
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=True)
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice")
        out[key] = value
    return out


def _document(data: bytes, source: str) -> Any:
    where = f"{SETTING} {source}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    if text.lstrip()[:1] in ("{", "["):
        # JSON: its own parser, for its own error messages (line and column).
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as exc:
        # Never the offending line itself: it may hold a header value.
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "invalid"
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {problem}{at}") from None


def parse_destinations(
    data: bytes, source: str, environ: Mapping[str, str] | None = None
) -> list[Destination]:
    """The destinations in a DESTINATIONS_FILE's bytes (``source`` names the file in
    errors); ``${VAR}`` in header values from ``environ`` (default: the process's).
    Raises ConfigError naming the file and the entry."""
    where = f"{SETTING} {source}"
    tree = _document(data, source)
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping with the key 'destinations'")
    unknown = sorted(str(key) for key in tree if key != "destinations")
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected only 'destinations')")
    if "destinations" not in tree:
        raise ConfigError(f"{where}: no 'destinations' key")
    entries = tree["destinations"]
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'destinations' must be a list")
    env = os.environ if environ is None else environ
    out: list[Destination] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = name[:64] if isinstance(name, str) and name else "unnamed"
        try:
            destination = _destination(entry, env)
            if destination.name in seen:
                _fail(
                    f"name {destination.name!r} is already destinations[{seen[destination.name]}]'s"
                )
        except _Invalid as exc:
            raise ConfigError(f"{where}: destinations[{i}] ({label}): {exc}") from None
        seen[destination.name] = i
        out.append(destination)
    return out


def load_destinations(path: str) -> list[Destination]:
    """The destinations in the file at ``path``; ConfigError if it cannot be read or is
    not valid."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"{SETTING}: cannot read {path}: {exc.strerror or exc}") from None
    return parse_destinations(data, path)


class DestinationsFile:
    """DESTINATIONS_FILE, re-read when it changes (a ``stat`` at most every
    ``check_every_s``); an invalid new version keeps the last good one in force and logs
    one ``config_file_reload_failed``. Invalid at start: ConfigError."""

    def __init__(
        self,
        path: str,
        *,
        check_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._file = Watched(
            path,
            SETTING,
            lambda data: parse_destinations(data, path),
            check_every_s=check_every_s,
            clock=clock,
        )
        self._file.first_load()

    def current(self) -> list[Destination]:
        """The destinations now in force (the same list until the file changes: do not
        modify it)."""
        value: list[Destination] = self._file.current()
        return value

    @property
    def generation(self) -> int:
        """Bumped on every successful (re)load: a cheap "did it change" check."""
        return self._file.generation


# --- one entry ----------------------------------------------------------------------


def _destination(entry: Any, env: Mapping[str, str]) -> Destination:
    if not isinstance(entry, dict):
        _fail("must be a mapping (name, endpoint, ...)")
    for key in entry:
        if key not in _KEYS:
            _fail(f"unknown key {str(key)!r} (known: {', '.join(sorted(_KEYS))})")
    name = entry.get("name")
    if name is None:
        _fail("name: missing")
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        _fail("name: must match [a-z0-9_-]{1,64}")
    protocol = _choice(entry, "protocol", PROTOCOLS, "http/protobuf")
    signals = _signals(entry.get("signals"))
    tenants = _tenants(entry.get("tenants"))
    tenant_header = entry.get("tenant_header", DEFAULT_TENANT_HEADER)
    if not isinstance(tenant_header, str):
        _fail('tenant_header: must be a string ("" sends none)')
    if tenant_header and _HEADER_NAME.fullmatch(tenant_header) is None:
        _fail("tenant_header: not a valid header name")
    compression = _choice(entry, "compression", COMPRESSIONS, "gzip")
    timeout_s = _number(entry, "timeout_s", DEFAULT_TIMEOUT_S, 0.0, MAX_TIMEOUT_S)
    max_request_bytes = _integer(
        entry, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES, 1, MAX_REQUEST_BYTES_LIMIT
    )
    concurrency = _integer(entry, "concurrency", DEFAULT_CONCURRENCY, 1, MAX_CONCURRENCY)
    tls = _tls(entry.get("tls"), protocol)
    gzip_members = _choice(entry, "gzip_members", GZIP_MEMBERS, "one")
    if "gzip_members" in entry and (protocol != "http/protobuf" or compression != "gzip"):
        _fail("gzip_members: only for protocol http/protobuf with compression gzip")
    headers = _headers(entry.get("headers"), protocol, env)
    if protocol == "grpc":
        if tenant_header and _grpc_key_problem(tenant_header.lower()):
            _fail(f"tenant_header: {_grpc_key_problem(tenant_header.lower())}")
        endpoint, urls, tls = _grpc_endpoint(entry, signals, tls)
    else:
        endpoint, urls = _http_urls(entry, signals, tls)
    return Destination(
        name=name,
        protocol=protocol,
        endpoint=endpoint,
        urls=urls,
        signals=signals,
        tenants=tenants,
        headers=headers,
        tenant_header=tenant_header,
        compression=compression,
        timeout_s=timeout_s,
        max_request_bytes=max_request_bytes,
        concurrency=concurrency,
        tls=tls,
        gzip_members=gzip_members,
    )


def _choice(entry: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = entry.get(key, default)
    if value not in allowed:
        _fail(f"{key}: must be one of {', '.join(allowed)}")
    return str(value)


def _number(entry: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"{key}: must be a number")
    if not low < value <= high:
        _fail(f"{key}: must be more than {low:g} and at most {high:g}")
    return float(value)


def _integer(entry: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{key}: must be a whole number")
    if not low <= value <= high:
        _fail(f"{key}: must be between {low} and {high}")
    return value


def _signals(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset(SIGNALS)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(f"signals: must be a non-empty list of {', '.join(SIGNALS)} (omit it for all)")
    for signal in value:
        if signal not in SIGNALS:
            _fail(f"signals: {str(signal)!r} is not one of {', '.join(SIGNALS)}")
    return frozenset(value)


def _tenants(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail("tenants: must be a non-empty list of tenant names (omit it for all tenants)")
    for i, tenant in enumerate(value):
        if not isinstance(tenant, str):
            _fail(f"tenants[{i}]: must be a string (quote it)")
        if _TENANT.fullmatch(tenant) is None:
            _fail(f"tenants[{i}]: {tenant!r} is not a valid tenant name ({TENANT_PATTERN})")
    return frozenset(value)


def _expand(key: str, value: str, env: Mapping[str, str]) -> str:
    """``${VAR}`` from the environment, ``$$`` a literal ``$``; the error names the
    variable, never the value."""

    def one(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$$":
            return "$"
        var = match.group(1)
        if var is None:
            _fail(f"headers.{key}: '${{' that is not a ${{NAME}} reference (write $${{ for '${{')")
        if var not in env:
            _fail(f"headers.{key}: environment variable {var} is not set")
        return env[var]

    return _REFERENCE.sub(one, value)


def _grpc_key_problem(key: str) -> str | None:
    if _GRPC_KEY.fullmatch(key) is None:
        return "not a valid gRPC metadata key (0-9 a-z _ . -)"
    if key.startswith("grpc-") or key in _RESERVED_GRPC:
        return "reserved by gRPC"
    if key.endswith("-bin"):
        return "binary (-bin) metadata is not supported"
    return None


def _headers(value: Any, protocol: str, env: Mapping[str, str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail("headers: must be a mapping of header name to value")
    out: dict[str, str] = {}
    lowered: set[str] = set()
    for key, raw in value.items():
        if not isinstance(key, str) or _HEADER_NAME.fullmatch(key) is None:
            _fail(f"headers: {str(key)[:64]!r} is not a valid header name")
        if key.lower() in lowered:
            _fail(f"headers.{key}: given twice (header names ignore case)")
        lowered.add(key.lower())
        if key.lower() in _RESERVED_HTTP:
            _fail(f"headers.{key}: set by otelworker itself")
        if protocol == "grpc":
            problem = _grpc_key_problem(key.lower())
            if problem:
                _fail(f"headers.{key}: {problem}")
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            _fail(f"headers.{key}: the value must be a string")
        text = _expand(key, str(raw), env)
        if any(ch in text for ch in "\r\n\0"):
            _fail(f"headers.{key}: the value holds a line break or NUL (after ${{VAR}} expansion)")
        if protocol == "grpc" and not (text.isascii() and text.isprintable()):
            _fail(f"headers.{key}: a gRPC metadata value must be printable ASCII")
        out[key] = text
    return out


def _tls(value: Any, protocol: str) -> TlsConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail("tls: must be a mapping (ca_file, cert_file, key_file, insecure_skip_verify)")
    for key in value:
        if key not in _TLS_KEYS:
            _fail(f"tls: unknown key {str(key)!r} (known: {', '.join(sorted(_TLS_KEYS))})")
    files: dict[str, str | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        path = value.get(key)
        if path is not None and (not isinstance(path, str) or not path):
            _fail(f"tls.{key}: must be a file path")
        files[key] = path
    skip = value.get("insecure_skip_verify", False)
    if not isinstance(skip, bool):
        _fail("tls.insecure_skip_verify: must be true or false")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        _fail("tls: cert_file and key_file go together (a client certificate and its key)")
    if skip and protocol == "grpc":
        _fail(
            "tls.insecure_skip_verify: not supported with protocol grpc (grpcio cannot skip"
            " verification); give the destination's CA as tls.ca_file"
        )
    tls = TlsConfig(files["ca_file"], files["cert_file"], files["key_file"], skip)
    try:
        ssl_context(tls)
    except _Invalid:
        raise
    except (OSError, ValueError) as exc:
        _fail(f"tls: {_ssl_detail(exc)}")
    return tls


def _ssl_detail(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason).lower().replace("_", " ") if exc.reason else "not PEM"
        return f"the files do not load ({reason})"
    if isinstance(exc, OSError):
        return f"cannot read {exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _encrypted_key() -> NoReturn:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal.
    _fail("tls.key_file: the key is encrypted (passphrase-protected); give an unencrypted key")


def ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client context: the CA file's (else the system's) roots, the client
    certificate, or no verification (``insecure_skip_verify``)."""
    if tls is None:
        return ssl.create_default_context()
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_encrypted_key)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _url(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        _fail(f"{key}: must be a URL (http:// or https://)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        _fail(f"{key}: not a valid URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"{key}: must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        _fail(f"{key}: credentials in the URL are not allowed (use headers)")
    if parts.query or parts.fragment:
        _fail(f"{key}: a query or fragment is not allowed")
    return value


def _http_urls(
    entry: dict[str, Any], signals: frozenset[str], tls: TlsConfig | None
) -> tuple[str, dict[str, str]]:
    endpoint = entry.get("endpoint")
    urls: dict[str, str] = {}
    for signal, key in _ENDPOINT_KEYS.items():
        if key in entry:
            if signal not in signals:
                _fail(f"{key}: given, but {signal} is not in signals")
            urls[signal] = _url(key, entry[key])
    missing = [signal for signal in SIGNALS if signal in signals and signal not in urls]
    if endpoint is None:
        if missing:
            _fail(f"endpoint: missing (needed for {', '.join(missing)})")
        endpoint = ""
    else:
        base = _url("endpoint", endpoint).rstrip("/")
        for signal in missing:
            urls[signal] = f"{base}/v1/{signal}"
    if tls is not None and not any(url.startswith("https://") for url in urls.values()):
        _fail("tls: given, but no endpoint is https://")
    return endpoint, urls


def _grpc_endpoint(
    entry: dict[str, Any], signals: frozenset[str], tls: TlsConfig | None
) -> tuple[str, dict[str, str], TlsConfig | None]:
    for key in _ENDPOINT_KEYS.values():
        if key in entry:
            _fail(f"{key}: only for protocol http/protobuf (one gRPC endpoint serves all signals)")
    endpoint = entry.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        _fail("endpoint: missing (host:port, http://host:port or https://host:port)")
    scheme = ""
    try:
        if "://" in endpoint:
            parts = urlsplit(endpoint)
            scheme = parts.scheme
            port = parts.port
        else:
            parts = urlsplit(f"//{endpoint}")
            port = parts.port
    except ValueError:
        _fail("endpoint: not a valid host:port")
    if scheme not in ("", "http", "https"):
        _fail("endpoint: the scheme must be http:// (plain) or https:// (TLS)")
    if not parts.hostname:
        _fail("endpoint: no host")
    if parts.username is not None or parts.password is not None:
        _fail("endpoint: credentials in the endpoint are not allowed (use headers)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        _fail("endpoint: a gRPC endpoint has no path (host:port)")
    if port is None:
        if not scheme:
            _fail("endpoint: host:port needs its port (4317 is OTLP/gRPC's)")
        port = 443 if scheme == "https" else 80
    if scheme == "http" and tls is not None:
        _fail("tls: given, but the endpoint is http:// (plain); use https:// or host:port")
    if scheme == "https" and tls is None:
        tls = TlsConfig()
    host = parts.hostname
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return endpoint, {signal: target for signal in SIGNALS if signal in signals}, tls
