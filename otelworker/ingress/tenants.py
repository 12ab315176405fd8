"""Who may send, and whose data it is: bearer tokens, tenant names, per-tenant limits.

:class:`TokenFile` checks ``Authorization: Bearer`` against AUTH_TOKENS_FILE (one
``tenant token-or-sha256:hex`` per line) and names the token's tenant. :class:`Tenants`
keeps each tenant's state: its limits (the settings, overridden per tenant by
TENANT_LIMITS_FILE), its request and byte buckets, and its metric label (at most
METRICS_MAX_TENANTS distinct ones, then ``other``). Both files are re-read when they
change (checked by ``stat`` on use), so a token is rotated or a limit changed without a
restart; a file that no longer parses leaves the last good one in force, and says so.

Nothing here logs a token, or a line of the token file: a malformed line is named by
its number only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict
from dataclasses import dataclass, fields, replace

import orjson

from otelworker.config_file import Watched as _Watched
from otelworker.ingress.admission import ByteBucket, TokenBucket
from otelworker.settings import TENANT_PATTERN, AuthMode, Settings

_TENANT = re.compile(TENANT_PATTERN)
OTHER = "other"  # the metric label of tenants past METRICS_MAX_TENANTS
_MAX_TRACKED = 10_000  # tenants whose buckets are kept (least recently seen evicted)


def valid_tenant(name: str) -> bool:
    return _TENANT.fullmatch(name) is not None


# --- tokens ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    digest: bytes  # sha256 of the token
    tenant: str


def parse_tokens(data: bytes) -> tuple[_Token, ...]:
    """``tenant token`` or ``tenant sha256:<64 hex>`` per line; ``#`` comments, blanks."""
    tokens: list[_Token] = []
    seen: dict[bytes, str] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"line {number}: expected 'tenant token' (two fields)")
        tenant, secret = parts
        if not valid_tenant(tenant):
            raise ValueError(f"line {number}: invalid tenant name (must match {TENANT_PATTERN})")
        if not secret.isascii() or not secret.isprintable():
            # A header carries visible ASCII only (RFC 6750's b64token is narrower still).
            raise ValueError(f"line {number}: a token is visible ASCII characters only")
        if secret.startswith("sha256:"):
            try:
                digest = bytes.fromhex(secret[7:])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"line {number}: sha256: needs 64 hex digits")
        else:
            digest = hashlib.sha256(secret.encode()).digest()
        if seen.get(digest, tenant) != tenant:
            raise ValueError(f"line {number}: the same token is given to two tenants")
        seen[digest] = tenant
        tokens.append(_Token(digest, tenant))
    return tuple(tokens)


class TokenFile:
    """AUTH_TOKENS_FILE: which bearer token names which tenant."""

    def __init__(self, path: str) -> None:
        self._file = _Watched(path, "AUTH_TOKENS_FILE", parse_tokens)
        self._file.first_load()

    def tenant_of(self, token: str) -> str | None:
        """The tenant the token names, else None. Every entry is compared, in constant
        time (digests, ``hmac.compare_digest``), whatever matches."""
        entries: tuple[_Token, ...] = self._file.current()
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for entry in entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.tenant
        return found


# --- limits ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits; the names are the settings' names in lower case."""

    rate_limit_rps: float
    rate_limit_burst: int
    ingest_bytes_per_s: float
    ingest_burst_bytes: int
    tenant_max_backlog: int

    @classmethod
    def defaults(cls, settings: Settings) -> Limits:
        return cls(
            rate_limit_rps=settings.rate_limit_rps,
            rate_limit_burst=settings.rate_limit_burst,
            ingest_bytes_per_s=settings.ingest_bytes_per_s,
            ingest_burst_bytes=settings.ingest_burst_bytes,
            tenant_max_backlog=settings.tenant_max_backlog or settings.staging_max_backlog,
        )


_LIMIT_FIELDS = {f.name: f for f in fields(Limits)}
_POSITIVE = {"rate_limit_rps", "rate_limit_burst", "tenant_max_backlog"}


def parse_limits(data: bytes) -> dict[str, dict[str, float | int]]:
    """TENANT_LIMITS_FILE: ``{"tenant": {"rate_limit_rps": 5, ...}, ...}``, any subset."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object keyed by tenant")
    out: dict[str, dict[str, float | int]] = {}
    for tenant, overrides in document.items():
        if not valid_tenant(tenant):
            raise ValueError(f"invalid tenant name {tenant[:80]!r}")
        if not isinstance(overrides, dict):
            raise ValueError(f"{tenant}: expected an object of limits")
        checked: dict[str, float | int] = {}
        for name, value in overrides.items():
            if name not in _LIMIT_FIELDS:
                raise ValueError(
                    f"{tenant}: unknown limit {name[:80]!r} (known: {', '.join(_LIMIT_FIELDS)})"
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{tenant}.{name}: expected a number")
            if value < 0 or (name in _POSITIVE and value <= 0):
                bound = "> 0" if name in _POSITIVE else ">= 0"
                raise ValueError(f"{tenant}.{name}: must be {bound}")
            if _LIMIT_FIELDS[name].type in ("int", int):
                if value != int(value):
                    raise ValueError(f"{tenant}.{name}: expected a whole number")
                value = int(value)
            checked[name] = value
        out[tenant] = checked
    return out


# --- tenants ---------------------------------------------------------------------------


class Tenant:
    """One tenant's state in this process."""

    __slots__ = ("bytes", "generation", "label", "limits", "name", "requests")

    def __init__(self, name: str, label: str, limits: Limits, generation: int) -> None:
        self.name = name
        self.label = label
        self.generation = generation
        self.limits = limits
        self.requests = TokenBucket(limits.rate_limit_rps, limits.rate_limit_burst)
        self.bytes: ByteBucket | None = None
        self._set_bytes(limits)

    def _set_bytes(self, limits: Limits) -> None:
        if limits.ingest_bytes_per_s > 0:
            burst = limits.ingest_burst_bytes or max(1, int(limits.ingest_bytes_per_s))
            if self.bytes is not None:
                self.bytes.reconfigure(limits.ingest_bytes_per_s, burst)
            else:
                self.bytes = ByteBucket(limits.ingest_bytes_per_s, burst)
        else:
            self.bytes = None

    def update(self, limits: Limits, generation: int) -> None:
        """New limits from a re-read file: the buckets keep their level, capped."""
        self.generation = generation
        if limits == self.limits:
            return
        old = self.limits
        self.limits = limits
        if (limits.rate_limit_rps, limits.rate_limit_burst) != (
            old.rate_limit_rps,
            old.rate_limit_burst,
        ):
            self.requests.reconfigure(limits.rate_limit_rps, limits.rate_limit_burst)
        if (limits.ingest_bytes_per_s, limits.ingest_burst_bytes) != (
            old.ingest_bytes_per_s,
            old.ingest_burst_bytes,
        ):
            self._set_bytes(limits)


class Tenants:
    """Tenant names to their state; the limits file; the bounded metric labels."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.defaults = Limits.defaults(settings)
        self.tokens = (
            TokenFile(settings.auth_tokens_file)
            if settings.auth_mode is AuthMode.BEARER and settings.auth_tokens_file
            else None
        )
        self._limits: _Watched | None = None
        if settings.tenant_limits_file:
            self._limits = _Watched(settings.tenant_limits_file, "TENANT_LIMITS_FILE", parse_limits)
            self._limits.first_load()
        self._known: OrderedDict[str, Tenant] = OrderedDict()
        self._labels: dict[str, str] = {}
        self.max_labels = settings.metrics_max_tenants
        self.header = settings.tenant_header.lower()

    def label(self, name: str) -> str:
        """The tenant's metric label: its name for the first METRICS_MAX_TENANTS, else other."""
        label = self._labels.get(name)
        if label is None:
            label = name if len(self._labels) < self.max_labels else OTHER
            if label != OTHER:
                self._labels[name] = label
        return label

    def limits_of(self, name: str, overrides: dict[str, dict[str, float | int]] | None) -> Limits:
        if overrides and name in overrides:
            return replace(self.defaults, **overrides[name])  # type: ignore[arg-type]
        return self.defaults

    def get(self, name: str) -> Tenant:
        """The tenant's state (made on first sight); the caller has validated ``name``."""
        generation = 0
        overrides = None
        if self._limits is not None:
            overrides = self._limits.current()
            generation = self._limits.generation
        tenant = self._known.get(name)
        if tenant is None:
            tenant = Tenant(name, self.label(name), self.limits_of(name, overrides), generation)
            self._known[name] = tenant
            if len(self._known) > _MAX_TRACKED:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(name)
            if tenant.generation != generation:
                tenant.update(self.limits_of(name, overrides), generation)
        return tenant
