"""The command line's help: one shape for every subcommand (what it does, its options, an
example, its exit status), plain text, and docs/cli.md for the rest.

A subcommand is added with :func:`add_command`, which keeps the description and the
example as written (RawDescriptionHelpFormatter: no re-wrapping) and ends the help with the
example and the exit status. tests/unit/test_cli_help.py checks every subcommand's help.
"""

from __future__ import annotations

import argparse
from typing import Any

EXIT_STATUS = """\
Exit status:
  0    done
  1    failed; the reason is on stderr
  2    bad usage, or an invalid setting (the message names its key)
  130  interrupted (Ctrl-C)"""

DOCS = "Every command, its options and exit status: docs/cli.md."

PROGRAM = """\
otelworker is a durable OTLP ingestion service. It takes traces, metrics and logs over
OTLP/HTTP (port 4318) and OTLP/gRPC (port 4317), stages every payload in PostgreSQL
before it answers, and batches the data into S3-compatible object storage.

Configuration is by environment variables (or a .env file in the working directory):
DATABASE_URL, S3_BUCKET, S3_ENDPOINT_URL, ... (docs/configuration.md). Without
DATABASE_URL a private PostgreSQL under ./.otelworker/ is used, and without S3_BUCKET
objects are written under ./.otelworker/objects."""

PROGRAM_EPILOG = f"""\
Examples:
  otelworker serve                       # run the service
  otelworker batches --since 2h          # what was archived in the last two hours
  otelworker requeue-dead --signal logs  # export the dead log items once more
  otelworker serve --help                # one command's options

{EXIT_STATUS}

{DOCS}"""


def program_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="otelworker",
        description=PROGRAM,
        epilog=PROGRAM_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_command(
    sub: Any,
    name: str,
    *,
    summary: str,
    description: str,
    example: str,
    exit_status: str = EXIT_STATUS,
) -> argparse.ArgumentParser:
    """A subcommand of ``sub`` (the program's subparsers).

    ``summary`` is its line in ``otelworker --help``; ``description`` (plain text, lines
    of at most 88 characters) says what it does; ``example`` is one or more command lines
    (a ``# comment`` may follow one); ``exit_status`` replaces the common one where the
    command has codes of its own.
    """
    lines = "\n".join(f"  {line}" for line in example.strip("\n").splitlines())
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=description.strip("\n"),
        epilog=f"Example:\n{lines}\n\n{exit_status}\n\n{DOCS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser
