"""The forwarding commands: ``redeliver`` and ``destinations`` (wired into
``python -m otelworker`` by ``__main__``, as is ``requeue-dead --destination``)."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from otelworker.archive.manifest import ArchiveIndex
from otelworker.archive.selection import Selection, TimeSpec
from otelworker.cli_help import add_command
from otelworker.exceptions import ConfigError
from otelworker.forwarding.deliveries import DeliveryQueue
from otelworker.forwarding.destinations import Destination, load_destinations
from otelworker.ingress.tenants import valid_tenant
from otelworker.otlp import SIGNALS
from otelworker.settings import Settings

COMMANDS = ("redeliver", "destinations")
CHUNK = 1000  # manifest rows queued per statement

_TIME = "RFC 3339 such as 2024-05-01T10:00:00Z, or an age: 2h is two hours ago"


def _time(text: str) -> TimeSpec:
    try:
        return TimeSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tenant(text: str) -> str:
    if not valid_tenant(text):
        raise argparse.ArgumentTypeError(f"not a tenant name: {text!r}")
    return text


def add_commands(sub: Any) -> None:
    """Add ``redeliver`` and ``destinations`` to ``python -m otelworker``'s subparsers."""
    redeliver = add_command(
        sub,
        "redeliver",
        summary="send archived objects to a destination (again): backfill or rewind",
        description="""\
Queue the archived objects whose data overlaps [--since, --until) for one destination
of DESTINATIONS_FILE; the running forwarders send them. An object already pending or
delivered to that destination is skipped (unless --again); one parked dead is queued
again. Only the signals and tenants the destination takes are queued. Prints how many
objects were queued.""",
        example="""\
otelworker redeliver --destination tempo --since 7d --signal traces
otelworker redeliver --destination loki --since 2024-05-01T00:00:00Z \\
    --until 2024-05-02T00:00:00Z --again""",
        exit_status="""\
Exit status:
  0    queued (or, with --dry-run, counted)
  1    failed; the reason is on stderr
  2    bad usage (--since not before --until), DESTINATIONS_FILE unset or invalid, no
       such destination, or an invalid setting
  130  interrupted (Ctrl-C)""",
    )
    redeliver.add_argument(
        "--destination", required=True, metavar="NAME", help="a destination's name"
    )
    redeliver.add_argument(
        "--since",
        required=True,
        type=_time,
        metavar="TIME",
        help=f"data at or after TIME ({_TIME})",
    )
    redeliver.add_argument(
        "--until", type=_time, metavar="TIME", help=f"data before TIME ({_TIME})"
    )
    redeliver.add_argument("--signal", choices=SIGNALS, help="only this signal (default: all)")
    redeliver.add_argument(
        "--tenant", type=_tenant, metavar="NAME", help="only this tenant's objects"
    )
    redeliver.add_argument(
        "--service", metavar="NAME", help="only objects holding data of service.name NAME"
    )
    redeliver.add_argument(
        "--again",
        action="store_true",
        help="queue objects already delivered to the destination too (sent twice)",
    )
    redeliver.add_argument(
        "--dry-run", action="store_true", help="count what would be queued, queue nothing"
    )

    listing = add_command(
        sub,
        "destinations",
        summary="each destination's progress: pending, oldest pending, delivered, dead, lost",
        description="""\
For each destination in DESTINATIONS_FILE, and each one that has deliveries in the
database but is no longer configured: the objects not yet taken (and the age of the
oldest), the objects and records delivered, the records it rejected, the objects parked
dead, those prune --force deleted before delivery, and the last error.""",
        example="""\
otelworker destinations
otelworker destinations --json | jq 'select(.pending_objects > 0)'""",
        exit_status="""\
Exit status:
  0    listed (no destinations too)
  1    failed; the reason is on stderr
  2    bad usage, DESTINATIONS_FILE invalid, or an invalid setting
  130  interrupted (Ctrl-C)""",
    )
    listing.add_argument(
        "--json", action="store_true", help="one JSON object per line, one per destination"
    )


def add_requeue_argument(requeue: argparse.ArgumentParser) -> None:
    """``requeue-dead --destination NAME``: the destination's dead deliveries instead."""
    requeue.add_argument(
        "--destination",
        metavar="NAME",
        help="make this destination's dead deliveries pending again (instead of the"
        " staging queue's dead items)",
    )


def _configured(settings: Settings) -> list[Destination] | None:
    """DESTINATIONS_FILE's destinations; None when it is not set."""
    if settings.destinations_file is None:
        return None
    return load_destinations(settings.destinations_file)


async def run(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    try:
        configured = _configured(settings)
    except ConfigError as exc:
        print(f"otelworker: {exc}", file=sys.stderr)
        return 2
    queue = DeliveryQueue(pool, settings.default_tenant)
    if args.command == "redeliver":
        return await _redeliver(args, settings, pool, queue, configured)
    if args.command == "destinations":
        return await _destinations(args, queue, configured)
    raise AssertionError(args.command)


async def requeue_dead(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    queue = DeliveryQueue(pool, settings.default_tenant)
    n = await queue.requeue_dead(args.destination, args.limit)
    print(f"requeued {n} dead deliveries for destination {args.destination}")
    return 0


async def _redeliver(
    args: argparse.Namespace,
    settings: Settings,
    pool: asyncpg.Pool,
    queue: DeliveryQueue,
    configured: list[Destination] | None,
) -> int:
    if configured is None:
        print("otelworker: redeliver: DESTINATIONS_FILE is not set", file=sys.stderr)
        return 2
    destination = next((d for d in configured if d.name == args.destination), None)
    if destination is None:
        names = ", ".join(d.name for d in configured) or "none"
        print(
            f"otelworker: redeliver: no destination {args.destination!r} in"
            f" {settings.destinations_file} (configured: {names})",
            file=sys.stderr,
        )
        return 2
    now = datetime.now(UTC)
    since = args.since.resolve(now)
    until = args.until.resolve(now) if args.until else None
    if until is not None and since >= until:
        print("otelworker: --since must be before --until", file=sys.stderr)
        return 2
    signals = tuple(
        s for s in ((args.signal,) if args.signal else SIGNALS) if s in destination.signals
    )
    selection = Selection(
        signals=signals, since=since, until=until, service=args.service, tenant=args.tenant
    )
    index = ArchiveIndex(pool, settings.default_tenant)
    selected = queued = 0
    chunk: list[uuid.UUID] = []

    async def flush(ids: Sequence[uuid.UUID]) -> int:
        return await queue.redeliver(destination.name, ids, args.again, args.dry_run)

    async for row in index.rows(selection):
        if not destination.wants(row.signal, row.tenant):
            continue
        selected += 1
        chunk.append(row.batch_id)
        if len(chunk) >= CHUNK:
            queued += await flush(chunk)
            chunk = []
    if chunk:
        queued += await flush(chunk)
    verb = "would queue" if args.dry_run else "queued"
    skipped = selected - queued
    print(
        f"{verb} {queued} object(s) for destination {destination.name} of {selected}"
        f" selected; {skipped} skipped (already pending"
        f"{'' if args.again else ' or delivered'})"
    )
    return 0


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


async def _destinations(
    args: argparse.Namespace, queue: DeliveryQueue, configured: list[Destination] | None
) -> int:
    summary = {r["destination"]: r for r in await queue.summary()}
    errors = await queue.last_errors()
    losses = await queue.losses()
    names = [d.name for d in configured or []]
    names += sorted((set(summary) | set(losses)) - set(names))
    configured_names = set(d.name for d in configured or [])
    out: list[dict[str, Any]] = []
    for name in names:
        row = summary.get(name)
        err = errors.get(name)

        def get(key: str, row: Any = row) -> Any:
            return row[key] if row is not None else 0

        out.append(
            {
                "destination": name,
                "configured": name in configured_names,
                "pending_objects": int(get("pending")),
                "pending_records": int(get("pending_records")),
                "oldest_pending_s": round(float(get("oldest_s")), 3),
                "delivered_objects": int(get("delivered")),
                "delivered_records": int(get("delivered_records")),
                "rejected_records": int(get("rejected_records")),
                "dead_objects": int(get("dead")),
                "dead_records": int(get("dead_records")),
                "lost_objects": int(losses.get(name, 0)),
                "last_error": None
                if err is None
                else {
                    "status": err["last_status"],
                    "message": err["last_error"],
                    "at": err["last_attempt_at"].isoformat() if err["last_attempt_at"] else None,
                    "delivery": err["status"],
                },
            }
        )
    if args.json:
        for item in out:
            sys.stdout.write(orjson.dumps(item).decode() + "\n")
        return 0
    if not out:
        print("no destinations (DESTINATIONS_FILE unset or empty, and no deliveries)")
        return 0
    header = ("DESTINATION", "CONFIGURED", "PENDING", "OLDEST", "DELIVERED", "RECORDS", "DEAD")
    rows = [
        (
            o["destination"],
            "yes" if o["configured"] else "not configured",
            str(o["pending_objects"]),
            _age(o["oldest_pending_s"]) if o["pending_objects"] else "-",
            str(o["delivered_objects"]),
            str(o["delivered_records"]),
            str(o["dead_objects"]),
        )
        for o in out
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for o in out:
        extra = []
        if o["rejected_records"]:
            extra.append(f"{o['rejected_records']} records rejected by the destination")
        if o["lost_objects"]:
            extra.append(f"{o['lost_objects']} objects lost (prune --force)")
        if o["last_error"] is not None:
            e = o["last_error"]
            extra.append(f"last error: {e['status']}: {e['message']} ({e['at']})")
        for line in extra:
            print(f"{o['destination']}: {line}")
    return 0
