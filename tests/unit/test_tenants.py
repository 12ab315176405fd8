"""Tenants and bearer tokens: the token file, the limits file, tenant names, labels, identify.

Files are re-read when their (inode, size, mtime_ns) changes; every change here is made
with a new file moved into place (``os.replace``: a new inode) or an explicit
``os.utime``, so no test depends on the file system's timestamp granularity or on time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from otelworker.exceptions import ConfigError
from otelworker.ingress import tenants as tenants_module
from otelworker.ingress.admission import ByteBucket
from otelworker.ingress.intake import Intake, Kind, Refused
from otelworker.ingress.tenants import (
    OTHER,
    Limits,
    Tenant,
    Tenants,
    TokenFile,
    parse_limits,
    parse_tokens,
    valid_tenant,
)
from otelworker.settings import Settings, env_key, load_settings

TOKEN_A = "tok-A-7f3c9e1d2b"
TOKEN_A2 = "tok-A2-0a1b2c3d4e"
TOKEN_B = "tok-B-5e6f7a8b9c"
TOKEN_C = "tok-C-d4c3b2a190"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No stray setting from the calling shell, and no .env but the test's own."""
    for name in Settings.model_fields:
        for key in (env_key(name), f"OTEL_{env_key(name)}"):
            monkeypatch.delenv(key, raising=False)
            monkeypatch.delenv(key.lower(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def replace_file(path: Path, data: str | bytes) -> None:
    """Write a new file and move it into place: a new inode, so a certain change."""
    raw = data.encode() if isinstance(data, str) else data
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(raw)
    os.replace(fresh, path)


def bump_mtime(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def sha(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def record_text(record: logging.LogRecord) -> str:
    """Everything a record would put on a log line: the message and every field."""
    return record.getMessage() + " " + " ".join(repr(v) for v in record.__dict__.values())


# --- parse_tokens -----------------------------------------------------------------------


def test_parse_tokens_plain_entry_is_stored_as_its_digest() -> None:
    (entry,) = parse_tokens(f"team-a {TOKEN_A}\n".encode())
    assert entry.tenant == "team-a"
    assert entry.digest == sha(TOKEN_A)
    assert TOKEN_A not in repr(entry)  # only the digest is kept


@pytest.mark.parametrize("case", [str.lower, str.upper])
def test_parse_tokens_sha256_entry(case: Any) -> None:
    digest = sha(TOKEN_B)
    (entry,) = parse_tokens(f"team-b sha256:{case(digest.hex())}".encode())
    assert entry.tenant == "team-b"
    assert entry.digest == digest


def test_parse_tokens_comments_blank_lines_and_whitespace() -> None:
    data = (
        "# tokens for the collectors\n"
        "\n"
        "   \n"
        f"  team-a   {TOKEN_A}  \n"
        "\t# an indented comment\n"
        f"team-b\t{TOKEN_B}\r\n"
        "# the end, no newline after it"
    ).encode()
    entries = parse_tokens(data)
    assert [(e.tenant, e.digest) for e in entries] == [
        ("team-a", sha(TOKEN_A)),
        ("team-b", sha(TOKEN_B)),
    ]


def test_parse_tokens_empty_file_or_only_comments() -> None:
    assert parse_tokens(b"") == ()
    assert parse_tokens(b"# nobody yet\n\n") == ()


def test_parse_tokens_a_tenant_with_two_tokens() -> None:
    data = f"a {TOKEN_A}\nb {TOKEN_B}\na sha256:{sha(TOKEN_A2).hex()}\n".encode()
    entries = parse_tokens(data)
    assert [(e.tenant, e.digest) for e in entries] == [
        ("a", sha(TOKEN_A)),
        ("b", sha(TOKEN_B)),
        ("a", sha(TOKEN_A2)),
    ]


def test_parse_tokens_the_same_token_twice_for_one_tenant_is_allowed() -> None:
    data = f"a {TOKEN_A}\na sha256:{sha(TOKEN_A).hex()}\n".encode()
    assert {e.tenant for e in parse_tokens(data)} == {"a"}


SECRET = "s3cr3t-T0KEN-must-not-leak"
BAD_HEX = "zz" * 32  # 64 characters, not hex
SHORT_HEX = sha(SECRET).hex()[:40]
LONG_HEX = sha(SECRET).hex() + "ab"

MALFORMED_TOKENS = [
    pytest.param(f"{SECRET}\n", 1, SECRET, id="one-field"),
    pytest.param(f"a {SECRET} extra\n", 1, SECRET, id="three-fields"),
    pytest.param(f"a {SECRET} # trailing comment\n", 1, SECRET, id="trailing-comment"),
    pytest.param(f"../x {SECRET}\n", 1, SECRET, id="tenant-dotdot-slash"),
    pytest.param(f"a/b {SECRET}\n", 1, SECRET, id="tenant-slash"),
    pytest.param(f".hidden {SECRET}\n", 1, SECRET, id="tenant-leading-dot"),
    pytest.param(f"{'t' * 65} {SECRET}\n", 1, SECRET, id="tenant-too-long"),
    pytest.param(f"tëam {SECRET}\n", 1, SECRET, id="tenant-unicode"),
    pytest.param(f"a sha256:{BAD_HEX}\n", 1, BAD_HEX, id="bad-hex"),
    pytest.param(f"a sha256:{SHORT_HEX}\n", 1, SHORT_HEX, id="short-hex"),
    pytest.param(f"a sha256:{LONG_HEX}\n", 1, LONG_HEX, id="long-hex"),
    pytest.param("a sha256:\n", 1, SECRET, id="empty-hex"),
    pytest.param(f"a {SECRET}\nb {SECRET}\n", 2, SECRET, id="same-token-two-tenants"),
    pytest.param(
        f"a sha256:{sha(SECRET).hex()}\nb {SECRET}\n", 2, SECRET, id="same-token-as-digest"
    ),
    pytest.param(
        f"# header\n\na {TOKEN_A}\n# more\nb {SECRET} x\n", 5, SECRET, id="numbered-in-file"
    ),
]


@pytest.mark.parametrize(("data", "line", "secret"), MALFORMED_TOKENS)
def test_parse_tokens_malformed_line_names_the_line_not_the_token(
    data: str, line: int, secret: str
) -> None:
    with pytest.raises(ValueError) as caught:
        parse_tokens(data.encode())
    message = str(caught.value)
    assert f"line {line}:" in message
    assert secret not in message
    assert SECRET not in message
    assert TOKEN_A not in message
    # Nothing chained that a traceback would print either.
    assert caught.value.__cause__ is None


def test_parse_tokens_not_utf8() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_tokens(b"a \xff\xfe\n")


# --- TokenFile ------------------------------------------------------------------------


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# tokens\na {TOKEN_A}\nb sha256:{sha(TOKEN_B).hex()}\n")
    return path


def test_token_file_tenant_of(token_path: Path) -> None:
    tokens = TokenFile(str(token_path))
    assert tokens.tenant_of(TOKEN_A) == "a"
    assert tokens.tenant_of(TOKEN_B) == "b"  # given as its sha256
    for wrong in (
        "",
        "wrong",
        TOKEN_A.upper(),
        TOKEN_A[:-1],
        TOKEN_A + "x",
        " " + TOKEN_A,
        sha(TOKEN_B).hex(),  # the digest is not the token
        f"sha256:{sha(TOKEN_B).hex()}",
        "a",  # the tenant's name is not a token
        "\udcff",  # a lone surrogate does not crash the comparison
    ):
        assert tokens.tenant_of(wrong) is None, wrong


def test_token_file_removed_line_stops_working_without_restart(
    token_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    tokens = TokenFile(str(token_path))
    assert tokens.tenant_of(TOKEN_B) == "b"
    replace_file(token_path, f"a {TOKEN_A}\n")
    assert tokens.tenant_of(TOKEN_B) is None
    assert tokens.tenant_of(TOKEN_A) == "a"
    (reloaded,) = events(caplog, "config_file_reloaded")
    assert reloaded.setting == "AUTH_TOKENS_FILE"
    assert not events(caplog, "config_file_reload_failed")
    # A token added later works at once too.
    replace_file(token_path, f"a {TOKEN_A}\nc {TOKEN_C}\n")
    assert tokens.tenant_of(TOKEN_C) == "c"


def test_token_file_in_place_rewrite_seen_by_mtime(token_path: Path) -> None:
    tokens = TokenFile(str(token_path))
    rotated = TOKEN_A[:-4] + "ZZZZ"  # the same size, so only the mtime tells
    text = token_path.read_text()
    before = os.stat(token_path)
    with open(token_path, "w") as fh:  # the same inode
        fh.write(text.replace(TOKEN_A, rotated))
    os.utime(token_path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert os.stat(token_path).st_ino == before.st_ino
    assert os.stat(token_path).st_size == before.st_size
    assert tokens.tenant_of(TOKEN_A) is None
    assert tokens.tenant_of(rotated) == "a"


def test_token_file_unchanged_is_not_reread(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = TokenFile(str(token_path))
    calls: list[bytes] = []
    real = tokens._file._load
    monkeypatch.setattr(tokens._file, "_load", lambda data: calls.append(data) or real(data))
    for _ in range(5):
        assert tokens.tenant_of(TOKEN_A) == "a"
    assert calls == []
    bump_mtime(token_path)
    assert tokens.tenant_of(TOKEN_A) == "a"
    assert tokens.tenant_of(TOKEN_A) == "a"
    assert len(calls) == 1


@pytest.mark.parametrize(
    "bad",
    [
        f"a {TOKEN_A}\nb {TOKEN_B} {SECRET}\n",  # three fields
        f"a {TOKEN_A}\n../x {SECRET}\n",  # bad tenant name
        f"a {TOKEN_A}\nb {TOKEN_A}\n",  # the same token for two tenants
        f"a sha256:{BAD_HEX}\n",
        b"a \xff\n",
    ],
)
def test_token_file_malformed_keeps_last_good_and_logs_once(
    token_path: Path, caplog: pytest.LogCaptureFixture, bad: str | bytes
) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    tokens = TokenFile(str(token_path))
    replace_file(token_path, bad)
    for _ in range(5):
        assert tokens.tenant_of(TOKEN_A) == "a"
        assert tokens.tenant_of(TOKEN_B) == "b"
        assert tokens.tenant_of(SECRET) is None
    (failed,) = events(caplog, "config_file_reload_failed")
    assert failed.levelno == logging.ERROR
    assert failed.reason == "invalid_file"
    assert failed.setting == "AUTH_TOKENS_FILE"
    assert failed.path == str(token_path)
    assert not events(caplog, "config_file_reloaded")
    for record in caplog.records:
        text = record_text(record)
        for secret in (SECRET, TOKEN_A, TOKEN_B, BAD_HEX, sha(TOKEN_B).hex()):
            assert secret not in text


def test_token_file_second_bad_version_logs_again_and_a_fix_recovers(
    token_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    tokens = TokenFile(str(token_path))
    replace_file(token_path, f"a {SECRET} x\n")
    assert tokens.tenant_of(TOKEN_A) == "a"
    assert "line 1" in events(caplog, "config_file_reload_failed")[0].error
    replace_file(token_path, f"a {TOKEN_A}\nb {SECRET} x\n")
    assert tokens.tenant_of(TOKEN_A) == "a"
    assert tokens.tenant_of(TOKEN_A) == "a"
    failures = events(caplog, "config_file_reload_failed")
    assert len(failures) == 2
    assert "line 2" in failures[1].error
    replace_file(token_path, f"c {TOKEN_C}\n")
    assert tokens.tenant_of(TOKEN_C) == "c"
    assert tokens.tenant_of(TOKEN_A) is None
    assert len(events(caplog, "config_file_reloaded")) == 1
    for record in caplog.records:
        assert SECRET not in record_text(record)


def test_token_file_deleted_keeps_last_good(
    token_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    tokens = TokenFile(str(token_path))
    token_path.unlink()
    for _ in range(5):
        assert tokens.tenant_of(TOKEN_A) == "a"
        assert tokens.tenant_of(TOKEN_B) == "b"
    (failed,) = events(caplog, "config_file_reload_failed")
    assert failed.setting == "AUTH_TOKENS_FILE"
    # Put back (different tokens): read again.
    token_path.write_text(f"c {TOKEN_C}\n")
    assert tokens.tenant_of(TOKEN_C) == "c"
    assert tokens.tenant_of(TOKEN_A) is None


def test_token_file_deleted_again_after_restore_is_logged_again(
    token_path: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    tokens = TokenFile(str(token_path))
    backup = tmp_path / "tokens.bak"
    os.link(token_path, backup)  # the same inode, size and mtime
    token_path.unlink()
    assert tokens.tenant_of(TOKEN_A) == "a"
    os.link(backup, token_path)  # restored exactly: the last good stamp
    assert tokens.tenant_of(TOKEN_A) == "a"
    token_path.unlink()  # gone again: should say so again
    assert tokens.tenant_of(TOKEN_A) == "a"
    assert len(events(caplog, "config_file_reload_failed")) == 2


def test_token_file_missing_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AUTH_TOKENS_FILE"):
        TokenFile(str(tmp_path / "absent"))


def test_token_file_malformed_at_start_names_setting_and_line_not_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"a {TOKEN_A}\n\nb {SECRET} extra\n")
    with pytest.raises(ConfigError) as caught:
        TokenFile(str(path))
    message = str(caught.value)
    assert "AUTH_TOKENS_FILE" in message
    assert "line 3" in message
    assert SECRET not in message and TOKEN_A not in message


def test_tenants_have_a_token_file_only_in_bearer_mode(token_path: Path) -> None:
    bearer = Tenants(load_settings(auth_mode="bearer", auth_tokens_file=str(token_path)))
    assert isinstance(bearer.tokens, TokenFile)
    assert bearer.tokens.tenant_of(TOKEN_A) == "a"
    header = Tenants(load_settings(auth_tokens_file=str(token_path)))
    assert header.tokens is None
    assert header.header == "x-scope-orgid"


def test_bearer_mode_with_a_missing_token_file_fails_at_start(tmp_path: Path) -> None:
    settings = load_settings(auth_mode="bearer", auth_tokens_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="AUTH_TOKENS_FILE"):
        Tenants(settings)


# --- valid_tenant -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "Z", "0", "team-a", "A.b_c-1", "a..b", "a-", "1.2.3", "x" * 64]
)
def test_valid_tenant_accepts(name: str) -> None:
    assert valid_tenant(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/a",
        "a\\b",
        ".hidden",
        "-x",
        "_x",
        "x" * 65,
        "x" * 200,
        "tëam",
        "\uff41",  # fullwidth a
        "a b",
        " a",
        "a ",
        "a\n",
        "a\x00",
        "\x00",
        "a:b",
        "a*",
    ],
)
def test_valid_tenant_rejects(name: str) -> None:
    assert not valid_tenant(name)


# --- parse_limits -----------------------------------------------------------------------


def limits_doc(document: Any) -> bytes:
    return orjson.dumps(document)


def test_parse_limits_any_subset_per_tenant() -> None:
    parsed = parse_limits(
        limits_doc(
            {
                "a": {"rate_limit_rps": 5, "rate_limit_burst": 10},
                "b": {"ingest_bytes_per_s": 1024.5},
                "c": {},
                "d": {
                    "rate_limit_rps": 0.5,
                    "rate_limit_burst": 1,
                    "ingest_bytes_per_s": 0,
                    "ingest_burst_bytes": 0,
                    "tenant_max_backlog": 7,
                },
            }
        )
    )
    assert parsed == {
        "a": {"rate_limit_rps": 5, "rate_limit_burst": 10},
        "b": {"ingest_bytes_per_s": 1024.5},
        "c": {},
        "d": {
            "rate_limit_rps": 0.5,
            "rate_limit_burst": 1,
            "ingest_bytes_per_s": 0,
            "ingest_burst_bytes": 0,
            "tenant_max_backlog": 7,
        },
    }
    assert parse_limits(b"{}") == {}


def test_parse_limits_whole_floats_for_int_fields_become_ints() -> None:
    parsed = parse_limits(
        limits_doc(
            {"a": {"rate_limit_burst": 10.0, "ingest_burst_bytes": 2e3, "tenant_max_backlog": 3.0}}
        )
    )
    assert parsed["a"] == {
        "rate_limit_burst": 10,
        "ingest_burst_bytes": 2000,
        "tenant_max_backlog": 3,
    }
    assert all(type(v) is int for v in parsed["a"].values())


@pytest.mark.parametrize(
    ("data", "words"),
    [
        pytest.param(b"not json", ["JSON"], id="not-json"),
        pytest.param(b"\xff", ["JSON"], id="not-utf8"),
        pytest.param(b"[]", ["object"], id="top-level-list"),
        pytest.param(b'"a"', ["object"], id="top-level-string"),
        pytest.param(limits_doc({"a": [1]}), ["a"], id="overrides-not-object"),
        pytest.param(limits_doc({"a": 5}), ["a"], id="overrides-number"),
        pytest.param(limits_doc({"a": {"rps": 5}}), ["a", "rps", "unknown"], id="unknown-key"),
        pytest.param(limits_doc({"a": {"RATE_LIMIT_RPS": 5}}), ["unknown"], id="upper-case-key"),
        pytest.param(limits_doc({"a": {"rate_limit_rps": -1}}), ["a.rate_limit_rps"], id="neg-rps"),
        pytest.param(limits_doc({"a": {"rate_limit_rps": 0}}), ["> 0"], id="zero-rps"),
        pytest.param(limits_doc({"a": {"rate_limit_burst": 0}}), ["> 0"], id="zero-burst"),
        pytest.param(
            limits_doc({"a": {"rate_limit_burst": -3}}), ["rate_limit_burst"], id="neg-burst"
        ),
        pytest.param(
            limits_doc({"a": {"ingest_bytes_per_s": -0.5}}), [">= 0"], id="neg-bytes-rate"
        ),
        pytest.param(limits_doc({"a": {"ingest_burst_bytes": -1}}), [">= 0"], id="neg-bytes-burst"),
        pytest.param(
            limits_doc({"a": {"tenant_max_backlog": 0}}), ["tenant_max_backlog"], id="zero-backlog"
        ),
        pytest.param(
            limits_doc({"a": {"tenant_max_backlog": -5}}), ["tenant_max_backlog"], id="neg-backlog"
        ),
        pytest.param(limits_doc({"a": {"rate_limit_rps": "5"}}), ["number"], id="string"),
        pytest.param(limits_doc({"a": {"rate_limit_rps": None}}), ["number"], id="null"),
        pytest.param(limits_doc({"a": {"rate_limit_rps": [5]}}), ["number"], id="list"),
        pytest.param(limits_doc({"a": {"rate_limit_burst": True}}), ["number"], id="bool-true"),
        pytest.param(limits_doc({"a": {"rate_limit_rps": False}}), ["number"], id="bool-false"),
        pytest.param(
            limits_doc({"a": {"rate_limit_burst": 1.5}}), ["whole number"], id="frac-burst"
        ),
        pytest.param(
            limits_doc({"a": {"ingest_burst_bytes": 10.25}}), ["whole number"], id="frac-bytes"
        ),
        pytest.param(
            limits_doc({"a": {"tenant_max_backlog": 2.5}}), ["whole number"], id="frac-backlog"
        ),
        pytest.param(limits_doc({"../x": {}}), ["invalid tenant"], id="tenant-dotdot"),
        pytest.param(limits_doc({"": {}}), ["invalid tenant"], id="tenant-empty"),
        pytest.param(limits_doc({"a/b": {}}), ["invalid tenant"], id="tenant-slash"),
        pytest.param(limits_doc({"tëam": {}}), ["invalid tenant"], id="tenant-unicode"),
        pytest.param(limits_doc({"x" * 65: {}}), ["invalid tenant"], id="tenant-too-long"),
        pytest.param(
            limits_doc({"good": {"rate_limit_rps": 1}, "bad": {"rate_limit_rps": -1}}),
            ["bad.rate_limit_rps"],
            id="one-bad-tenant-among-good",
        ),
    ],
)
def test_parse_limits_rejects(data: bytes, words: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        parse_limits(data)
    for word in words:
        assert word in str(caught.value)


def test_parse_limits_long_names_are_cut_in_the_message() -> None:
    with pytest.raises(ValueError) as caught:
        parse_limits(limits_doc({"a": {"k" * 10_000: 1}}))
    assert len(str(caught.value)) < 400


# --- Tenants: limits, buckets, re-read -----------------------------------------------------


@pytest.fixture
def limits_path(tmp_path: Path) -> Path:
    path = tmp_path / "limits.json"
    path.write_bytes(
        limits_doc(
            {
                "a": {"rate_limit_rps": 5, "rate_limit_burst": 10, "tenant_max_backlog": 50},
                "b": {"ingest_bytes_per_s": 1000, "ingest_burst_bytes": 4000},
                "c": {"ingest_bytes_per_s": 300},
            }
        )
    )
    return path


def make_tenants(limits_path: Path | None = None, **overrides: Any) -> Tenants:
    if limits_path is not None:
        overrides["tenant_limits_file"] = str(limits_path)
    return Tenants(load_settings(**overrides))


def test_limits_defaults_from_settings() -> None:
    settings = load_settings(
        rate_limit_rps=7,
        rate_limit_burst=9,
        ingest_bytes_per_s=100,
        ingest_burst_bytes=500,
        staging_max_backlog=1000,
    )
    # TENANT_MAX_BACKLOG unset: the instance's cap, so no share of its own.
    assert Limits.defaults(settings) == Limits(7.0, 9, 100.0, 500, 1000)
    settings = load_settings(staging_max_backlog=80, tenant_max_backlog=20)
    assert Limits.defaults(settings).tenant_max_backlog == 20


def test_tenants_without_limits_file_use_the_defaults() -> None:
    tenants = make_tenants(rate_limit_rps=3, rate_limit_burst=4)
    tenant = tenants.get("x")
    assert isinstance(tenant, Tenant)
    assert tenant.name == "x"
    assert tenant.limits == tenants.defaults
    assert tenant.requests.rate == 3.0
    assert tenant.requests.tokens == pytest.approx(4.0)
    assert tenant.bytes is None  # INGEST_BYTES_PER_S=0: no byte limit
    assert tenants.get("x") is tenant


def test_tenants_overrides_apply_per_tenant_any_subset(limits_path: Path) -> None:
    tenants = make_tenants(
        limits_path,
        rate_limit_rps=100,
        rate_limit_burst=200,
        staging_max_backlog=1000,
    )
    a, b, c, d = (tenants.get(n) for n in "abcd")
    assert a.limits == Limits(5.0, 10, 0.0, 0, 50)
    assert (a.requests.rate, a.requests.burst) == (5.0, 10.0)
    assert a.bytes is None
    assert b.limits == Limits(100.0, 200, 1000.0, 4000, 1000)
    assert (b.requests.rate, b.requests.burst) == (100.0, 200.0)
    assert isinstance(b.bytes, ByteBucket)
    assert (b.bytes.rate, b.bytes.burst) == (1000.0, 4000.0)
    # No burst given: one second's worth.
    assert c.bytes is not None and (c.bytes.rate, c.bytes.burst) == (300.0, 300.0)
    assert d.limits == tenants.defaults  # not in the file


def test_byte_burst_is_at_least_one_byte() -> None:
    tenant = make_tenants(ingest_bytes_per_s=0.25).get("t")
    assert tenant.bytes is not None
    assert tenant.bytes.burst == 1.0


def test_tenants_limits_file_missing_or_malformed_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TENANT_LIMITS_FILE"):
        make_tenants(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(limits_doc({"a": {"rate_limit_rps": -1}}))
    with pytest.raises(ConfigError, match=r"TENANT_LIMITS_FILE.*a\.rate_limit_rps"):
        make_tenants(bad)


def test_tenants_reread_updates_an_existing_tenant_keeping_the_level_capped(
    limits_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="otelworker")
    replace_file(
        limits_path,
        limits_doc({"a": {"rate_limit_rps": 0.001, "rate_limit_burst": 10}, "z": {}}),
    )
    # Slow defaults too, so that nothing refills noticeably while the test runs.
    tenants = make_tenants(limits_path, rate_limit_rps=0.001, rate_limit_burst=200)
    a = tenants.get("a")
    z = tenants.get("z")
    requests = a.requests
    for _ in range(7):
        assert a.requests.try_acquire()
    assert a.requests.tokens == pytest.approx(3.0, abs=0.01)

    # A larger burst: the level is kept, not refilled.
    replace_file(
        limits_path,
        limits_doc({"a": {"rate_limit_rps": 0.002, "rate_limit_burst": 20}, "z": {}}),
    )
    assert tenants.get("a") is a
    assert a.requests is requests  # the same bucket, reconfigured
    assert (a.requests.rate, a.requests.burst) == (0.002, 20.0)
    assert a.limits.rate_limit_burst == 20
    assert a.requests.tokens == pytest.approx(3.0, abs=0.01)
    assert len(events(caplog, "config_file_reloaded")) == 1

    # A smaller burst: the level is capped at it.
    replace_file(
        limits_path,
        limits_doc({"a": {"rate_limit_rps": 0.002, "rate_limit_burst": 2}, "z": {}}),
    )
    assert tenants.get("a") is a
    assert a.requests.burst == 2.0
    assert a.requests.tokens == pytest.approx(2.0)

    # Out of the file: back to the defaults (also capped, never refilled).
    replace_file(limits_path, limits_doc({"z": {}}))
    assert tenants.get("a").limits == tenants.defaults
    assert (a.requests.rate, a.requests.burst) == (0.001, 200.0)
    assert a.requests.tokens == pytest.approx(2.0, abs=0.01)
    assert tenants.get("z") is z


def test_tenants_reread_changing_only_the_backlog_share(limits_path: Path) -> None:
    tenants = make_tenants(limits_path)
    a = tenants.get("a")
    requests, bytes_ = a.requests, a.bytes
    replace_file(
        limits_path,
        limits_doc({"a": {"rate_limit_rps": 5, "rate_limit_burst": 10, "tenant_max_backlog": 9}}),
    )
    assert tenants.get("a").limits.tenant_max_backlog == 9
    assert a.requests is requests and a.bytes is bytes_


def test_tenants_reread_turns_a_byte_limit_on_and_off(limits_path: Path) -> None:
    tenants = make_tenants(limits_path)
    a = tenants.get("a")
    assert a.bytes is None
    replace_file(
        limits_path, limits_doc({"a": {"ingest_bytes_per_s": 10, "ingest_burst_bytes": 40}})
    )
    tenants.get("a")
    assert a.bytes is not None and (a.bytes.rate, a.bytes.burst) == (10.0, 40.0)
    replace_file(limits_path, limits_doc({"a": {"ingest_bytes_per_s": 0}}))
    tenants.get("a")
    assert a.bytes is None


def test_tenants_reread_keeps_the_byte_level_capped(limits_path: Path) -> None:
    replace_file(
        limits_path, limits_doc({"b": {"ingest_bytes_per_s": 1, "ingest_burst_bytes": 4000}})
    )
    tenants = make_tenants(limits_path)
    b = tenants.get("b")
    assert b.bytes is not None
    assert b.bytes.try_take(4000)  # drained
    assert not b.bytes.try_take(100)
    replace_file(
        limits_path, limits_doc({"b": {"ingest_bytes_per_s": 2, "ingest_burst_bytes": 8000}})
    )
    bucket = tenants.get("b").bytes
    assert bucket is not None and bucket.rate == 2.0
    assert not bucket.try_take(100)  # still drained: the level is kept


def test_tenants_malformed_limits_reread_keeps_last_good(
    limits_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    tenants = make_tenants(limits_path)
    a = tenants.get("a")
    replace_file(limits_path, limits_doc({"a": {"rate_limit_rps": "fast"}}))
    for _ in range(3):
        assert tenants.get("a").limits.rate_limit_rps == 5.0
        assert tenants.get("new").limits == tenants.defaults
    (failed,) = events(caplog, "config_file_reload_failed")
    assert failed.setting == "TENANT_LIMITS_FILE"
    assert "a.rate_limit_rps" in failed.error
    limits_path.unlink()
    assert tenants.get("a") is a
    assert a.limits.rate_limit_rps == 5.0


def test_tenants_unchanged_file_does_not_update(
    limits_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants = make_tenants(limits_path)
    a = tenants.get("a")
    generation = a.generation
    calls: list[Any] = []
    original = Tenant.update

    def spy(self: Tenant, limits: Limits, generation: int) -> None:
        calls.append(limits)
        original(self, limits, generation)

    monkeypatch.setattr(Tenant, "update", spy)
    for _ in range(5):
        tenants.get("a")
    assert calls == []
    bump_mtime(limits_path)  # re-read, the same content
    tenants.get("a")
    tenants.get("a")
    assert len(calls) == 1
    assert a.generation == generation + 1


# --- labels and the tracked tenants ----------------------------------------------------------


def test_label_cap_third_tenant_is_other() -> None:
    tenants = make_tenants(metrics_max_tenants=2)
    assert tenants.get("a").label == "a"
    assert tenants.get("b").label == "b"
    assert tenants.get("c").label == OTHER == "other"
    assert tenants.get("d").label == OTHER
    # The first two keep theirs, whatever comes after; a capped one stays capped.
    assert tenants.get("a").label == "a"
    assert tenants.get("b").label == "b"
    assert tenants.get("c").label == OTHER
    assert tenants.label("a") == "a"
    assert tenants.label("e") == OTHER


def test_label_cap_one() -> None:
    tenants = make_tenants(metrics_max_tenants=1)
    assert [tenants.get(n).label for n in ("x", "y", "x", "z")] == ["x", OTHER, "x", OTHER]


def test_tracked_tenants_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenants_module, "_MAX_TRACKED", 3)
    tenants = make_tenants(metrics_max_tenants=2)
    a, b, c = (tenants.get(n) for n in "abc")
    assert tenants.get("a") is a  # a is now the most recent
    tenants.get("d")  # evicts b, the least recently seen
    assert tenants.get("a") is a
    assert tenants.get("c") is c
    b2 = tenants.get("b")  # b again (evicts d)
    assert b2 is not b
    assert b2.label == "b"  # its label is kept across eviction
    assert tenants.get("a") is a and tenants.get("c") is c
    assert len(tenants._known) == 3


# --- Intake.identify --------------------------------------------------------------------


def make_intake(**overrides: Any) -> Intake:
    settings = load_settings(**overrides)
    intake = Intake(SimpleNamespace(settings=settings, metrics=None))  # type: ignore[arg-type]
    intake.tenants = Tenants(settings)
    return intake


@pytest.fixture
def bearer(token_path: Path) -> Intake:
    return make_intake(auth_mode="bearer", auth_tokens_file=str(token_path))


def refusal(intake: Intake, authorization: str | None, named: str | None = None) -> Refused:
    with pytest.raises(Refused) as caught:
        intake.identify(authorization, named)
    return caught.value


def test_identify_not_ready() -> None:
    intake = make_intake()
    intake.tenants = None
    refused = refusal(intake, None)
    assert refused.kind is Kind.UNAVAILABLE
    assert refused.retry_after == intake.settings.unavailable_retry_after_s


@pytest.mark.parametrize("authorization", [None, ""])
def test_identify_bearer_missing(bearer: Intake, authorization: str | None) -> None:
    refused = refusal(bearer, authorization, "a")
    assert refused.kind is Kind.UNAUTHENTICATED
    assert refused.kind.http_status == 401
    assert refused.kind.grpc_code == "UNAUTHENTICATED"
    assert not refused.kind.retryable
    assert refused.reason == "unauthenticated"
    assert refused.event == ("auth_failed", "missing_token")


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic x",
        f"Basic {TOKEN_A}",  # the right token under the wrong scheme
        f"Token {TOKEN_A}",
        TOKEN_A,  # no scheme
        "Bearer wrong",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN_A}x",
        f"Bearer {TOKEN_A.upper()}",
        f"Bearer sha256:{sha(TOKEN_B).hex()}",
        f"Bearer {TOKEN_A} {TOKEN_B}",
    ],
)
def test_identify_bearer_invalid(bearer: Intake, authorization: str) -> None:
    refused = refusal(bearer, authorization)
    assert refused.kind is Kind.UNAUTHENTICATED
    assert refused.reason == "unauthenticated"
    assert refused.event == ("auth_failed", "invalid_token")
    text = f"{refused.message} {refused.context!r} {refused}"
    assert TOKEN_A not in text and TOKEN_B not in text


@pytest.mark.parametrize(
    ("authorization", "tenant"),
    [
        (f"Bearer {TOKEN_A}", "a"),
        (f"bearer {TOKEN_A}", "a"),
        (f"BEARER {TOKEN_B}", "b"),
        (f"  Bearer   {TOKEN_A}  ", "a"),
    ],
)
def test_identify_bearer_right_token(bearer: Intake, authorization: str, tenant: str) -> None:
    assert bearer.identify(authorization, None).name == tenant


def test_identify_bearer_ignores_the_tenant_header(bearer: Intake) -> None:
    tenant = bearer.identify(f"Bearer {TOKEN_A}", "b")
    assert tenant.name == "a"
    assert bearer.identify(f"Bearer {TOKEN_A}", "../x").name == "a"
    assert bearer.identify(f"Bearer {TOKEN_A}", None) is tenant  # the same state


def test_identify_bearer_follows_a_rotated_file(bearer: Intake, token_path: Path) -> None:
    assert bearer.identify(f"Bearer {TOKEN_A}", None).name == "a"
    replace_file(token_path, f"c {TOKEN_C}\n")
    assert refusal(bearer, f"Bearer {TOKEN_A}").event == ("auth_failed", "invalid_token")
    assert bearer.identify(f"Bearer {TOKEN_C}", None).name == "c"


def test_identify_header_absent_is_the_default_tenant() -> None:
    assert make_intake().identify(None, None).name == "default"
    intake = make_intake(default_tenant="acme")
    tenant = intake.identify(None, None)
    assert tenant.name == "acme"
    assert intake.identify(None, None) is tenant
    # An Authorization header means nothing without AUTH_MODE=bearer.
    assert intake.identify("Bearer whatever", None).name == "acme"


def test_identify_header_absent_with_require_tenant() -> None:
    intake = make_intake(require_tenant=True, tenant_header="X-Tenant")
    refused = refusal(intake, None, None)
    assert refused.kind is Kind.UNAUTHENTICATED
    assert refused.kind.http_status == 401
    assert refused.reason == "tenant_required"
    assert refused.event == ("auth_failed", "missing_tenant")
    assert "X-Tenant" in refused.message
    assert intake.identify(None, "t1").name == "t1"


@pytest.mark.parametrize("named", ["", "../x", "a/b", ".hidden", "a b", "tëam", "x" * 65, "a\x00"])
@pytest.mark.parametrize("require", [False, True])
def test_identify_header_invalid(named: str, require: bool) -> None:
    intake = make_intake(require_tenant=require)
    refused = refusal(intake, None, named)
    assert refused.kind is Kind.INVALID
    assert refused.kind.http_status == 400
    assert refused.reason == "invalid_tenant"
    assert refused.event == ("request_refused", "invalid_tenant")
    assert "X-Scope-OrgID" in refused.message
    assert intake.tenants is not None and named not in intake.tenants._known


@pytest.mark.parametrize("named", ["a", "team-a", "A.b_c-1", "x" * 64])
def test_identify_header_valid(named: str) -> None:
    intake = make_intake(require_tenant=True)
    tenant = intake.identify(None, named)
    assert tenant.name == named
    assert intake.identify(None, named) is tenant


def test_identify_header_tenant_gets_its_limits(limits_path: Path) -> None:
    intake = make_intake(tenant_limits_file=str(limits_path))
    assert intake.identify(None, "a").limits.rate_limit_rps == 5.0
    assert intake.identify(None, "other-one").limits == Limits.defaults(intake.settings)
