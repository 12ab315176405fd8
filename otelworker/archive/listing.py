"""``batches``: the selected manifest rows, as a table for people or JSON lines for scripts.

``--json`` writes one JSON object per line per object, then one last line
``{"totals": {"objects": N, "records": N, "bytes": N}}``. Each row names its tenant (a
row stored before tenants: DEFAULT_TENANT).
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from datetime import datetime
from typing import Any, TextIO

import orjson

from otelworker.archive.manifest import BatchRow, Totals
from otelworker.archive.progress import human_bytes

# (header, width, right-aligned); the key column, first, and the tenant column, after
# these, take the width of their page.
_COLUMNS = (
    ("SIGNAL", 7, False),
    ("RECORDS", 9, True),
    ("BYTES", 11, True),
    ("MIN TIME", 24, False),
    ("MAX TIME", 24, False),
)
_TABLE_PAGE = 200


def _time(at: datetime | None) -> str:
    if at is None:
        return "-"
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def as_json(row: BatchRow) -> dict[str, Any]:
    return {
        "object_key": row.object_key,
        "batch_id": str(row.batch_id),
        "signal": row.signal,
        "items": row.item_count,
        "records": row.record_count,
        "bytes": row.compressed_bytes,
        "raw_bytes": row.raw_bytes,
        "min_time": row.min_time.isoformat() if row.min_time else None,
        "max_time": row.max_time.isoformat() if row.max_time else None,
        "service_names": list(row.service_names),
        "created_at": row.created_at.isoformat(),
        "tenant": row.tenant,
    }


def _table_lines(rows: list[BatchRow]) -> list[str]:
    key_width = max([len("KEY"), *(len(r.object_key) for r in rows)])
    tenant_width = max([len("TENANT"), *(len(r.tenant) for r in rows)])
    header = [f"{'KEY':<{key_width}}"]
    header += [f"{h:>{w}}" if right else f"{h:<{w}}" for h, w, right in _COLUMNS]
    lines = ["  ".join([*header, f"{'TENANT':<{tenant_width}}", "SERVICES"])]
    for r in rows:
        cells = [
            f"{r.object_key:<{key_width}}",
            f"{r.signal:<7}",
            f"{r.record_count:>9}",
            f"{r.compressed_bytes:>11}",
            f"{_time(r.min_time):<24}",
            f"{_time(r.max_time):<24}",
            f"{r.tenant:<{tenant_width}}",
            ",".join(r.service_names) or "-",
        ]
        lines.append("  ".join(cells))
    return lines


async def print_batches(rows: AsyncIterable[BatchRow], out: TextIO, *, json: bool) -> Totals:
    """Write the rows as they come (a table page at a time) and the totals last."""
    totals = Totals()
    page: list[BatchRow] = []
    header_done = False

    def flush() -> None:
        nonlocal header_done
        lines = _table_lines(page)
        out.write("\n".join(lines[0 if not header_done else 1 :]) + "\n")
        header_done = True
        page.clear()

    async for row in rows:
        totals += Totals(1, row.record_count, row.compressed_bytes)
        if json:
            out.write(orjson.dumps(as_json(row)).decode() + "\n")
            continue
        page.append(row)
        if len(page) >= _TABLE_PAGE:
            flush()
    if json:
        out.write(orjson.dumps({"totals": _totals_json(totals)}).decode() + "\n")
        return totals
    if page:
        flush()
    out.write(
        f"total: {totals.objects} objects, {totals.records} records,"
        f" {totals.bytes} bytes ({human_bytes(totals.bytes)}) stored\n"
    )
    return totals


def _totals_json(totals: Totals) -> dict[str, int]:
    return {"objects": totals.objects, "records": totals.records, "bytes": totals.bytes}
