"""The compaction row: OTLP objects to Parquet, its size, and a query over an hour.

    python -m loadtest.bench compact                 # via the benchmark (bench.py's hook)
    python -m loadtest.bench_compact                 # alone, the defaults below
    python -m loadtest.bench_compact --objects 20 --per-object 25 --spans 512 \\
        --query-spans 1000000 --json compact.json

In one process, no database or object store (what is measured is the CPU work):

1. **Objects** as the exporter writes them: ``--per-object`` requests of ``--spans`` spans
   (loadtest.payloads, the ingest benchmark's spans, fresh ids each), each compressed
   as a joinable gzip member at level 1 (S3_COMPRESSION=gzip's default, ISA-L), joined
   into one indexed member (otelworker/gzjoin.py).
2. **Compaction**, timed by the process's CPU time (every thread's: pyarrow's writer
   uses several) and by the wall clock: each object decompressed
   (otelworker.archive.reader.decompress), converted (otelworker.columnar.convert.tables_of:
   the compiled walker, otelworker/_wire.c, where it is built, else decoded and converted
   in Python), the tables joined and written as one Parquet file (write_parquet: zstd, dictionaries,
   statistics), as the compactor's convert step does. Spans per CPU second is the
   compaction's spans/s per core; the target is >= 0.5x the ``ROLE=ingress`` spans/s per
   core at 512 spans (``--ingress-us-per-span``: the service + PostgreSQL CPU per span of
   the ingest benchmark's 512-span row; default the figure in docs/performance.md).
3. **Size**: Parquet bytes per span next to the gzip objects' bytes per span, for the
   same spans; target <= 0.6x.
4. **A query over an hour**: ``--query-spans`` spans (the converted spans again, with
   fresh span ids and their start times spread over one hour) in four files, queried
   through ``otelworker query``'s DuckDB set-up (views, the lock-down), without the
   manifest lookup and the fetch: the slowest spans per service, and the error rate per
   minute and service. First run and the median of three more.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.payloads import TraceRequestFactory
from otelworker import gzjoin
from otelworker.compression import compress
from otelworker.settings import Compression

# docs/performance.md, "How fast is it" (commit de6a6e6): the ROLE=ingress 512-span row's
# service + PostgreSQL CPU per span. `python -m loadtest.bench all` passes the figure of its
# own ingest run instead.
INGRESS_US_PER_SPAN = 1.85
TARGET_SPEED = 0.5
TARGET_SIZE = 0.6
HOUR_NS = 3600 * 10**9

QUERIES = {
    "slowest spans per service": """
        SELECT ServiceName, SpanName, Duration, TraceId FROM otel_traces
        QUALIFY row_number() OVER (PARTITION BY ServiceName ORDER BY Duration DESC) <= 5
        ORDER BY ServiceName, Duration DESC""",
    "error rate per minute and service": """
        SELECT date_trunc('minute', Timestamp) AS minute, ServiceName, count(*) AS spans,
               count_if(StatusCode = 'Error') / count(*) AS error_rate
          FROM otel_traces GROUP BY ALL ORDER BY ALL""",
}


def make_objects(objects: int, per_object: int, spans: int) -> list[bytes]:
    """Objects as the flush writes them: each request staged as a joinable gzip member
    (level 1, ISA-L), the members joined into one, indexed (otelworker/gzjoin.py)."""
    factory = TraceRequestFactory(spans)
    out = []
    for _ in range(objects):
        parts = []
        for _ in range(per_object):
            raw = factory.make()
            fragment = gzjoin.fragment(compress(raw, Compression.GZIP, 1))
            assert fragment is not None
            parts.append((fragment[0], fragment[1], len(raw), spans))
        out.append(gzjoin.join(parts))
    return out


def compact(objects: list[bytes], tenant: str = "bench") -> tuple[Any, bytes]:
    """The compactor's CPU work for one file: decode, convert, join, write."""
    import pyarrow as pa

    from otelworker.archive.reader import decompress
    from otelworker.columnar.convert import tables_of, write_parquet

    parts = []
    for n, body in enumerate(objects):
        raw = decompress(f"bench/traces_{n}.binpb.gz", body)
        parts.append(tables_of("traces", raw, tenant)["otel_traces"])
    table = pa.concat_tables(parts)
    sink = io.BytesIO()
    write_parquet(
        table,
        table_name="otel_traces",
        tenant=tenant,
        source_batches=[f"00000000-0000-0000-0000-{n:012d}" for n in range(len(objects))],
        sink=sink,
    )
    return table, sink.getvalue()


def _hour_of(table: Any, spans: int, directory: Path, files: int = 4) -> list[Path]:
    """``spans`` spans over one hour in ``files`` files: ``table`` repeated, each copy
    with fresh span ids and its start times spread over its quarter of the hour."""
    import random
    from datetime import UTC, datetime

    import pyarrow as pa

    from otelworker.columnar.convert import write_parquet

    start = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) * 10**9
    per_file = spans // files
    paths = []
    rng = random.Random(1)
    for f in range(files):
        copies = -(-per_file // table.num_rows)
        part = pa.concat_tables([table] * copies).slice(0, per_file)
        base = start + f * HOUR_NS // files
        times = sorted(base + rng.randrange(HOUR_NS // files) for _ in range(per_file))
        part = part.set_column(
            part.schema.get_field_index("Timestamp"),
            "Timestamp",
            pa.array(times, pa.int64()).cast(part.schema.field("Timestamp").type),
        )
        ids = [f"{f:04x}{i:012x}" for i in range(per_file)]
        part = part.set_column(part.schema.get_field_index("SpanId"), "SpanId", pa.array(ids))
        path = directory / f"part-{f}.parquet"
        write_parquet(
            part, table_name="otel_traces", tenant="bench", source_batches=[], sink=str(path)
        )
        paths.append(path)
    return paths


def time_queries(paths: list[Path]) -> dict[str, Any]:
    from otelworker.columnar.query import Filters, Plan, connect, execute
    from otelworker.columnar.schema import TABLES, TIME_COLUMN

    plan = Plan({t: [] for t in TABLES}, Filters(), dict(TIME_COLUMN))
    out: dict[str, Any] = {}
    for name, sql in QUERIES.items():
        runs = []
        rows = 0
        for _ in range(4):
            started = time.perf_counter()
            conn = connect(plan, {"otel_traces": paths}, TABLES)
            try:
                rows = len(execute(conn, sql).rows)
            finally:
                conn.close()
            runs.append(time.perf_counter() - started)
        out[name] = {
            "first_s": round(runs[0], 3),
            "median_s": round(statistics.median(runs[1:]), 3),
            "rows": rows,
        }
    return out


def bench_compact(
    objects: int = 20,
    per_object: int = 25,
    spans: int = 512,
    query_spans: int = 1_000_000,
    ingress_us_per_span: float = INGRESS_US_PER_SPAN,
    rounds: int = 3,
) -> dict[str, Any]:
    bodies = make_objects(objects, per_object, spans)
    # Warm-up: the imports, and the first compaction of the whole set, which faults in the
    # memory the rounds reuse (as a long-running compactor's first chunk does; measured,
    # that round costs ~1.4x the next ones).
    compact(bodies)
    cpus: list[float] = []
    walls: list[float] = []
    for _ in range(rounds):  # the median round: the host's other work moves single ones
        table = parquet = None  # the last round's freed first, as the compactor frees a chunk
        cpu0, wall0 = time.process_time(), time.perf_counter()
        table, parquet = compact(bodies)
        cpus.append(time.process_time() - cpu0)
        walls.append(time.perf_counter() - wall0)
    assert table is not None and parquet is not None
    cpu = statistics.median(cpus)
    wall = statistics.median(walls)
    total = objects * per_object * spans
    assert table.num_rows == total, (table.num_rows, total)
    gz_bytes = sum(len(b) for b in bodies)
    per_core = total / cpu
    ingress_per_core = 1e6 / ingress_us_per_span
    with tempfile.TemporaryDirectory(prefix="otelworker-bench-compact-") as tmp:
        paths = _hour_of(table, query_spans, Path(tmp))
        hour_bytes = sum(p.stat().st_size for p in paths)
        queries = time_queries(paths)
    speed = per_core / ingress_per_core
    size = len(parquet) / gz_bytes
    return {
        "spans": total,
        "objects": objects,
        "spans_per_request": spans,
        "requests_per_object": per_object,
        "cpu_s": round(cpu, 3),
        "cpu_s_rounds": [round(c, 3) for c in cpus],
        "wall_s": round(wall, 3),
        "spans_per_cpu_s": round(per_core),
        "spans_per_wall_s": round(total / wall),
        "us_cpu_per_span": round(cpu / total * 1e6, 3),
        "ingress_us_per_span": ingress_us_per_span,
        "ingress_spans_per_core": round(ingress_per_core),
        "gzip_bytes_per_span": round(gz_bytes / total, 1),
        "parquet_bytes_per_span": round(len(parquet) / total, 1),
        "query": {"spans": query_spans, "files": len(paths), "bytes": hour_bytes, **queries},
        "targets": [
            {
                "name": "compaction spans/s per core >= 0.5x ROLE=ingress at 512 spans",
                "value": round(speed, 2),
                "met": speed >= TARGET_SPEED,
            },
            {
                "name": "Parquet bytes <= 0.6x the gzip OTLP objects'",
                "value": round(size, 2),
                "met": size <= TARGET_SIZE,
            },
        ],
    }


def print_compact(result: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    r = result
    print(
        f"compaction: {r['spans']:,} spans ({r['objects']} objects of {r['requests_per_object']}"
        f" x {r['spans_per_request']}-span requests): {r['spans_per_cpu_s']:,} spans per CPU"
        f" second ({r['us_cpu_per_span']} µs/span, the median of rounds of"
        f" {', '.join(str(c) for c in r['cpu_s_rounds'])} CPU s;"
        f" {r['spans_per_wall_s']:,} spans/s wall);"
        f" ROLE=ingress {r['ingress_spans_per_core']:,} spans/s per core"
        f" ({r['ingress_us_per_span']} µs/span)",
        file=out,
    )
    print(
        f"size: Parquet {r['parquet_bytes_per_span']} B/span, gzip OTLP objects"
        f" {r['gzip_bytes_per_span']} B/span",
        file=out,
    )
    q = r["query"]
    print(
        f"query over an hour ({q['spans']:,} spans, {q['files']} files,"
        f" {q['bytes'] / 1e6:.1f} MB):",
        file=out,
    )
    for name in QUERIES:
        print(
            f"  {name}: first {q[name]['first_s']} s, then {q[name]['median_s']} s"
            f" ({q[name]['rows']} rows)",
            file=out,
        )
    for target in r["targets"]:
        print(
            f"target {target['name']}: {target['value']}x, {'met' if target['met'] else 'MISSED'}",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_compact", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--per-object", type=int, default=25, help="requests per object")
    parser.add_argument("--spans", type=int, default=512, help="spans per request")
    parser.add_argument("--query-spans", type=int, default=1_000_000)
    parser.add_argument("--ingress-us-per-span", type=float, default=INGRESS_US_PER_SPAN)
    parser.add_argument("--rounds", type=int, default=3, help="compactions timed (median)")
    parser.add_argument(
        "--no-compiled",
        action="store_true",
        help="convert in Python, as where otelworker._wire is not built (an A/B)",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.no_compiled:
        from otelworker.columnar import convert

        convert.compiled = None
    result = bench_compact(
        args.objects,
        args.per_object,
        args.spans,
        args.query_spans,
        args.ingress_us_per_span,
        rounds=args.rounds,
    )
    print_compact(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.strict and not all(t["met"] for t in result["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
