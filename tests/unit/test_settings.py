"""Settings: bare and OTEL_-prefixed keys, the .env file, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from otelworker.exceptions import ConfigError
from otelworker.settings import (
    Compression,
    MiB,
    OverflowPolicy,
    Role,
    Settings,
    env_key,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No stray setting from the calling shell, and no .env but the test's own."""
    for name in Settings.model_fields:
        for key in (env_key(name), f"OTEL_{env_key(name)}"):
            monkeypatch.delenv(key, raising=False)
            monkeypatch.delenv(key.lower(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults() -> None:
    s = load_settings()
    assert s.role is Role.ALL
    assert s.host == "0.0.0.0"
    assert s.port == 4318
    assert s.max_request_body_bytes == 16 * MiB
    assert s.db_pool_max_size == 10
    assert s.group_commit_max_items == 256
    assert s.overflow_policy is OverflowPolicy.REJECT
    assert s.s3_compression is Compression.GZIP
    assert s.database_url is None
    assert s.dsn is None


@pytest.mark.parametrize("prefix", ["", "OTEL_"])
def test_keys_work_bare_or_prefixed(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    monkeypatch.setenv(f"{prefix}DATABASE_URL", "postgresql://u:p@db:5432/otel")
    monkeypatch.setenv(f"{prefix}PORT", "9999")
    monkeypatch.setenv(f"{prefix}HOST", "127.0.0.1")
    monkeypatch.setenv(f"{prefix}MAX_REQUEST_BODY_BYTES", "2048")
    monkeypatch.setenv(f"{prefix}DB_POOL_MAX_SIZE", "3")
    monkeypatch.setenv(f"{prefix}DB_POOL_MIN_SIZE", "1")
    monkeypatch.setenv(f"{prefix}GROUP_COMMIT_MAX_ITEMS", "17")
    monkeypatch.setenv(f"{prefix}ROLE", "ingress")
    monkeypatch.setenv(f"{prefix}OVERFLOW_POLICY", "drop")
    monkeypatch.setenv(f"{prefix}ENABLE_RATE_LIMITING", "true")

    s = load_settings()

    assert s.dsn == "postgresql://u:p@db:5432/otel"
    assert s.port == 9999
    assert s.host == "127.0.0.1"
    assert s.max_request_body_bytes == 2048
    assert (s.db_pool_min_size, s.db_pool_max_size) == (1, 3)
    assert s.group_commit_max_items == 17
    assert s.role is Role.INGRESS
    assert s.runs_ingress and not s.runs_worker
    assert s.overflow_policy is OverflowPolicy.DROP
    assert s.enable_rate_limiting is True


def test_prefixed_key_wins_over_bare(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1111")
    monkeypatch.setenv("OTEL_PORT", "2222")
    assert load_settings().port == 2222


def test_keys_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("otel_port", "3333")
    assert load_settings().port == 3333


def test_dotenv_file(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    (clean_env / ".env").write_text(
        "# a comment\n"
        "DATABASE_URL=postgresql://from-dotenv/db\n"
        "OTEL_MAX_REQUEST_BODY_BYTES=4096\n"
        "PORT=5555\n"
        "SOMETHING_UNRELATED=1\n"
    )
    s = load_settings()
    assert s.dsn == "postgresql://from-dotenv/db"
    assert s.max_request_body_bytes == 4096
    assert s.port == 5555

    # The environment wins over the file.
    monkeypatch.setenv("PORT", "6666")
    assert load_settings().port == 6666


def test_dotenv_invalid_value_names_the_key(clean_env: Path) -> None:
    (clean_env / ".env").write_text("OTEL_OVERFLOW_POLICY=sometimes\n")
    with pytest.raises(ConfigError, match="OVERFLOW_POLICY"):
        load_settings()


def test_keyword_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1111")
    assert load_settings(port=2345).port == 2345


def test_asyncpg_driver_prefix_is_normalised() -> None:
    s = load_settings(database_url="postgresql+asyncpg://u@h/db")
    assert s.dsn == "postgresql://u@h/db"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PORT", "0"),
        ("PORT", "70000"),
        ("PORT", "http"),
        ("MAX_REQUEST_BODY_BYTES", "1"),
        ("MAX_REQUEST_BODY_BYTES", "lots"),
        ("OVERFLOW_POLICY", "foo"),
        ("ROLE", "everything"),
        ("DB_POOL_MAX_SIZE", "0"),
        ("GROUP_COMMIT_MAX_ITEMS", "0"),
        ("GROUP_COMMIT_WORKERS", "-1"),
        ("OVERFLOW_SAMPLE_RATE", "1.5"),
        ("LOG_LEVEL", "LOUD"),
        ("S3_COMPRESSION", "brotli"),
        ("ENABLE_RATE_LIMITING", "perhaps"),
    ],
)
@pytest.mark.parametrize("prefix", ["", "OTEL_"])
def test_invalid_value_raises_config_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, prefix: str, key: str, value: str
) -> None:
    monkeypatch.setenv(prefix + key, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert key in message
    # The bare key is named, whichever spelling the operator used.
    assert f"OTEL_{key}" not in message
    assert value in message


def test_error_says_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERFLOW_POLICY", "foo")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    for allowed in ("reject", "drop", "sample"):
        assert allowed in str(caught.value)

    monkeypatch.setenv("OVERFLOW_POLICY", "reject")
    monkeypatch.setenv("MAX_REQUEST_BODY_BYTES", "1")
    with pytest.raises(ConfigError, match="1024"):
        load_settings()


def test_every_invalid_key_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "0")
    monkeypatch.setenv("OTEL_OVERFLOW_POLICY", "foo")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "PORT" in str(caught.value)
    assert "OVERFLOW_POLICY" in str(caught.value)


def test_invalid_keyword_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match="PORT"):
        load_settings(port=0)


def test_relation_between_keys_is_checked() -> None:
    with pytest.raises(ConfigError, match="DB_POOL_MIN_SIZE"):
        load_settings(db_pool_min_size=5, db_pool_max_size=2)
    with pytest.raises(ConfigError, match="RETRY_BACKOFF_INITIAL_MS"):
        load_settings(retry_backoff_initial_ms=10, retry_backoff_max_ms=5)


def test_secret_values_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "very-secret-key")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@db/otel")
    s = load_settings()
    assert "very-secret-key" not in repr(s) and "hunter2" not in repr(s)
    assert s.s3_secret_access_key is not None
    assert s.s3_secret_access_key.get_secret_value() == "very-secret-key"


def test_configerror_is_raised_not_validation_error() -> None:
    # The CLI catches ConfigError; a raw pydantic ValidationError would be a traceback.
    with pytest.raises(ConfigError):
        load_settings(overflow_policy="nope")


def test_compactor_role_and_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(role="compactor")
    assert s.role is Role.COMPACTOR
    assert (s.compact_grace_s, s.compact_target_bytes, s.compact_interval_s) == (
        300.0,
        128 * MiB,
        60.0,
    )
    assert not s.runs_ingress and not s.runs_worker and not s.runs_forwarder
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"ROLE=compactor needs pyarrow.*'parquet' extra"):
        load_settings(role="compactor")
    load_settings(role="worker")  # other roles do not need it
