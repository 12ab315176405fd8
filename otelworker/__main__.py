"""Command line: ``python -m otelworker serve|migrate|requeue-dead`` and the archive's
``batches|replay|prune|gc-orphans`` (in :mod:`otelworker.archive.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from otelworker import logs, tls
from otelworker.archive import cli as archive_cli
from otelworker.exceptions import ConfigError, OtelWorkerError
from otelworker.forwarding import cli as forwarding_cli
from otelworker.processes import is_child, reuse_port_socket, serve_processes
from otelworker.settings import Settings, load_settings


async def _serve(settings: Settings, server_tls: tls.ServerTls | None) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from otelworker.app import create_app

    if settings.grpc_enabled is None:
        # `serve` speaks both OTLP transports unless GRPC_ENABLED=false.
        settings = settings.model_copy(update={"grpc_enabled": True})
    app = create_app(settings)
    config = Config()
    if is_child():
        # One of serve --processes N: the port is shared with the siblings (SO_REUSEPORT).
        config.bind = [f"fd://{await reuse_port_socket(settings.host, settings.port)}"]
    else:
        config.bind = [f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_s
    config.accesslog = None
    config.errorlog = logs.logger.getChild("hypercorn")
    config.keep_alive_timeout = 75
    tls.configure_hypercorn(config, server_tls)

    # One owner of the signals: readiness fails first, then hypercorn stops listening,
    # waits for in-flight requests (their commits) and runs the lifespan shutdown.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        service = getattr(app.state, "service", None)
        if service is not None:
            service.accepting = False
            service.stopping = True
        loop.call_later(settings.readiness_drain_delay_s, stop.set)

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
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


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
        raise AssertionError(action)
    finally:
        await pool.close()
        await service.release_embedded()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otelworker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the service (OTLP/HTTP on HOST:PORT 0.0.0.0:4318, OTLP/gRPC on GRPC_PORT 4317)",
    )
    serve.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="service processes sharing the ports (PROCESSES, default 1)",
    )
    sub.add_parser("migrate", help="apply database migrations and exit")
    requeue = sub.add_parser("requeue-dead", help="make dead items pending again")
    requeue.add_argument("--signal", choices=["traces", "metrics", "logs"])
    requeue.add_argument("--limit", type=int, default=1_000_000)
    forwarding_cli.add_requeue_argument(requeue)
    archive_cli.add_commands(sub)
    forwarding_cli.add_commands(sub)
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"otelworker: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if args.command in archive_cli.COMMANDS + forwarding_cli.COMMANDS:
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
            asyncio.run(_serve(settings, server_tls))
            return 0
        return asyncio.run(_with_pool(settings, args.command, args))
    except OtelWorkerError as exc:
        print(f"otelworker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "serve":
            raise
        print(f"otelworker: {args.command} interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
