"""Settings: read once from the environment (and `.env`) into one object, passed down.

Every key works bare or with the ``OTEL_`` prefix: ``DATABASE_URL`` or
``OTEL_DATABASE_URL`` (the prefixed form wins when both are set).
"""

from __future__ import annotations

import enum
import importlib.util
from typing import Any

from pydantic import (
    AliasChoices,
    AliasGenerator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from otelworker.exceptions import ConfigError

MiB = 1024 * 1024
# A tenant's name goes into object keys and directory names: no '/', no '..', no spaces.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SECRET_KEYS = frozenset({"DATABASE_URL", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"})


def env_key(field_name: str) -> str:
    """The environment key of a settings field (``database_url`` -> ``DATABASE_URL``)."""
    return field_name.upper()


def _aliases(field_name: str) -> AliasChoices:
    key = env_key(field_name)
    return AliasChoices(f"OTEL_{key}", key, field_name)


class Role(enum.StrEnum):
    ALL = "all"
    INGRESS = "ingress"
    WORKER = "worker"
    FORWARDER = "forwarder"
    COMPACTOR = "compactor"


class OverflowPolicy(enum.StrEnum):
    REJECT = "reject"
    DROP = "drop"
    SAMPLE = "sample"


class AuthMode(enum.StrEnum):
    NONE = "none"
    BEARER = "bearer"


class Compression(enum.StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
        alias_generator=AliasGenerator(validation_alias=_aliases),
        use_enum_values=False,
        validate_default=True,
    )

    # --- service -------------------------------------------------------------
    role: Role = Role.ALL
    host: str = "0.0.0.0"
    port: int = Field(4318, ge=1, le=65535)
    # OTLP/gRPC: on under `python -m otelworker serve` unless false; off under a bare
    # `hypercorn otelworker.app:app` unless true (see docs/configuration.md).
    grpc_enabled: bool | None = None
    grpc_port: int = Field(4317, ge=0, le=65535)
    log_level: str = Field("INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_aggregation_window_s: float = Field(1.0, ge=0.0, le=60.0)
    shutdown_grace_s: float = Field(10.0, ge=0.0, le=600.0)
    readiness_drain_delay_s: float = Field(0.0, ge=0.0, le=120.0)
    processes: int = Field(1, ge=1, le=64)
    # The HTTP front of `serve` against slow and idle clients (docs/configuration.md,
    # "Slow and idle clients"): a head's deadline, a body's time and minimum rate, the
    # idle keep-alive timeout, and the cap on open connections (0: from RLIMIT_NOFILE).
    http_header_timeout_s: float = Field(20.0, gt=0.0, le=600.0)
    http_body_timeout_s: float = Field(20.0, gt=0.0, le=3600.0)
    http_body_min_rate_bytes: int = Field(500, ge=1, le=1024 * MiB)
    http_keep_alive_timeout_s: float = Field(75.0, ge=1.0, le=3600.0)
    http_max_connections: int = Field(0, ge=0, le=10_000_000)

    # --- database ------------------------------------------------------------
    database_url: SecretStr | None = None
    embedded_db_dir: str = "./.otelworker/pgdata"
    db_pool_min_size: int = Field(2, ge=0, le=1000)
    db_pool_max_size: int = Field(10, ge=1, le=1000)
    db_connect_timeout_s: float = Field(5.0, gt=0.0, le=300.0)
    db_startup_timeout_s: float = Field(30.0, ge=0.0, le=3600.0)
    # Readiness fails unless a commit waits for a synchronous standby (the 2xx survives a
    # failover): docs/deploy.md, high availability.
    require_synchronous_replica: bool = False

    # --- ingress ---------------------------------------------------------------
    max_request_body_bytes: int = Field(16 * MiB, ge=1024, le=1024 * MiB)
    max_inflight_bytes: int = Field(256 * MiB, ge=0, le=64 * 1024 * MiB)
    group_commit_max_items: int = Field(256, ge=1, le=100_000)
    group_commit_max_bytes: int = Field(32 * MiB, ge=1024, le=4096 * MiB)
    group_commit_workers: int = Field(2, ge=1, le=64)
    staging_commit_timeout_s: float = Field(10.0, gt=0.0, le=600.0)
    unavailable_retry_after_s: int = Field(5, ge=1, le=3600)

    # --- who may send, and whose data it is (docs/security.md) ------------------------
    auth_mode: AuthMode = AuthMode.NONE
    auth_tokens_file: str | None = None
    tenant_header: str = Field("X-Scope-OrgID", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    default_tenant: str = Field("default", pattern=TENANT_PATTERN)
    require_tenant: bool = False
    tenant_limits_file: str | None = None
    metrics_max_tenants: int = Field(100, ge=1, le=100_000)

    # --- TLS (python -m otelworker serve) ----------------------------------------------
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None

    # --- rate limiting (pre-staging; every tenant's defaults) ---------------------------
    enable_rate_limiting: bool = False
    rate_limit_rps: float = Field(100.0, gt=0.0)
    rate_limit_burst: int = Field(200, ge=1)
    ingest_bytes_per_s: float = Field(0.0, ge=0.0)
    ingest_burst_bytes: int = Field(0, ge=0)

    # --- staging capacity ------------------------------------------------------------
    staging_max_backlog: int = Field(1000, ge=1)
    tenant_max_backlog: int | None = Field(None, ge=1)
    overflow_policy: OverflowPolicy = OverflowPolicy.REJECT
    overflow_sample_rate: float = Field(0.1, ge=0.0, le=1.0)
    overflow_sample_seed: int | None = None
    backlog_refresh_interval_ms: int = Field(500, ge=10, le=60_000)
    saturated_retry_after_s: int = Field(1, ge=1, le=3600)

    # --- processing ------------------------------------------------------------------
    # Room for two full batches of BATCH_MAX_SIZE small items, one filling while one
    # uploads, below STAGING_MAX_BACKLOG's default, which counts them (the bytes bound
    # below binds first for large ones).
    processing_queue_max_depth: int = Field(800, ge=1, le=1_000_000)
    processing_queue_max_bytes: int = Field(256 * MiB, ge=1024, le=64 * 1024 * MiB)
    poll_interval_ms: int = Field(500, ge=1, le=600_000)
    lease_timeout_s: float = Field(30.0, ge=1.0, le=86_400.0)
    # Per-object costs (the PUT, the manifest row, the delete statement) are paid per
    # batch: 400 small items per object (issue 22, docs/performance.md);
    # BATCH_MAX_BYTES of staged bytes caps a batch of large ones.
    batch_max_size: int = Field(400, ge=1, le=100_000)
    batch_max_bytes: int = Field(8 * MiB, ge=1024, le=4096 * MiB)
    batch_flush_interval_ms: int = Field(200, ge=1, le=3_600_000)
    worker_concurrency: int = Field(4, ge=1, le=256)
    max_attempts: int = Field(10, ge=1, le=1000)
    retry_backoff_initial_ms: int = Field(1000, ge=1)
    retry_backoff_max_ms: int = Field(60_000, ge=1)
    queue_vacuum_interval_s: float = Field(10.0, ge=0.0, le=86_400.0)

    # --- object storage --------------------------------------------------------------
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "otel"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_force_path_style: bool = False
    s3_create_bucket: bool = False
    s3_compression: Compression = Compression.GZIP
    s3_compression_level: int | None = Field(None, ge=0, le=22)
    s3_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    local_object_dir: str = "./.otelworker/objects"

    # --- forwarding (docs/forwarding.md) -----------------------------------------------
    destinations_file: str | None = None
    forward_lease_s: float = Field(60.0, ge=1.0, le=86_400.0)
    forward_backoff_max_s: float = Field(300.0, ge=1.0, le=86_400.0)
    forward_cache_bytes: int = Field(64 * MiB, ge=0, le=64 * 1024 * MiB)
    forward_poll_interval_s: float = Field(5.0, ge=0.05, le=3600.0)

    # --- compaction: the archive's Parquet copy (docs/query.md) -------------------------
    # A manifest row is compacted once it is this old (its window closed: late commits and
    # clock skew have passed).
    compact_grace_s: float = Field(300.0, ge=0.0, le=7 * 86_400.0)
    # About this many raw (uncompressed protobuf) bytes of objects per Parquet file.
    compact_target_bytes: int = Field(128 * MiB, ge=1024, le=16 * 1024 * MiB)
    compact_interval_s: float = Field(60.0, gt=0.0, le=86_400.0)

    # --- query (docs/query.md) ---------------------------------------------------------
    query_cache_dir: str = "./.otelworker/query-cache"
    query_cache_bytes: int = Field(1024 * MiB, ge=MiB, le=1024 * 1024 * MiB)
    # Refuse `query` and `verify` without a tenant's token (OTELWORKER_TOKEN, --token-file).
    query_require_token: bool = False

    @field_validator(
        "database_url",
        "s3_endpoint_url",
        "s3_bucket",
        "s3_access_key_id",
        "s3_secret_access_key",
        "overflow_sample_seed",
        "auth_tokens_file",
        "tenant_limits_file",
        "tenant_max_backlog",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "destinations_file",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        """``DATABASE_URL=`` means unset (as in most .env files), not an empty DSN."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError(
                "DB_POOL_MIN_SIZE must not exceed DB_POOL_MAX_SIZE "
                f"({self.db_pool_min_size} > {self.db_pool_max_size})"
            )
        if self.retry_backoff_initial_ms > self.retry_backoff_max_ms:
            raise ValueError(
                "RETRY_BACKOFF_INITIAL_MS must not exceed RETRY_BACKOFF_MAX_MS "
                f"({self.retry_backoff_initial_ms} > {self.retry_backoff_max_ms})"
            )
        if self.auth_mode is AuthMode.BEARER and self.auth_tokens_file is None:
            raise ValueError("AUTH_TOKENS_FILE must be set when AUTH_MODE=bearer")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        if self.role is Role.FORWARDER and self.destinations_file is None:
            raise ValueError("ROLE=forwarder needs DESTINATIONS_FILE")
        if self.role is Role.COMPACTOR and importlib.util.find_spec("pyarrow") is None:
            raise ValueError(
                "ROLE=compactor needs pyarrow: install the 'parquet' extra"
                " (pip install 'otelworker[parquet]')"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def compression_level(self) -> int:
        """S3_COMPRESSION_LEVEL, or the fast default: gzip 0 (ISA-L's fastest level, which
        compresses; zlib's 0 would store), zstd 3 (its 0 means the same)."""
        if self.s3_compression_level is not None:
            if self.s3_compression is Compression.GZIP:
                return min(self.s3_compression_level, 9)
            return self.s3_compression_level
        return 0 if self.s3_compression is Compression.GZIP else 3

    @property
    def dsn(self) -> str | None:
        if self.database_url is None:
            return None
        url = self.database_url.get_secret_value()
        for driver in ("postgresql+asyncpg://", "postgres+asyncpg://"):
            if url.startswith(driver):
                url = "postgresql://" + url[len(driver) :]
        return url

    @property
    def runs_ingress(self) -> bool:
        return self.role in (Role.ALL, Role.INGRESS)

    @property
    def runs_worker(self) -> bool:
        return self.role in (Role.ALL, Role.WORKER)

    @property
    def runs_forwarder(self) -> bool:
        """ROLE=forwarder, and ROLE=all or worker when DESTINATIONS_FILE is set."""
        if self.role is Role.FORWARDER:
            return True
        return self.runs_worker and self.destinations_file is not None


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    message = str(error.get("msg", "invalid value"))
    if not loc:
        return message.removeprefix("Value error, ")
    key = env_key(loc[0]).removeprefix("OTEL_")
    if key in SECRET_KEYS:
        return f"{key}: {message}"
    return f"{key}: {message} (got {error.get('input')!r})"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; an invalid value raises ConfigError naming the key."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        details = "; ".join(_describe(e) for e in exc.errors())  # type: ignore[arg-type]
        raise ConfigError(f"invalid setting {details}") from None
