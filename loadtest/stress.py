"""The stress harness: ``python -m loadtest.stress --mode verify|stress [options]``.

``--mode verify`` (``make stress-verify``, CI): provisions PostgreSQL and S3, starts the
service as a real process with small limits per scenario, and checks invariants against
what the stores hold: rate-limit burst, saturation under each overflow policy, slow
object store, object store outage and recovery, SIGKILL and restart, OTLP/gRPC through
the same admission (acknowledged, shed, throttled), 200 near-maximum bodies at once
within a peak-RSS bound computed from the settings, and two tenants at once, one over its
ingest bytes limit (each tenant's records in its own objects only). One PASS/FAIL line per
scenario, then a summary; the exit status is 1 if any invariant broke.

``--mode stress`` (``make stress-verify MODE=stress``): aggressive load for a while
against the same set-up, over OTLP/HTTP or (``--transport grpc``) OTLP/gRPC, a live
progress line, then a summary and a JSON report plus a PNG chart under
``loadtest/reports/``. See docs/stress-testing.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

from loadtest.scenarios import SCENARIOS, Report
from loadtest.stress_env import Harness, InvariantBroken

REPORTS = Path(__file__).resolve().parent / "reports"


def _print(line: str = "") -> None:
    print(line, flush=True)


async def run_verify(args: argparse.Namespace) -> int:
    names = args.only or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        _print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
        return 2
    workdir = Path(args.workdir or REPORTS / f"verify-{datetime.now():%Y%m%d-%H%M%S}")
    started = time.monotonic()
    harness = Harness(workdir / "logs", keep=args.keep)
    results: list[tuple[str, bool, float]] = []
    try:
        try:
            await asyncio.to_thread(harness.start)
        except Exception as exc:
            _print(f"FAIL  provisioning  {type(exc).__name__}: {exc}")
            return 1
        _print(
            f"stress verify: {harness.describe()}; service logs in {workdir / 'logs'} "
            f"(provisioned in {time.monotonic() - started:.1f} s)"
        )
        for name in names:
            report = Report()
            t0 = time.monotonic()
            ok = False
            try:
                async with asyncio.timeout(args.scenario_timeout):
                    await SCENARIOS[name](harness, report)
                ok = True
                outcome = report.lines[0] if report.lines else "ok"
                details = report.lines[1:]
            except InvariantBroken as exc:
                outcome = f"invariant {exc.name} broken: {exc.detail}"
                details = report.lines
            except TimeoutError:
                outcome = (
                    f"invariant scenario_deadline broken: not done in {args.scenario_timeout} s"
                )
                details = report.lines
            except Exception as exc:
                outcome = f"error {type(exc).__name__}: {exc}"
                details = report.lines
                traceback.print_exc(file=sys.stderr)
            took = time.monotonic() - t0
            results.append((name, ok, took))
            _print(f"{'PASS' if ok else 'FAIL'}  {name:<13} {took:5.1f} s  {outcome}")
            for line in details:
                _print(f"      {'':<13}          {line}")
    finally:
        await harness.close()
    failed = [name for name, ok, _ in results if not ok]
    total = time.monotonic() - started
    if failed:
        _print(
            f"stress verify: FAIL: {len(failed)} of {len(results)} scenarios broke an invariant "
            f"({', '.join(failed)}) in {total:.1f} s; logs in {workdir / 'logs'}"
        )
        return 1
    _print(f"stress verify: PASS: {len(results)} of {len(results)} scenarios in {total:.1f} s")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.stress", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--mode", choices=("verify", "stress"), default="verify")
    parser.add_argument("--workdir", help="service logs and reports go here")
    parser.add_argument("--keep", action="store_true", help="keep databases and buckets")
    verify = parser.add_argument_group("verify mode")
    verify.add_argument(
        "--only", action="append", metavar="SCENARIO", help=f"one of {', '.join(SCENARIOS)}"
    )
    verify.add_argument("--scenario-timeout", type=float, default=180.0, metavar="S")
    stress = parser.add_argument_group("stress mode")
    stress.add_argument("--duration", type=float, default=60.0, metavar="S", help="load time")
    stress.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    stress.add_argument(
        "--transport",
        choices=("http", "grpc"),
        default=None,
        help="OTLP/HTTP (default) or OTLP/gRPC: the Export RPCs on the service's GRPC_PORT "
        "(started with GRPC_ENABLED=true); gRPC sends protobuf only",
    )
    stress.add_argument(
        "--grpc-channels",
        type=int,
        default=4,
        metavar="N",
        help="with --transport grpc: channels (connections) the lanes share (default 4)",
    )
    stress.add_argument(
        "--signals",
        default="traces=3,logs=2,metrics=1",
        help="signal mix as weights (default traces=3,logs=2,metrics=1)",
    )
    stress.add_argument("--records", type=int, default=50, help="records per request")
    stress.add_argument("--pad", type=int, default=64, help="bytes of attribute padding per record")
    stress.add_argument(
        "--encoding",
        choices=("protobuf", "gzip", "json", "mix"),
        default="protobuf",
        help="request encoding (mix: protobuf, gzip and JSON in turn); with --transport grpc "
        "only protobuf, or gzip (gRPC message compression)",
    )
    stress.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a service setting (env key), e.g. --set ENABLE_RATE_LIMITING=true",
    )
    stress.add_argument(
        "--failover-at",
        type=float,
        default=None,
        metavar="S",
        help="S seconds into the load, SIGKILL the database's primary and promote its"
        " synchronous standby (a primary and standby of the run's own; DATABASE_URL lists"
        " both with target_session_attrs=read-write); the report gives the time to ready",
    )
    stress.add_argument("--drain-timeout", type=float, default=300.0, metavar="S")
    stress.add_argument(
        "--no-accounting",
        action="store_true",
        help="skip the drain and the record-by-record check after the load",
    )
    stress.add_argument("--report-dir", default=str(REPORTS))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.transport is not None and args.mode != "stress":
        parser.error(
            "--transport applies to --mode stress; verify mode has its own gRPC scenario "
            "(--only grpc)"
        )
    args.transport = args.transport or "http"
    if args.transport == "grpc" and args.encoding not in ("protobuf", "gzip"):
        parser.error(
            f"--encoding {args.encoding} cannot go over gRPC: OTLP/gRPC carries protobuf "
            "messages only (JSON is an OTLP/HTTP encoding); use --encoding protobuf, or gzip "
            "for gRPC message compression"
        )
    if args.grpc_channels < 1:
        parser.error("--grpc-channels must be at least 1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.mode == "verify":
        return asyncio.run(run_verify(args))
    from loadtest.stress_run import run_stress

    return asyncio.run(run_stress(args))


if __name__ == "__main__":
    sys.exit(main())
