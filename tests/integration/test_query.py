"""``otelworker query`` over a Parquet copy of a real archive: answers equal the ones
computed in Python from the records sent (all three signals), ``--tenant`` and a tenant's
token confine a query to that tenant's files, only read-only SQL runs, the time bounds of
a WHERE clause are read only where that is safe, and every example of docs/query.md runs.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

from otelworker.columnar.query import Bounds, sql_time_bounds
from otelworker.columnar.schema import TIME_COLUMN
from tests.support.columnar import ROOT, Copy, cli, make_copy

pytestmark = pytest.mark.integration

DOC = ROOT / "docs" / "query.md"


@pytest.fixture
async def copy(database_url: str, tmp_path: Path) -> Copy:
    return await make_copy(database_url, tmp_path)


def _cached(copy: Copy) -> set[str]:
    cache = copy.objects.parent / "cache"
    return {p.name for p in cache.glob("*.parquet")} if cache.exists() else set()


def _name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest() + ".parquet"


async def test_answers_equal_those_computed_from_the_records_sent(copy: Copy) -> None:
    env = copy.env()
    sent = copy.sent
    run = await cli(
        env,
        "query",
        "--format",
        "json",
        "SELECT Tenant, ServiceName, count(*) AS spans, max(Duration) AS slowest,"
        " count_if(StatusCode = 'Error') AS errors FROM otel_traces GROUP BY ALL ORDER BY ALL",
    )
    assert run.code == 0, run.err
    expected = []
    for tenant in sorted(sent):
        for service in sorted({s["service"] for s in sent[tenant].spans}):
            spans = [s for s in sent[tenant].spans if s["service"] == service]
            expected.append(
                {
                    "Tenant": tenant,
                    "ServiceName": service,
                    "spans": len(spans),
                    "slowest": max(s["duration"] for s in spans),
                    "errors": sum(s["error"] for s in spans),
                }
            )
    assert run.json() == expected

    trace = sent["a"].logs[3]["trace_id"]
    run = await cli(
        env,
        "query",
        "--format",
        "csv",
        f"SELECT Body FROM otel_logs WHERE TraceId = '{trace}' ORDER BY Body",
    )
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        "Body",
        *sorted(r["body"] for r in sent["a"].logs if r["trace_id"] == trace),
    ]

    run = await cli(
        env,
        "query",
        "--format",
        "json",
        "SELECT ServiceName, sum(Value) AS total, count(*) AS n FROM otel_metrics_gauge"
        " GROUP BY 1 ORDER BY 1",
    )
    assert run.code == 0, run.err
    totals: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for tenant in sent.values():
        for point in tenant.gauge:
            totals[point["service"]] += point["value"]
            counts[point["service"]] += 1
    assert run.json() == [
        {"ServiceName": s, "total": totals[s], "n": counts[s]} for s in sorted(totals)
    ]
    run = await cli(env, "query", "SELECT sum(Count) AS c FROM otel_metrics_histogram")
    assert run.code == 0, run.err
    assert run.out.splitlines()[0].strip() == "c"
    assert int(run.out.splitlines()[2]) == sum(
        p["count"] for t in sent.values() for p in t.histogram
    )
    # A table no file fills is an empty typed view.
    run = await cli(
        env, "query", "--format", "json", "SELECT count(*) AS n FROM otel_metrics_summary"
    )
    assert run.code == 0, run.err
    assert run.json() == [{"n": 0}]


async def test_a_tenant_query_never_opens_another_tenants_files(copy: Copy) -> None:
    env = copy.env()
    a_keys = [k for k in copy.keys if "/a/parquet/" in k]
    b_keys = [k for k in copy.keys if "/b/parquet/" in k]
    assert a_keys and b_keys
    run = await cli(
        env,
        "query",
        "--tenant",
        "a",
        "--format",
        "json",
        "SELECT count(*) AS n, count(DISTINCT Tenant) AS tenants FROM otel_traces",
    )
    assert run.code == 0, run.err
    assert run.json() == [{"n": len(copy.sent["a"].spans), "tenants": 1}]
    cached = _cached(copy)
    assert {_name(k) for k in b_keys}.isdisjoint(cached)
    assert cached <= {_name(k) for k in a_keys}
    fetched = re.findall(r'"object_key": ?"([^"]+)"', run.err)
    assert fetched and all("/a/parquet/" in k for k in fetched), run.err

    # The SQL cannot reach b's files by path, nor any other file.
    b_path = copy.objects / b_keys[0]
    for sql in (
        f"SELECT count(*) FROM read_parquet('{b_path}')",
        f"SELECT count(*) FROM read_parquet('{copy.objects}/**/*.parquet')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
    ):
        run = await cli(env, "query", "--tenant", "a", sql)
        assert run.code == 1, (sql, run.out, run.err)
        assert "ermission" in run.err or "disabled" in run.err, run.err
    assert {_name(k) for k in b_keys}.isdisjoint(_cached(copy))


async def test_a_tenants_token_confines_the_query(copy: Copy, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a token-of-a\nb token-of-b\n")
    env = copy.env(AUTH_TOKENS_FILE=str(tokens))
    sql = "SELECT DISTINCT Tenant FROM otel_logs"
    run = await cli({**env, "OTELWORKER_TOKEN": "token-of-b"}, "query", "--format", "csv", sql)
    assert run.code == 0, run.err
    assert run.out.splitlines() == ["Tenant", "b"]
    token_file = tmp_path / "a.token"
    token_file.write_text("token-of-a\n")
    run = await cli(env, "query", "--token-file", str(token_file), "--format", "csv", sql)
    assert run.code == 0, run.err
    assert run.out.splitlines() == ["Tenant", "a"]
    # Another tenant than the token's, an unknown token: refused (4), nothing read.
    run = await cli({**env, "OTELWORKER_TOKEN": "token-of-a"}, "query", "--tenant", "b", sql)
    assert run.code == 4, run.err
    run = await cli({**env, "OTELWORKER_TOKEN": "nobody's"}, "query", sql)
    assert run.code == 4, run.err
    assert "nobody's" not in run.err
    # QUERY_REQUIRE_TOKEN: no token, no query.
    run = await cli({**env, "QUERY_REQUIRE_TOKEN": "true"}, "query", sql)
    assert run.code == 4, run.err


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 1) TO 'out.csv'",
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO otel_traces SELECT * FROM otel_traces",
        "SELECT 1; SELECT 2",
        "INSTALL httpfs",
        "ATTACH 'other.db'",
        "SET enable_external_access = true",
        "PRAGMA version",
        "DROP VIEW otel_traces",
        "EXPORT DATABASE 'dir'",
    ],
)
async def test_only_read_only_sql_runs(copy: Copy, sql: str) -> None:
    run = await cli(copy.env(), "query", sql)
    assert run.code == 2, (run.out, run.err)
    assert not run.out


def test_time_bounds_are_read_from_the_where_clause_only_where_safe() -> None:
    columns = {t.lower(): c for t, c in TIME_COLUMN.items()}
    got = sql_time_bounds(
        "SELECT * FROM otel_traces t WHERE t.Timestamp >= '2026-01-01T00:00:00Z'"
        " AND Timestamp < TIMESTAMP '2026-01-01 01:00:00' AND ServiceName = 'x'",
        columns,
    )
    b = got["otel_traces"]
    assert b.since is not None and b.since.isoformat() == "2026-01-01T00:00:00+00:00"
    assert b.until is not None and b.until.isoformat().startswith("2026-01-01T01:00:00")
    got = sql_time_bounds(
        "SELECT * FROM otel_metrics_gauge WHERE TimeUnix BETWEEN '2026-01-01' AND '2026-01-02'",
        columns,
    )
    assert got["otel_metrics_gauge"].since is not None
    for unsafe in (
        "SELECT * FROM otel_traces WHERE Timestamp >= '2026-01-01' OR SpanName = 'x'",
        "SELECT * FROM otel_traces WHERE NOT (Timestamp >= '2026-01-01')",
        "SELECT * FROM otel_traces WHERE Timestamp >= '2026-01-01'"
        " UNION ALL SELECT * FROM otel_traces",
        "SELECT * FROM otel_traces WHERE Timestamp >= '2026-01-01' AND Duration >"
        " (SELECT avg(Duration) FROM otel_traces)",
        "SELECT * FROM otel_traces a JOIN otel_logs b ON a.TraceId = b.TraceId"
        " WHERE a.Timestamp >= '2026-01-01'",
        "SELECT * FROM otel_traces WHERE Timestamp >= now() - INTERVAL 1 HOUR",
        "SELECT * FROM otel_traces WHERE other.Timestamp >= '2026-01-01'",
        "SELECT * FROM otel_traces WHERE Timestamp >= 'not a time'",
    ):
        assert sql_time_bounds(unsafe, columns).get("otel_traces", Bounds()) == Bounds(), unsafe


async def test_a_where_clause_narrows_the_files_fetched(copy: Copy) -> None:
    env = copy.env()
    run = await cli(
        env,
        "query",
        "SELECT count(*) FROM otel_traces WHERE Timestamp >= '2030-01-01T00:00:00Z'",
    )
    assert run.code == 0, run.err
    assert not _cached(copy), "no file holds data after 2030: none fetched"
    assert int(run.out.splitlines()[2]) == 0


async def test_every_example_in_the_docs_runs(copy: Copy) -> None:
    section = DOC.read_text().split("\n## Example queries\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 4
    for sql in blocks:
        run = await cli(copy.env(), "query", sql.strip().rstrip(";"))
        assert run.code == 0, (sql, run.err)


def test_the_docs_list_every_column_of_every_table() -> None:
    from otelworker.columnar.schema import TABLES

    text = DOC.read_text()
    for table, schema in TABLES.items():
        section = text.split(f"### `{table}`\n", 1)[1].split("\n### ", 1)[0]
        listed = re.findall(r"^\| `([A-Za-z]+)` \|", section, flags=re.MULTILINE)
        assert listed == schema.names, table


async def test_the_layout_reads_as_hive_partitions_in_duckdb(copy: Copy) -> None:
    import duckdb

    conn = duckdb.connect()
    glob = f"{copy.objects}/otel/a/parquet/otel_traces/*/*/*.parquet"
    rows = conn.execute(
        "SELECT count(*), min(date), min(hour)"
        f" FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchall()
    assert rows[0][0] == len(copy.sent["a"].spans)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(rows[0][1])), rows
