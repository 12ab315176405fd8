"""The command line, `otelworker` (or `python -m otelworker`): serve, migrate and
requeue-dead here, the archive's commands in otelworker/archive/cli.py. Every subcommand is
added with otelworker.cli_help.add_command (its help: what it does, an example, the exit
status); docs/cli.md documents them all."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import asyncpg

from otelworker import cli_help, logs, tls
from otelworker.archive import cli as archive_cli
from otelworker.columnar import query_cli
from otelworker.exceptions import ConfigError, OtelWorkerError
from otelworker.forwarding import cli as forwarding_cli
from otelworker.processes import is_child, serve_processes
from otelworker.settings import Settings, load_settings


async def _serve(settings: Settings, server_tls: tls.ServerTls | None) -> None:
    from otelworker.app import create_app
    from otelworker.front import server as front

    if settings.grpc_enabled is None:
        # `serve` speaks both OTLP transports unless GRPC_ENABLED=false.
        settings = settings.model_copy(update={"grpc_enabled": True})
    app = create_app(settings, server="serve")
    server = front.build(app, settings, server_tls)
    # One of serve --processes N: the port is shared with the siblings (SO_REUSEPORT).
    sock = front.listening_socket(settings.host, settings.port, reuse_port=is_child())
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(server.hooks.exception)  # type: ignore[attr-defined]

    # One owner of the signals: readiness fails first, then the server stops accepting,
    # lets in-flight requests finish with their commits, and runs the lifespan shutdown.
    def on_signal() -> None:
        service = getattr(app.state, "service", None)
        if service is not None:
            service.accepting = False
            service.stopping = True

        def exit_now() -> None:
            server.should_exit = True

        loop.call_later(settings.readiness_drain_delay_s, exit_now)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    scheme = "https" if server_tls is not None else "http"
    grpc = ""
    if settings.grpc_enabled:
        grpc = f"OTLP/gRPC to {host}:{settings.grpc_port}{' over TLS' if server_tls else ''}; "
    mutual = "client certificate required; " if server_tls and server_tls.mutual else ""
    print(
        f"otelworker: send OTLP/HTTP to {scheme}://{host}:{settings.port} "
        f"(/v1/traces, /v1/metrics, /v1/logs); {grpc}{mutual}"
        "probes at /healthz, /readyz; metrics at /metrics",
        file=sys.stderr,
        flush=True,
    )
    try:
        await server.serve(sockets=[sock])
    except SystemExit:
        # uvicorn's way of saying the lifespan startup failed (logged as startup_failed).
        raise OtelWorkerError("the service failed to start (see startup_failed)") from None
    finally:
        sock.close()


def _run_serve(settings: Settings, server_tls: tls.ServerTls | None) -> None:
    """serve's event loop: uvloop (grpcio's asyncio server runs on it; docs/design.md)."""
    import uvloop

    uvloop.run(_serve(settings, server_tls))


async def _with_pool(settings: Settings, action: str, args: argparse.Namespace) -> int:
    from otelworker.service import Service
    from otelworker.staging.database import create_pool, migrate
    from otelworker.staging.queue import StagingQueue

    service = Service(settings)
    dsn = await service._resolve_dsn()
    pool = await create_pool(
        dsn,
        min_size=1,
        max_size=2,
        connect_timeout_s=settings.db_connect_timeout_s,
        startup_timeout_s=settings.db_startup_timeout_s,
    )
    try:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
        if action == "migrate":
            print(f"migrations applied: {applied or 'none (schema current)'}")
            return 0
        queue = StagingQueue(pool)
        if action == "requeue-dead" and args.destination is not None:
            return await forwarding_cli.requeue_dead(args, settings, pool)
        if action == "requeue-dead":
            n = await queue.requeue_dead(args.signal, args.limit)
            print(f"requeued {n} dead item(s)")
            return 0
        if action in archive_cli.COMMANDS:
            return await archive_cli.run(args, settings, pool)
        if action in forwarding_cli.COMMANDS:
            return await forwarding_cli.run(args, settings, pool)
        if action in query_cli.COMMANDS:
            return await query_cli.run(args, settings, pool)
        raise AssertionError(action)
    finally:
        await pool.close()
        await service.release_embedded()


def main(argv: list[str] | None = None) -> int:
    parser = cli_help.program_parser()
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    serve = cli_help.add_command(
        sub,
        "serve",
        summary="run the service (OTLP/HTTP on port 4318, OTLP/gRPC on 4317)",
        description="""\
Run the service: OTLP/HTTP on HOST:PORT (default 0.0.0.0:4318), OTLP/gRPC on
HOST:GRPC_PORT (4317; GRPC_ENABLED=false turns it off), probes at /healthz and /readyz,
Prometheus metrics at /metrics, and (unless ROLE=ingress) the workers that batch the
staged data into object storage. It applies the database migrations at start.

SIGTERM or Ctrl-C stops it gracefully: readiness fails first, the requests in flight
finish their commits, then the workers drain and it exits 0.""",
        example="""\
otelworker serve
DATABASE_URL=postgresql://otel@db/otel S3_BUCKET=telemetry otelworker serve --processes 4""",
        exit_status="""\
Exit status:
  0    stopped by SIGTERM or Ctrl-C, after a clean shutdown
  1    failed to start or stopped on an error (with --processes: one process exited
       on its own, or outlived the shutdown budget)
  2    an invalid setting, certificate or key, or --processes below 1""",
    )
    serve.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="service processes sharing the ports (default: the PROCESSES setting, 1)",
    )
    cli_help.add_command(
        sub,
        "migrate",
        summary="apply the database migrations and exit",
        description="""\
Apply the database migrations (the schema otelworker needs) to DATABASE_URL's database,
and exit. serve applies them itself at start; run this ahead of a rolling update
(docs/deploy.md). Running it again on a current schema changes nothing.""",
        example="DATABASE_URL=postgresql://otel@db/otel otelworker migrate",
    )
    requeue = cli_help.add_command(
        sub,
        "requeue-dead",
        summary="make dead staged items pending again, to be exported once more",
        description="""\
Make dead staged items pending again, so that the workers export them once more. An
item is dead when its export attempts ran out or it could not be decoded (the gauge
otelworker_staging_dead_items, the alert OtelworkerDeadItems). Fix the cause first:
docs/deploy.md, "Runbook: dead items".""",
        example="""\
otelworker requeue-dead
otelworker requeue-dead --signal logs --limit 1000""",
    )
    requeue.add_argument(
        "--signal",
        choices=["traces", "metrics", "logs"],
        help="only this signal's items (default: every signal's)",
    )
    requeue.add_argument(
        "--limit",
        type=archive_cli.positive_int,
        default=1_000_000,
        metavar="N",
        help="at most N items (default 1000000)",
    )
    forwarding_cli.add_requeue_argument(requeue)
    archive_cli.add_commands(sub)
    forwarding_cli.add_commands(sub)
    query_cli.add_commands(sub)
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"otelworker: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if args.command in archive_cli.COMMANDS + forwarding_cli.COMMANDS + query_cli.COMMANDS:
        archive_cli.logs_to_stderr()
    server_tls = None
    if args.command == "serve":
        try:
            # A bad certificate or key stops start-up here, before any process starts.
            server_tls = tls.load(settings)
        except ConfigError as exc:
            print(f"otelworker: {exc}", file=sys.stderr)
            return 2
    try:
        if args.command == "serve":
            processes = args.processes or settings.processes
            if processes < 1:
                print("otelworker: --processes must be at least 1", file=sys.stderr)
                return 2
            if processes > 1 and not is_child():
                return serve_processes(settings, processes)
            _run_serve(settings, server_tls)
            return 0
        return asyncio.run(_with_pool(settings, args.command, args))
    except _COMMAND_DB_ERRORS as exc:
        return _database_error(args.command, exc)
    except OtelWorkerError as exc:
        print(f"otelworker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "serve":
            raise
        print(f"otelworker: {args.command} interrupted", file=sys.stderr)
        return 130


# What a command's database can answer instead of a result: told in one line, exit 1, not
# a traceback (e.g. `migrate` against a standby reached by mistake).
_COMMAND_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionError,
)


def _database_error(command: str, exc: BaseException) -> int:
    hint = ""
    if getattr(exc, "sqlstate", None) == "25006":
        hint = (
            " (the server takes no writes: a standby? point DATABASE_URL at the primary, "
            "or list every host with target_session_attrs=read-write)"
        )
    print(
        f"otelworker: {command}: the database refused or was unreachable: "
        f"{type(exc).__name__}: {exc}{hint}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
