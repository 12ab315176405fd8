"""The archive commands' arguments and what each one runs: ``batches``, ``replay``,
``prune`` and ``gc-orphans`` (wired into ``python -m otelworker`` by ``__main__``)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from otelworker.archive.checkpoint import Checkpoint
from otelworker.archive.listing import print_batches
from otelworker.archive.manifest import ArchiveIndex
from otelworker.archive.progress import Counts, Progress, human_bytes
from otelworker.archive.prune import ORPHAN_MIN_AGE_S, gc_orphans, prune
from otelworker.archive.replay import DEFAULT_MAX_REQUEST_BYTES, Replay, ReplayOptions, summary
from otelworker.archive.selection import Selection, TimeSpec, parse_duration
from otelworker.archive.sender import RetryPolicy, Sender, redact
from otelworker.cli_help import add_command
from otelworker.ingress.tenants import valid_tenant
from otelworker.logs import JSONFormatter, log_event
from otelworker.otlp import SIGNALS
from otelworker.settings import Settings
from otelworker.sinks.factory import open_store

COMMANDS = ("batches", "replay", "prune", "gc-orphans", "compact")

_TIME_HELP = "RFC 3339 such as 2024-05-01T10:00:00Z, or an age: 2h is two hours ago"
_TENANT_HELP = (
    "only tenant NAME's objects (default: every tenant's); objects stored before tenants"
    " are DEFAULT_TENANT's"
)
DEFAULT_TENANT_HEADER = "X-Scope-OrgID"
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token


def _argtype(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1: {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (else a usage error, exit 2)."""
    return int(_argtype(_positive_int)(text))


def _orphan_age_s(text: str) -> float:
    """gc-orphans' age: prune's least age for an orphan, an hour, or more."""
    value = float(text)
    if not value >= ORPHAN_MIN_AGE_S:  # NaN too
        raise ValueError(
            f"must be at least {ORPHAN_MIN_AGE_S} (an hour, as for prune): a younger object"
            f" may be an upload whose manifest row is still on its way: {text}"
        )
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be positive: {text}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError("a header is NAME=VALUE")
    return name.strip(), value.strip()


def _tenant(text: str) -> str:
    if not valid_tenant(text):
        raise ValueError(
            f"not a tenant name: {text!r} (1 to 64 letters, digits, '_', '.', '-',"
            " starting with a letter or digit)"
        )
    return text


def _header_name(text: str) -> str:
    if not _HEADER_NAME.fullmatch(text):
        raise ValueError(f"not an HTTP header name: {text!r}")
    return text


def _target(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {redact(text)}")
    return text


def _selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--signal", choices=SIGNALS, help="only this signal (default: all)")
    parser.add_argument(
        "--since",
        type=_argtype(TimeSpec.parse),
        metavar="TIME",
        help=f"data at or after TIME ({_TIME_HELP})",
    )
    parser.add_argument(
        "--until",
        type=_argtype(TimeSpec.parse),
        metavar="TIME",
        help=f"data before TIME ({_TIME_HELP})",
    )
    parser.add_argument(
        "--service",
        metavar="NAME",
        help="only objects (and, for replay, resources) of service.name NAME",
    )
    parser.add_argument(
        "--limit", type=_argtype(_positive_int), metavar="N", help="at most N objects"
    )
    _tenant_argument(parser)


def _tenant_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", type=_argtype(_tenant), metavar="NAME", help=_TENANT_HELP)


def add_commands(sub: Any) -> None:
    """Add the four archive commands to ``python -m otelworker``'s subparsers."""
    batches = add_command(
        sub,
        "batches",
        summary="list archived objects (manifest rows) with filters, and their totals",
        description="""\
List the archived objects (one manifest row each) whose data overlaps [--since, --until),
signal by signal in the order they were stored, then the totals (objects, records,
bytes). It reads only the database; nothing is changed.""",
        example="""\
otelworker batches --since 2h
otelworker batches --signal traces --service checkout --since 2024-05-01T00:00:00Z --json""",
        exit_status="""\
Exit status:
  0    listed (an empty list too)
  1    failed; the reason is on stderr
  2    bad usage, --since not before --until, or an invalid setting
  130  interrupted (Ctrl-C)""",
    )
    _selection_arguments(batches)
    batches.add_argument(
        "--json",
        action="store_true",
        help="JSON lines: one object per line per archived object, then a last line"
        ' {"totals": {"objects": N, "records": N, "bytes": N}}',
    )

    replay = add_command(
        sub,
        "replay",
        summary="send archived records to an OTLP/HTTP endpoint",
        description="""\
Send the records of the selected objects whose own timestamp is in [--since, --until)
(spans by start time, data points and log records by time, else observed time) to an
OTLP/HTTP endpoint, as gzip-compressed protobuf, retrying 429 and 5xx answers. With
--checkpoint an interrupted replay resumes where it stopped. docs/replay.md has more.""",
        example="""\
otelworker replay --dry-run --signal logs --since 6h
otelworker replay --to http://collector:4318 --since 2024-05-01T10:00:00Z \\
    --until 2024-05-01T11:00:00Z --checkpoint replay-0501.ckpt""",
        exit_status="""\
Exit status:
  0    every selected record was acknowledged (or, with --dry-run, read)
  1    stopped on an error, or the target rejected records (partial success); re-run
       with the same --checkpoint to resume
  2    bad usage (no --to without --dry-run, --since not before --until), or an invalid
       setting
  130  interrupted (Ctrl-C); re-run with the same --checkpoint to resume""",
    )
    _selection_arguments(replay)
    replay.add_argument(
        "--to",
        type=_argtype(_target),
        metavar="URL",
        help="the OTLP/HTTP base URL, e.g. http://collector:4318 (/v1/<signal> is appended)",
    )
    replay.add_argument(
        "--header",
        type=_argtype(_header),
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an HTTP header for every request (repeatable), e.g. Authorization='Bearer ...'",
    )
    tenancy = replay.add_mutually_exclusive_group()
    tenancy.add_argument(
        "--tenant-header",
        type=_argtype(_header_name),
        default=DEFAULT_TENANT_HEADER,
        metavar="NAME",
        help="the header that names each request's tenant (its object's) for a target that"
        f" separates tenants (default {DEFAULT_TENANT_HEADER}); a --header of that name is"
        " sent instead",
    )
    tenancy.add_argument(
        "--no-tenant-header",
        action="store_true",
        help="send no tenant header (the target stores everything as one tenant's)",
    )
    replay.add_argument(
        "--max-request-bytes",
        type=_argtype(_positive_int),
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="largest request, uncompressed (default 4 MiB); objects are cut along resources",
    )
    replay.add_argument(
        "--concurrency",
        type=_argtype(_positive_int),
        default=4,
        metavar="N",
        help="requests in flight at most (default 4)",
    )
    replay.add_argument(
        "--rate",
        type=_argtype(_positive_float),
        metavar="RECORDS_PER_S",
        help="send at most this many records a second",
    )
    replay.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="file of finished objects: appended as objects are acknowledged, read at start"
        " so that a re-run skips them (one file per replay job)",
    )
    replay.add_argument(
        "--timeout-s",
        type=_argtype(_positive_float),
        default=30.0,
        metavar="S",
        help="per request (default 30)",
    )
    replay.add_argument(
        "--max-attempts",
        type=_argtype(_positive_int),
        default=10,
        metavar="N",
        help="attempts per request on 429/502/503/504 or a transport error (default 10)",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="read and cut the objects, print, send nothing"
    )

    prune_ = add_command(
        sub,
        "prune",
        summary="delete manifest rows stored longer ago than an age, then their objects",
        description="""\
Delete the manifest rows stored (created_at) before now minus --older-than, committed
before their objects are deleted, so that no row ever names a missing object; then
remove orphan objects older than both the age and an hour. With --parquet, the same for
the Parquet copy's files (parquet_files rows recorded before now minus that age). While
the Parquet copy is in use, an object not compacted yet is kept (--force deletes it).
Try --dry-run first.""",
        example="""\
otelworker prune --older-than 30d --dry-run
otelworker prune --older-than 30d --parquet 365d""",
    )
    prune_.add_argument(
        "--older-than",
        type=_argtype(parse_duration),
        metavar="AGE",
        help="the OTLP objects' retention, e.g. 30d, 12h, 90m, 3600s",
    )
    prune_.add_argument(
        "--parquet",
        type=_argtype(parse_duration),
        metavar="AGE",
        help="the Parquet copy's retention (files compacted longer ago than AGE go),"
        " separate from --older-than's; at least one of the two is required",
    )
    _tenant_argument(prune_)
    prune_.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    prune_.add_argument(
        "--force",
        action="store_true",
        help="also delete objects a forwarding destination has not taken yet (kept"
        " otherwise); they are counted lost per destination"
        " (otelworker_forward_lost_objects_total); and objects not compacted into the"
        " Parquet copy yet (kept while it is in use)",
    )

    compact = add_command(
        sub,
        "compact",
        summary="convert closed windows of archived objects into Parquet files",
        description="""\
Convert the archived OTLP objects stored before now minus COMPACT_GRACE_S and not
compacted yet into Parquet files (the Collector's clickhouseexporter tables), per tenant
and signal, about COMPACT_TARGET_BYTES of objects a file, under
S3_PREFIX/TENANT/parquet/TABLE/date=YYYY-MM-DD/hour=HH/. Each file is recorded in
parquet_files in the transaction that marks its objects compacted: every record is in
exactly one file. Without --once it runs every COMPACT_INTERVAL_S until stopped (as
ROLE=compactor does). Needs the parquet extra. docs/query.md has more.""",
        example="""\
otelworker compact --once
otelworker compact --once --tenant acme --signal traces""",
        exit_status="""\
Exit status:
  0    compacted (or nothing to do); without --once: stopped by SIGTERM
  1    failed, or (with --once) an object could not be read; the reason is on stderr
  2    bad usage, an invalid setting, or the parquet extra not installed
  130  interrupted (Ctrl-C)""",
    )
    compact.add_argument(
        "--once", action="store_true", help="compact what is closed now, then exit"
    )
    compact.add_argument("--signal", choices=SIGNALS, help="only this signal (default: all)")
    _tenant_argument(compact)

    gc = add_command(
        sub,
        "gc-orphans",
        summary="remove uploaded objects that no manifest row names",
        description="""\
Remove the objects under S3_PREFIX that no manifest row names: uploads whose index
commit was lost (a crash between the upload and the commit). Only objects older than
--older-than-s are taken, so that an upload whose row is on its way is left alone. With
--textfile the outcome is also written for node_exporter's textfile collector, which
the alert OtelworkerOrphanObjects reads (docs/deploy.md).""",
        example="""\
otelworker gc-orphans --dry-run
otelworker gc-orphans --textfile /var/lib/node_exporter/otelworker_gc.prom""",
    )
    gc.add_argument(
        "--older-than-s",
        type=_argtype(_orphan_age_s),
        default=float(ORPHAN_MIN_AGE_S),
        help="only objects older than this many seconds (default and least 3600: a younger"
        " object may be an upload whose manifest row is still on its way)",
    )
    gc.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    gc.add_argument(
        "--textfile",
        metavar="PATH",
        help="also write the outcome as Prometheus metrics to PATH (a *.prom file for"
        " node_exporter's textfile collector)",
    )


def logs_to_stderr() -> None:
    """The archive commands' stdout is their output (a table, JSON lines): logs go to stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and isinstance(
            handler.formatter, JSONFormatter
        ):
            handler.setStream(sys.stderr)


def selection(args: argparse.Namespace, now: datetime) -> Selection:
    return Selection(
        signals=(args.signal,) if args.signal else SIGNALS,
        since=args.since.resolve(now) if args.since else None,
        until=args.until.resolve(now) if args.until else None,
        service=args.service,
        limit=args.limit,
        tenant=args.tenant,
    )


async def run(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    index = ArchiveIndex(pool, settings.default_tenant)
    if args.command == "batches":
        chosen = selection(args, datetime.now(UTC))
        if chosen.since and chosen.until and chosen.since >= chosen.until:
            return _empty_window()
        await print_batches(index.rows(chosen), sys.stdout, json=args.json)
        return 0
    store = await open_store(settings)
    try:
        if args.command == "replay":
            return await _replay(args, index, store)
        if args.command == "compact":
            return await _compact(args, settings, pool, store)
        if args.command == "prune":
            if args.older_than is None and args.parquet is None:
                print(
                    "otelworker: prune: --older-than AGE or --parquet AGE is required",
                    file=sys.stderr,
                )
                return 2
            if args.parquet is not None:
                await _prune_parquet(args, settings, pool, store)
            if args.older_than is None:
                return 0
            result = await prune(
                index,
                store,
                older_than=args.older_than,
                prefix=settings.s3_prefix,
                dry_run=args.dry_run,
                tenant=args.tenant,
                default_tenant=settings.default_tenant,
                force=args.force,
            )
            verb = "would delete" if args.dry_run else "deleted"
            assert result.cutoff is not None
            whose = f" of tenant {args.tenant}" if args.tenant else ""
            print(
                f"{verb} {result.rows} manifest row(s) and their objects"
                f" ({human_bytes(result.bytes)}) stored before {result.cutoff.isoformat()}"
                f"{whose}; {'would remove' if args.dry_run else 'removed'} {result.orphans}"
                " orphan object(s)"
            )
            if result.kept:
                per = ", ".join(f"{n} {c}" for n, c in sorted(result.kept_for.items()))
                print(
                    f"kept {result.kept} object(s) that destinations have not taken yet"
                    f" ({per}); --force deletes them too"
                )
            if result.kept_uncompacted:
                print(
                    f"kept {result.kept_uncompacted} object(s) not compacted into the Parquet"
                    " copy yet (compact runs them first); --force deletes them too"
                )
            if result.lost_for:
                per = ", ".join(f"{n} {c}" for n, c in sorted(result.lost_for.items()))
                lost = "would lose" if args.dry_run else "lost"
                print(f"{lost} undelivered object(s) per destination: {per}")
            return 0
        if args.command == "gc-orphans":
            removed = await gc_orphans(
                store,
                index,
                prefix=settings.s3_prefix,
                older_than=timedelta(seconds=args.older_than_s),
                dry_run=args.dry_run,
            )
            print(f"{'would remove' if args.dry_run else 'removed'} {removed} orphan object(s)")
            if args.textfile:
                write_orphans_textfile(args.textfile, removed, args.dry_run)
            return 0
        raise AssertionError(args.command)
    finally:
        await store.close()


async def _compact(
    args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool, store: Any
) -> int:
    """``compact``: one pass with --once, else a pass every COMPACT_INTERVAL_S until
    SIGTERM/SIGINT (the pass in progress finishes its chunk or rolls back)."""
    import asyncio
    import signal as signals

    from otelworker.columnar import require_pyarrow
    from otelworker.exceptions import ConfigError

    try:
        require_pyarrow()
    except ConfigError as exc:
        print(f"otelworker: {exc}", file=sys.stderr)
        return 2
    from otelworker.columnar.compact import CompactLoop, Compactor

    compactor = Compactor(
        pool,
        store,
        prefix=settings.s3_prefix,
        grace_s=settings.compact_grace_s,
        target_bytes=settings.compact_target_bytes,
        default_tenant=settings.default_tenant,
    )
    if args.once:
        result = await compactor.run_once(tenant=args.tenant, signal=args.signal)
        print(
            f"compacted {result.sources} object(s) into {result.files} Parquet file(s)"
            f" ({result.rows} rows, {human_bytes(result.bytes)})"
            + (f"; {result.unreadable} object(s) unreadable, left" if result.unreadable else "")
            + (
                f"; {result.lost_races} chunk(s) taken by another compactor"
                if result.lost_races
                else ""
            )
            + (
                f"; {result.busy} pass(es) skipped: another compactor held them"
                if result.busy
                else ""
            )
        )
        return 1 if result.unreadable else 0
    loop = CompactLoop(compactor, settings.compact_interval_s, args.tenant, args.signal)
    running = asyncio.get_running_loop()
    stop = asyncio.Event()
    running.add_signal_handler(signals.SIGTERM, stop.set)
    runner = asyncio.create_task(loop.run(), name="compactor")
    stopper = asyncio.create_task(stop.wait(), name="compact-stop")
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        running.remove_signal_handler(signals.SIGTERM)
        for t in (runner, stopper):
            t.cancel()
        await asyncio.gather(runner, stopper, return_exceptions=True)
    if not runner.cancelled():
        failure = runner.exception()
        if failure is not None:
            raise failure
    return 0


async def _prune_parquet(
    args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool, store: Any
) -> None:
    from otelworker.archive.prune import prune_parquet

    result = await prune_parquet(
        ArchiveIndex(pool, settings.default_tenant),
        store,
        older_than=args.parquet,
        dry_run=args.dry_run,
        tenant=args.tenant,
    )
    verb = "would delete" if args.dry_run else "deleted"
    assert result.cutoff is not None
    whose = f" of tenant {args.tenant}" if args.tenant else ""
    print(
        f"{verb} {result.rows} Parquet file(s) ({human_bytes(result.bytes)}) compacted"
        f" before {result.cutoff.isoformat()}{whose}"
    )


async def _replay(args: argparse.Namespace, index: ArchiveIndex, store: Any) -> int:
    if args.to is None and not args.dry_run:
        print("otelworker: replay: --to URL is required (or --dry-run)", file=sys.stderr)
        return 2
    chosen = selection(args, datetime.now(UTC))
    if chosen.since and chosen.until and chosen.since >= chosen.until:
        return _empty_window()
    options = ReplayOptions(
        window=chosen.window,
        service=chosen.service,
        max_request_bytes=args.max_request_bytes,
        concurrency=args.concurrency,
        rate=args.rate,
    )
    totals = await index.totals(chosen)
    checkpoint = Checkpoint.open(args.checkpoint) if args.checkpoint else None
    progress = Progress(sys.stderr, Counts(objects_total=totals.objects, bytes_total=totals.bytes))
    target = redact(args.to) if args.to else None
    given = {name.lower() for name, _ in args.header}
    tenant_header = None if args.no_tenant_header else args.tenant_header
    if tenant_header is not None and tenant_header.lower() in given:
        tenant_header = None  # the operator's --header of that name is sent instead
    log_event(
        "replay_started",
        "replay started",
        target=target,
        objects=totals.objects,
        stored_bytes=totals.bytes,
        dry_run=args.dry_run,
        headers=sorted(name for name, _ in args.header),  # names only: values carry tokens
        tenant=args.tenant,
        tenant_header=tenant_header,
        checkpointed=len(checkpoint.done) if checkpoint else 0,
    )
    started = time.monotonic()
    try:
        if args.dry_run:
            replay = Replay(store, None, options, progress, checkpoint=checkpoint, out=sys.stdout)
            result = await replay.run(index.rows(chosen))
        else:
            sender = Sender(
                args.to,
                dict(args.header),
                concurrency=args.concurrency,
                timeout_s=args.timeout_s,
                retry=RetryPolicy(max_attempts=args.max_attempts),
                tenant_header=tenant_header,
            )
            async with sender:
                replay = Replay(store, sender, options, progress, checkpoint=checkpoint)
                result = await replay.run(index.rows(chosen))
    finally:
        if checkpoint is not None:
            checkpoint.close()
    elapsed = time.monotonic() - started
    c = result.counts
    log_event(
        "replay_finished",
        "replay finished" if result.ok else "replay stopped",
        reason=None if result.ok else ("failed" if result.error else "partial_success"),
        target=target,
        objects=c.objects_done,
        skipped=c.objects_skipped,
        records=c.records,
        requests=c.requests,
        bytes=c.sent_bytes,
        rejected=result.rejected,
        elapsed_s=round(elapsed, 3),
    )
    print(summary(result, dry_run=args.dry_run, elapsed=elapsed))
    if result.error is not None:
        hint = " (re-run with the same --checkpoint to resume)" if checkpoint else ""
        print(f"otelworker: replay stopped: {result.error}{hint}", file=sys.stderr)
        return 1
    if result.rejected:
        print(
            f"otelworker: the target rejected {result.rejected} records (partial success)",
            file=sys.stderr,
        )
        return 1
    return 0


def _empty_window() -> int:
    print("otelworker: --since must be before --until", file=sys.stderr)
    return 2


def write_orphans_textfile(path: str, found: int, dry_run: bool) -> None:
    """gc-orphans' outcome for node_exporter's textfile collector (written atomically)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    Gauge(
        "otelworker_gc_orphans_found",
        "Orphan objects (under S3_PREFIX, named by no manifest row) the last gc-orphans run"
        " found (and removed unless dry_run).",
        ["dry_run"],
        registry=registry,
    ).labels(str(dry_run).lower()).set(found)
    Gauge(
        "otelworker_gc_orphans_last_run_timestamp_seconds",
        "When the last gc-orphans run finished (unix time).",
        registry=registry,
    ).set(time.time())
    write_to_textfile(path, registry)
