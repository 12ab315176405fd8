"""The Parquet copy's read commands, ``query`` and ``verify`` (wired into
``python -m otelworker`` by ``__main__``); their work is in :mod:`.query` and :mod:`.verify`.

Whose data a command may read: ``--tenant``, or the tenant a token names (a line of
AUTH_TOKENS_FILE, given as OTELWORKER_TOKEN or ``--token-file``), which forces it; with
QUERY_REQUIRE_TOKEN=true a command without a token is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from otelworker.archive.cli import _argtype, _positive_int, _tenant
from otelworker.archive.selection import TimeSpec
from otelworker.cli_help import add_command
from otelworker.exceptions import ConfigError
from otelworker.logs import log_event
from otelworker.settings import Settings

COMMANDS = ("query", "verify")
TOKEN_ENV = "OTELWORKER_TOKEN"
EXIT_REFUSED = 2
EXIT_TOKEN = 4

_TIME_HELP = "RFC 3339 such as 2024-05-01T10:00:00Z, or an age: 2h is two hours ago"
_TOKEN_HELP = (
    f"a file holding a tenant's bearer token (else ${TOKEN_ENV}): the command reads only"
    " the tenant that AUTH_TOKENS_FILE gives the token to"
)


def _common(parser: argparse.ArgumentParser, *, required_times: bool) -> None:
    parser.add_argument(
        "--since",
        type=_argtype(TimeSpec.parse),
        required=required_times,
        metavar="TIME",
        help=f"data at or after TIME ({_TIME_HELP})",
    )
    parser.add_argument(
        "--until",
        type=_argtype(TimeSpec.parse),
        required=required_times,
        metavar="TIME",
        help=f"data before TIME ({_TIME_HELP})",
    )
    parser.add_argument(
        "--tenant",
        type=_argtype(_tenant),
        metavar="NAME",
        help="only tenant NAME's files (default: every tenant's, unless a token names one)",
    )
    parser.add_argument("--token-file", metavar="PATH", help=_TOKEN_HELP)


def add_commands(sub: Any) -> None:
    query = add_command(
        sub,
        "query",
        summary="run read-only SQL (DuckDB) over the archive's Parquet copy",
        description="""\
Run one read-only SQL statement (SELECT, WITH ... SELECT) in an embedded DuckDB over
the seven tables of the Parquet copy (otel_traces, otel_logs, otel_metrics_gauge,
otel_metrics_sum, otel_metrics_histogram, otel_metrics_exponential_histogram,
otel_metrics_summary; the columns of the Collector's clickhouseexporter). Each table is
a view of the files the parquet_files manifest selects for --tenant, --since/--until,
--service and the time bounds the WHERE clause sets, fetched into a local cache
(QUERY_CACHE_DIR, at most QUERY_CACHE_BYTES). --since/--until/--service also filter the
views' rows. The SQL can read nothing else: no other file, no other tenant's.
docs/query.md lists every column and has example queries.""",
        example="""\
otelworker query "SELECT ServiceName, count(*) FROM otel_traces GROUP BY 1" --since 1h
OTELWORKER_TOKEN=... otelworker query --format json \\
    "SELECT Timestamp, Body FROM otel_logs WHERE TraceId = '5b8efff798038103d269b633813fc60c'\"""",
        exit_status=f"""\
Exit status:
  0    the result was printed (an empty one too)
  1    failed (the SQL did not run, the database or the object store failed, the
       files do not fit in QUERY_CACHE_BYTES); the reason is on stderr
  {EXIT_REFUSED}    bad usage, an invalid setting, or SQL that is not one read-only statement
  {EXIT_TOKEN}    the token names no tenant, or another than --tenant; or none was given and
       QUERY_REQUIRE_TOKEN=true
  130  interrupted (Ctrl-C)""",
    )
    query.add_argument("sql", metavar="SQL", help="one SELECT (or WITH ... SELECT) statement")
    _common(query, required_times=False)
    query.add_argument("--service", metavar="NAME", help="only rows of service.name NAME")
    query.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (aligned columns, the default), csv (a header line), json (JSON lines)",
    )

    verify = add_command(
        sub,
        "verify",
        summary="prove the Parquet copy equals the OTLP objects it was compacted from",
        description="""\
Check the Parquet files whose data overlaps [--since, --until): that each file's rows
equal its manifest row's count and the record counts of its source objects (the
metric tables of the same sources together), that no source object is in two files of
a table, and that a sample of each file's rows equals the same records read from the
source OTLP objects (decoded and converted again), field by field, both ways. It reads
every source object of each file. Nothing is changed.""",
        example="""\
otelworker verify --since 24h --until 0s
otelworker verify --since 2024-05-01T00:00:00Z --until 2024-05-02T00:00:00Z --sample 0""",
        exit_status=f"""\
Exit status:
  0    every file checked agrees with its source objects
  1    a file disagrees (each is named on stdout), or the check failed
  {EXIT_REFUSED}    bad usage, --since not before --until, or an invalid setting
  {EXIT_TOKEN}    the token names no tenant, or another than --tenant (as for query)
  130  interrupted (Ctrl-C)""",
    )
    _common(verify, required_times=True)
    verify.add_argument(
        "--sample",
        type=_argtype(lambda t: 0 if t == "0" else _positive_int(t)),
        default=100,
        metavar="N",
        help="rows compared field by field per file, each way (default 100; 0: every row)",
    )
    verify.add_argument(
        "--seed", type=int, default=None, metavar="N", help="the sample's random seed"
    )


def resolve_tenant(args: argparse.Namespace, settings: Settings) -> str | None:
    """The tenant the command is confined to: the token's (forced), else --tenant."""
    from otelworker.columnar.query import TokenRefused

    token: str | None = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise TokenRefused(f"cannot read --token-file: {exc.strerror}") from None
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].strip()
    if token is None:
        if settings.query_require_token:
            raise TokenRefused(
                f"QUERY_REQUIRE_TOKEN=true: give a tenant's token (${TOKEN_ENV} or --token-file)"
            )
        tenant: str | None = args.tenant
        return tenant
    if not settings.auth_tokens_file:
        raise TokenRefused("a token was given but AUTH_TOKENS_FILE is not set to check it")
    from otelworker.ingress.tenants import TokenFile

    try:
        owner = TokenFile(settings.auth_tokens_file).tenant_of(token)
    except ConfigError as exc:
        raise TokenRefused(str(exc)) from None
    if owner is None:
        log_event("query_token_refused", "token refused", reason="unknown_token")
        raise TokenRefused("the token names no tenant (AUTH_TOKENS_FILE)")
    if args.tenant is not None and args.tenant != owner:
        log_event("query_token_refused", "token refused", reason="other_tenant")
        raise TokenRefused(f"the token is not tenant {args.tenant}'s")
    return owner


async def run(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from otelworker.columnar import require_pyarrow

    require_pyarrow()
    from otelworker.columnar.query import QueryRefused, TokenRefused

    try:
        tenant = resolve_tenant(args, settings)
    except TokenRefused as exc:
        print(f"otelworker: {args.command}: {exc}", file=sys.stderr)
        return EXIT_TOKEN
    now = datetime.now(UTC)
    since = args.since.resolve(now) if args.since else None
    until = args.until.resolve(now) if args.until else None
    if since is not None and until is not None and since >= until:
        print("otelworker: --since must be before --until", file=sys.stderr)
        return EXIT_REFUSED
    from otelworker.sinks.factory import open_store

    if args.command == "query":
        import duckdb

        from otelworker.columnar.query import FileCache, Filters, render, run_query

        filters = Filters(tenant=tenant, since=since, until=until, service=args.service)
        cache = FileCache(Path(settings.query_cache_dir), settings.query_cache_bytes)
        store = await open_store(settings)
        try:
            result = await run_query(pool, store, cache, args.sql, filters)
        except QueryRefused as exc:
            log_event("query_refused", "query refused", reason="not_read_only")
            print(f"otelworker: query: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except duckdb.Error as exc:
            print(f"otelworker: query failed: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.close()
        render(result, args.format, sys.stdout)
        return 0
    if args.command == "verify":
        from otelworker.columnar.verify import verify

        assert since is not None and until is not None
        store = await open_store(settings)
        try:
            report = await verify(
                pool,
                store,
                since=since,
                until=until,
                tenant=tenant,
                sample=args.sample,
                seed=args.seed,
                default_tenant=settings.default_tenant,
            )
        finally:
            await store.close()
        report.print(sys.stdout)
        return 0 if report.ok else 1
    raise AssertionError(args.command)
