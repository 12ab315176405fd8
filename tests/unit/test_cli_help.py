"""`otelworker --help` and every subcommand's `--help`, as a user runs them: plain text
(no reStructuredText), an example, the exit status; and each subcommand in docs/cli.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI_DOC = ROOT / "docs" / "cli.md"
MARKUP = re.compile(r"``|:(?:mod|class|func|meth|attr|ref):`|^\.\. \w+::", re.MULTILINE)


def _help(*command: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run(
        [sys.executable, "-m", "otelworker", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _commands(program_help: str) -> list[str]:
    """The subcommands `otelworker --help` lists (under "commands:")."""
    section = program_help.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^    (\S+)", section, flags=re.MULTILINE)


PROGRAM_HELP = _help()
COMMANDS = _commands(PROGRAM_HELP)


def test_the_program_lists_its_commands() -> None:
    assert {"serve", "migrate", "requeue-dead", "batches", "replay", "prune", "gc-orphans"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_plain_text_with_an_example_and_the_exit_status(command: str) -> None:
    text = PROGRAM_HELP if not command else _help(command)
    assert not MARKUP.findall(text), f"{command or 'otelworker'} --help: reStructuredText"
    how = "add it with otelworker.cli_help.add_command"
    assert re.search(r"^Examples?:\n  .*\botelworker ", text, flags=re.MULTILINE), how
    assert re.search(r"^Exit status:\n  0 ", text, flags=re.MULTILINE), how
    assert "docs/cli.md" in text, how


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_is_documented_with_its_exit_status(command: str) -> None:
    doc = CLI_DOC.read_text()
    sections = re.split(r"^## ", doc, flags=re.MULTILINE)
    found = [s for s in sections if s.startswith(f"`{command}`")]
    assert len(found) == 1, f"docs/cli.md has no section ## `{command}`"
    (section,) = found
    assert "Exit status" in section, command
    assert re.search(r"^\| `0` \|", section, flags=re.MULTILINE), command


@pytest.mark.parametrize("limit", ["0", "-5", "many"])
def test_requeue_dead_limit_below_one_is_a_usage_error(limit: str) -> None:
    """`--limit 0` (or a negative) would requeue nothing, or everything: a usage error
    naming the flag, exit 2, before any database is touched."""
    done = subprocess.run(
        [sys.executable, "-m", "otelworker", "requeue-dead", "--limit", limit],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
        check=False,
    )
    assert done.returncode == 2
    assert "--limit" in done.stderr
