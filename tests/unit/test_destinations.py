"""DESTINATIONS_FILE: the shape, its defaults, ${VAR}s, every invalid case (naming the file
and the entry), the reload that keeps the last good version, header values kept secret.

File changes are made with a new file moved into place (a new inode), so no test depends
on the file system's timestamp granularity."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from otelworker.exceptions import ConfigError
from otelworker.forwarding.destinations import (
    SIGNALS,
    Destination,
    DestinationsFile,
    TlsConfig,
    load_destinations,
    parse_destinations,
)
from tests.support.pki import Pki, make_pki
from tests.support.secrets import new_token

FULL = """\
destinations:
  - name: tempo
    endpoint: http://tempo:4318
    protocol: http/protobuf
    signals: [traces]
    tenants: [team-a, team-b]
    headers: {Authorization: "Bearer ${TEMPO_TOKEN}"}
    tenant_header: X-Scope-OrgID
    compression: gzip
    timeout_s: 10
    max_request_bytes: 4194304
    concurrency: 4
"""


def parse(text: str, env: dict[str, str] | None = None) -> list[Destination]:
    return parse_destinations(text.encode(), "dest.yaml", env or {})


def one(entry: str, env: dict[str, str] | None = None) -> Destination:
    (destination,) = parse("destinations:\n  - " + entry.strip().replace("\n", "\n    "), env)
    return destination


def invalid(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return str(info.value)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def record_text(record: logging.LogRecord) -> str:
    return record.getMessage() + " " + " ".join(repr(v) for v in record.__dict__.values())


def replace_file(path: Path, data: str) -> None:
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(data)
    os.replace(fresh, path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- the shape ------------------------------------------------------------------------


def test_the_issue_example_parses_with_its_values() -> None:
    token = new_token()
    (d,) = parse(FULL, {"TEMPO_TOKEN": token})
    assert d.name == "tempo"
    assert d.protocol == "http/protobuf"
    assert d.endpoint == "http://tempo:4318"
    assert d.urls == {"traces": "http://tempo:4318/v1/traces"}
    assert d.signals == frozenset({"traces"})
    assert d.tenants == frozenset({"team-a", "team-b"})
    assert d.headers == {"Authorization": f"Bearer {token}"}
    assert d.tenant_header == "X-Scope-OrgID"
    assert (d.compression, d.timeout_s, d.max_request_bytes, d.concurrency) == (
        "gzip",
        10.0,
        4194304,
        4,
    )
    assert d.tls is None


def test_gzip_members_many() -> None:
    assert one("name: a\nendpoint: http://x\ngzip_members: many").gzip_members == "many"


def test_defaults() -> None:
    d = one("name: a\nendpoint: http://collector:4318/")
    assert d.protocol == "http/protobuf"
    assert d.signals == frozenset(SIGNALS)
    assert d.tenants is None
    assert d.headers == {}
    assert d.tenant_header == "X-Scope-OrgID"
    assert d.compression == "gzip"
    assert d.timeout_s == 10.0
    assert d.max_request_bytes == 4 * 1024 * 1024
    assert d.concurrency == 4
    assert d.tls is None
    assert d.gzip_members == "one"
    # A trailing slash is not doubled; every signal has its URL.
    assert d.urls == {s: f"http://collector:4318/v1/{s}" for s in SIGNALS}


def test_json_is_the_same_shape() -> None:
    token = new_token()
    tree = {
        "destinations": [
            {
                "name": "tempo",
                "endpoint": "http://tempo:4318",
                "signals": ["traces"],
                "tenants": ["team-a", "team-b"],
                "headers": {"Authorization": "Bearer ${TEMPO_TOKEN}"},
                "timeout_s": 10,
                "max_request_bytes": 4194304,
                "concurrency": 4,
            }
        ]
    }
    from_json = parse_destinations(json.dumps(tree).encode(), "d.json", {"TEMPO_TOKEN": token})
    from_yaml = parse(FULL, {"TEMPO_TOKEN": token})
    assert from_json == from_yaml


def test_json_syntax_error_is_reported_as_json_by_line_and_column() -> None:
    secret = new_token()
    text = '{"destinations": [\n {"name": "a", "headers": {"A": "' + secret + '",}}]}'
    message = invalid(text)
    assert message.startswith("DESTINATIONS_FILE dest.yaml: not valid JSON")
    assert "line 2" in message
    assert secret not in message


def test_yaml_syntax_error_names_line_not_its_text() -> None:
    secret = new_token()
    text = f'destinations:\n  - name: a\n    headers: {{A: "{secret}\n    endpoint: x\n'
    message = invalid(text)
    assert message.startswith("DESTINATIONS_FILE dest.yaml: not valid YAML")
    assert "line" in message
    assert secret not in message


def test_per_signal_endpoints_as_given_and_the_rest_from_endpoint() -> None:
    d = one(
        """
name: lgtm
endpoint: https://gateway:443/otlp
logs_endpoint: https://loki:3100/otlp/v1/logs
metrics_endpoint: http://mimir:8080/otlp/v1/metrics
"""
    )
    assert d.urls == {
        "traces": "https://gateway:443/otlp/v1/traces",
        "metrics": "http://mimir:8080/otlp/v1/metrics",
        "logs": "https://loki:3100/otlp/v1/logs",
    }


def test_per_signal_endpoint_alone_needs_no_endpoint() -> None:
    d = one("name: loki\nsignals: [logs]\nlogs_endpoint: http://loki:3100/otlp/v1/logs")
    assert d.endpoint == ""
    assert d.urls == {"logs": "http://loki:3100/otlp/v1/logs"}


def test_grpc_endpoints() -> None:
    plain = one("name: g\nprotocol: grpc\nendpoint: collector:4317")
    assert plain.urls == {s: "collector:4317" for s in SIGNALS}
    assert plain.tls is None
    schemed = one("name: g\nprotocol: grpc\nendpoint: http://collector:4317")
    assert schemed.urls["traces"] == "collector:4317"
    assert schemed.tls is None
    secure = one("name: g\nprotocol: grpc\nendpoint: https://vendor.example")
    assert secure.urls["logs"] == "vendor.example:443"
    assert secure.tls == TlsConfig()
    v6 = one("name: g\nprotocol: grpc\nendpoint: '[::1]:4317'\nsignals: [traces]")
    assert v6.urls == {"traces": "[::1]:4317"}


def test_grpc_tls_by_tls_block(pki: Pki) -> None:
    d = one(f"name: g\nprotocol: grpc\nendpoint: localhost:4317\ntls: {{ca_file: {pki.ca}}}")
    assert d.tls == TlsConfig(ca_file=str(pki.ca))


def test_tls_block_loads_its_files(pki: Pki) -> None:
    d = one(
        f"""
name: t
endpoint: https://localhost:4318
tls: {{ca_file: {pki.ca}, cert_file: {pki.client_cert}, key_file: {pki.client_key}}}
"""
    )
    assert d.tls == TlsConfig(str(pki.ca), str(pki.client_cert), str(pki.client_key), False)
    skip = one("name: t\nendpoint: https://x\ntls: {insecure_skip_verify: true}")
    assert skip.tls == TlsConfig(insecure_skip_verify=True)


def test_headers_expand_variables_and_dollar_escapes() -> None:
    token = new_token()
    d = one(
        'name: a\nendpoint: http://x\nheaders: {Authorization: "Bearer ${TOK}",'
        ' X-Literal: "$${NOT} $$5", X-Num: 42}',
        {"TOK": token},
    )
    assert d.headers == {
        "Authorization": f"Bearer {token}",
        "X-Literal": "${NOT} $5",
        "X-Num": "42",
    }


def test_missing_variable_is_named() -> None:
    message = invalid(
        'destinations:\n  - name: a\n    endpoint: http://x\n    headers: {A: "${NOPE_VAR}"}'
    )
    assert message == (
        "DESTINATIONS_FILE dest.yaml: destinations[0] (a): headers.A:"
        " environment variable NOPE_VAR is not set"
    )


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    token = new_token()
    monkeypatch.setenv("OTW_TEST_DEST_TOKEN", token)
    text = (
        'destinations:\n  - {name: a, endpoint: "http://x", headers: {A: "${OTW_TEST_DEST_TOKEN}"}}'
    )
    (d,) = parse_destinations(text.encode(), "d.yaml")
    assert d.headers == {"A": token}


def test_wants() -> None:
    d = one("name: a\nendpoint: http://x\nsignals: [traces, logs]\ntenants: [team-a]")
    assert d.wants("traces", "team-a")
    assert d.wants("logs", "team-a")
    assert not d.wants("metrics", "team-a")
    assert not d.wants("traces", "team-b")
    every = one("name: a\nendpoint: http://x")
    assert all(every.wants(s, t) for s in SIGNALS for t in ("x", "default"))


def test_empty_list_means_no_destinations() -> None:
    assert parse("destinations: []\n") == []
    assert parse("destinations:\n") == []


def test_header_values_are_absent_from_repr_and_str() -> None:
    token = new_token()
    d = one('name: a\nendpoint: http://x\nheaders: {Authorization: "Bearer ${T}"}', {"T": token})
    assert token not in repr(d)
    assert token not in str(d)
    assert token not in repr([d])
    assert d.header_names == ("Authorization",)


# --- invalid: every case names the file and the entry ------------------------------------

ENTRY_ERRORS = [
    ("endpoint: http://x\n", "name: missing"),
    ("name: Tempo\nendpoint: http://x", "name: must match"),
    ("name: a.b\nendpoint: http://x", "name: must match"),
    ("name: " + "a" * 65 + "\nendpoint: http://x", "name: must match"),
    ("name: 12\nendpoint: http://x", "name: must match"),
    ("name: a\nendpoint: http://x\nendpiont: http://y", "unknown key 'endpiont'"),
    ("name: a\nendpoint: http://x\nprotocol: http/json", "protocol: must be one of"),
    ("name: a", "endpoint: missing"),
    ("name: a\nendpoint: tempo:4318", "endpoint: must be an http:// or https:// URL"),
    ("name: a\nendpoint: http://u:pw@x", "credentials in the URL"),
    ("name: a\nendpoint: http://x?a=b", "query or fragment"),
    ("name: a\nendpoint: http://x:99999", "not a valid URL"),
    ("name: a\nendpoint: http://x\nsignals: [spans]", "signals: 'spans' is not one of"),
    ("name: a\nendpoint: http://x\nsignals: []", "signals: must be a non-empty list"),
    ("name: a\nendpoint: http://x\ntenants: []", "tenants: must be a non-empty list"),
    ("name: a\nendpoint: http://x\ntenants: [no]", "tenants[0]: must be a string"),
    ("name: a\nendpoint: http://x\ntenants: ['-bad']", "tenants[0]: '-bad' is not a valid"),
    ("name: a\nendpoint: http://x\nheaders: [a]", "headers: must be a mapping"),
    ("name: a\nendpoint: http://x\nheaders: {'a b': c}", "is not a valid header name"),
    ("name: a\nendpoint: http://x\nheaders: {A: [1]}", "headers.A: the value must be a string"),
    ("name: a\nendpoint: http://x\nheaders: {A: 1, a: 2}", "headers.a: given twice"),
    ("name: a\nendpoint: http://x\nheaders: {Content-Encoding: br}", "set by otelworker"),
    ("name: a\nendpoint: http://x\nheaders: {A: '${'}", "not a ${NAME} reference"),
    ("name: a\nendpoint: http://x\ntenant_header: 'a b'", "tenant_header: not a valid"),
    ("name: a\nendpoint: http://x\ntenant_header: null", "tenant_header: must be a string"),
    ("name: a\nendpoint: http://x\ncompression: zstd", "compression: must be one of gzip, none"),
    ("name: a\nendpoint: http://x\ntimeout_s: 0", "timeout_s: must be more than 0"),
    ("name: a\nendpoint: http://x\ntimeout_s: ten", "timeout_s: must be a number"),
    ("name: a\nendpoint: http://x\ntimeout_s: true", "timeout_s: must be a number"),
    ("name: a\nendpoint: http://x\nmax_request_bytes: 0", "max_request_bytes: must be between"),
    ("name: a\nendpoint: http://x\nmax_request_bytes: 1.5", "max_request_bytes: must be a whole"),
    ("name: a\nendpoint: http://x\nconcurrency: 0", "concurrency: must be between 1 and"),
    ("name: a\nendpoint: http://x\nconcurrency: 100000", "concurrency: must be between 1 and"),
    ("name: a\nendpoint: https://x\ntls: yes", "tls: must be a mapping"),
    ("name: a\nendpoint: https://x\ntls: {ca: x}", "tls: unknown key 'ca'"),
    ("name: a\nendpoint: https://x\ntls: {cert_file: /c}", "cert_file and key_file go together"),
    ("name: a\nendpoint: https://x\ntls: {ca_file: /nonexistent/ca.pem}", "tls: cannot read"),
    (
        "name: a\nendpoint: https://x\ntls: {insecure_skip_verify: 'no'}",
        "insecure_skip_verify: must be true or false",
    ),
    ("name: a\nendpoint: http://x\ntls: {}", "tls: given, but no endpoint is https://"),
    (
        "name: a\nendpoint: http://x\nsignals: [logs]\ntraces_endpoint: http://y/v1/traces",
        "traces_endpoint: given, but traces is not in signals",
    ),
    ("name: a\nsignals: [logs]\nlogs_endpoint: loki", "logs_endpoint: must be an http://"),
    ("name: a\nendpoint: http://x\ngzip_members: all", "gzip_members: must be one of one, many"),
    (
        "name: a\nendpoint: http://x\ncompression: none\ngzip_members: many",
        "gzip_members: only for protocol http/protobuf with compression gzip",
    ),
    ("name: a\nprotocol: grpc\nendpoint: x:1\ngzip_members: one", "gzip_members: only for"),
    ("name: a\nprotocol: grpc\nendpoint: collector", "needs its port"),
    ("name: a\nprotocol: grpc", "endpoint: missing"),
    ("name: a\nprotocol: grpc\nendpoint: ftp://x:1", "scheme must be http://"),
    ("name: a\nprotocol: grpc\nendpoint: http://x:4317/v1", "has no path"),
    ("name: a\nprotocol: grpc\nendpoint: http://x:4317\ntls: {}", "the endpoint is http://"),
    ("name: a\nprotocol: grpc\nendpoint: x:1\ntraces_endpoint: x:2", "only for protocol http"),
    (
        "name: a\nprotocol: grpc\nendpoint: x:1\ntls: {insecure_skip_verify: true}",
        "not supported with protocol grpc",
    ),
    ("name: a\nprotocol: grpc\nendpoint: x:1\nheaders: {grpc-timeout: 1}", "reserved by gRPC"),
    ("name: a\nprotocol: grpc\nendpoint: x:1\nheaders: {X~A: 1}", "not a valid gRPC metadata"),
    ("name: a\nprotocol: grpc\nendpoint: x:1\nheaders: {x-bin: a}", "binary (-bin)"),
    ("name: a\nprotocol: grpc\nendpoint: x:1\nheaders: {x-a: é}", "printable ASCII"),
]


@pytest.mark.parametrize(("entry", "what"), ENTRY_ERRORS)
def test_invalid_entry_names_file_entry_and_what(entry: str, what: str) -> None:
    good = "  - name: first\n    endpoint: http://first:4318\n"
    text = "destinations:\n" + good + "  - " + entry.strip().replace("\n", "\n    ")
    message = invalid(text)
    assert message.startswith("DESTINATIONS_FILE dest.yaml: destinations[1] ("), message
    assert what in message, message


def test_invalid_entry_label_is_its_name_or_unnamed() -> None:
    assert "destinations[0] (a): " in invalid("destinations:\n  - {name: a, endpoint: x}")
    assert "destinations[0] (unnamed): name: missing" in invalid(
        "destinations:\n  - {endpoint: http://x}"
    )
    assert "destinations[0] (unnamed): must be a mapping" in invalid("destinations:\n  - tempo")


def test_header_value_with_line_break_after_expansion() -> None:
    message = invalid(
        'destinations:\n  - {name: a, endpoint: "http://x", headers: {A: "${V}"}}',
        {"V": "a\r\nInjected: 1"},
    )
    assert "headers.A: the value holds a line break" in message
    assert "Injected" not in message


def test_duplicate_names() -> None:
    message = invalid(
        "destinations:\n"
        "  - {name: a, endpoint: 'http://x'}\n"
        "  - {name: b, endpoint: 'http://y'}\n"
        "  - {name: a, endpoint: 'http://z'}\n"
    )
    assert message == (
        "DESTINATIONS_FILE dest.yaml: destinations[2] (a): name 'a' is already destinations[0]'s"
    )


def test_duplicate_key_is_an_error_not_the_last_one_wins() -> None:
    message = invalid(
        "destinations:\n  - name: a\n    endpoint: http://x\n    endpoint: http://y\n"
    )
    assert "key 'endpoint' given twice" in message
    assert "line 4" in message
    message = invalid('{"destinations": [{"name": "a", "name": "b"}]}')
    assert "key 'name' given twice" in message


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("", "expected a mapping with the key 'destinations'"),
        ("- name: a\n", "expected a mapping"),
        ("destination:\n  - name: a\n", "unknown key 'destination'"),
        ("{}", "no 'destinations' key"),
        ("destinations: {name: a}\n", "'destinations' must be a list"),
    ],
)
def test_invalid_document(text: str, what: str) -> None:
    message = invalid(text)
    assert message.startswith("DESTINATIONS_FILE dest.yaml: "), message
    assert what in message


def test_not_utf8() -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_destinations(b"destinations: [\xff]", "d.yaml", {})


def test_load_destinations_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("destinations:\n  - {name: a, endpoint: 'http://x'}\n")
    assert [d.name for d in load_destinations(str(path))] == ["a"]
    with pytest.raises(ConfigError, match=r"DESTINATIONS_FILE: cannot read .*missing\.yaml"):
        load_destinations(str(tmp_path / "missing.yaml"))
    path.write_text("destinations:\n  - {name: A}\n")
    with pytest.raises(ConfigError, match=rf"DESTINATIONS_FILE {path}: destinations\[0\] \(A\)"):
        load_destinations(str(path))


# --- DestinationsFile ----------------------------------------------------------------------


def test_file_invalid_at_start_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("destinations:\n  - {name: a, endpoint: 'http://x', typo: 1}\n")
    with pytest.raises(ConfigError) as info:
        DestinationsFile(str(path))
    assert str(info.value).startswith(f"DESTINATIONS_FILE {path}: destinations[0] (a): unknown")
    with pytest.raises(ConfigError, match="DESTINATIONS_FILE: cannot read"):
        DestinationsFile(str(tmp_path / "missing.yaml"))


def test_file_reload_and_invalid_reload_keeps_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    token = new_token()
    monkeypatch.setenv("OTW_DEST_TOKEN", token)
    path = tmp_path / "d.yaml"
    path.write_text("destinations:\n  - {name: a, endpoint: 'http://a'}\n")
    watched = DestinationsFile(str(path), check_every_s=0)
    first = watched.current()
    assert [d.name for d in first] == ["a"]
    assert watched.current() is first  # unchanged: not parsed again
    generation = watched.generation

    replace_file(
        path,
        "destinations:\n  - {name: a, endpoint: 'http://a'}\n"
        "  - {name: b, endpoint: 'http://b', headers: {A: '${OTW_DEST_TOKEN}'}}\n",
    )
    assert [d.name for d in watched.current()] == ["a", "b"]
    assert watched.generation == generation + 1
    (reloaded,) = events(caplog, "config_file_reloaded")
    assert reloaded.setting == "DESTINATIONS_FILE"

    # Invalid: the last good version stays, and one event says so, however often asked.
    replace_file(
        path,
        "destinations:\n  - {name: a, endpoint: 'http://a'}\n"
        "  - {name: b, endpoint: 'http://b', headers: {A: '${OTW_DEST_TOKEN}'}, oops: 1}\n",
    )
    for _ in range(5):
        assert [d.name for d in watched.current()] == ["a", "b"]
    (failed,) = events(caplog, "config_file_reload_failed")
    assert failed.levelno == logging.ERROR
    assert failed.setting == "DESTINATIONS_FILE"
    assert failed.error.startswith(f"DESTINATIONS_FILE {path}: destinations[1] (b): unknown key")

    # Fixed: taken at once.
    replace_file(path, "destinations:\n  - {name: c, endpoint: 'http://c'}\n")
    assert [d.name for d in watched.current()] == ["c"]
    for record in caplog.records:
        assert token not in record_text(record)


def test_file_checks_at_most_every_check_every_s(tmp_path: Path) -> None:
    now = [100.0]
    path = tmp_path / "d.yaml"
    path.write_text("destinations:\n  - {name: a, endpoint: 'http://a'}\n")
    watched = DestinationsFile(str(path), check_every_s=1.0, clock=lambda: now[0])
    assert [d.name for d in watched.current()] == ["a"]
    replace_file(path, "destinations:\n  - {name: b, endpoint: 'http://b'}\n")
    now[0] += 0.5
    assert [d.name for d in watched.current()] == ["a"]  # not looked at yet
    now[0] += 0.6
    assert [d.name for d in watched.current()] == ["b"]


def test_file_deleted_keeps_last_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="otelworker")
    path = tmp_path / "d.yaml"
    path.write_text("destinations:\n  - {name: a, endpoint: 'http://a'}\n")
    watched = DestinationsFile(str(path), check_every_s=0)
    path.unlink()
    for _ in range(3):
        assert [d.name for d in watched.current()] == ["a"]
    assert len(events(caplog, "config_file_reload_failed")) == 1
