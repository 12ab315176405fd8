"""The embedded PostgreSQL shared by several users of one data directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from otelworker.devdb import EmbeddedPostgres


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's basetemp: a concurrent pytest session resets its mode to 0700,
    # and the server (as the unprivileged ``pgserver`` user when we are root) must reach it.
    root = Path(tempfile.mkdtemp(prefix="otelworker-devdb-"))
    data = root / "pgdata"
    yield data
    EmbeddedPostgres(data).stop("immediate")  # whatever a failed test left running
    shutil.rmtree(root, ignore_errors=True)


def test_the_last_user_out_stops_the_cluster(data_dir: Path) -> None:
    first, second = EmbeddedPostgres(data_dir), EmbeddedPostgres(data_dir)
    dsn = first.attach()
    assert first.started_here and first.running
    assert second.attach() == dsn
    assert not second.started_here

    assert first.detach() is False  # the second still uses it
    assert second.running
    assert second.detach() is True
    assert not EmbeddedPostgres(data_dir).running


def test_a_detach_without_attach_stops_nothing(data_dir: Path) -> None:
    user = EmbeddedPostgres(data_dir)
    user.attach()
    assert EmbeddedPostgres(data_dir).detach() is False
    assert user.running
    assert user.detach() is True


def test_a_cluster_started_by_hand_is_never_stopped(data_dir: Path) -> None:
    by_hand = EmbeddedPostgres(data_dir)
    by_hand.start()  # as `pg_ctl start` would: no otelworker user recorded it
    user = EmbeddedPostgres(data_dir)
    user.attach()
    assert not user.started_here
    assert user.detach() is False
    assert by_hand.running
    by_hand.stop()


def test_a_user_that_died_leaves_it_running_for_the_next(data_dir: Path) -> None:
    dead = EmbeddedPostgres(data_dir)
    dsn = dead.attach()
    dead._release_users()  # what the kernel does when the process is killed outright
    after = EmbeddedPostgres(data_dir)
    assert after.attach() == dsn
    assert not after.started_here
    # The cluster was started by otelworker (the dead user): the last user out stops it.
    assert after.detach() is True
    assert not after.running


def test_a_pid_file_naming_another_program_is_recovered(data_dir: Path) -> None:
    user = EmbeddedPostgres(data_dir)
    user.attach()
    assert user.detach() is True
    # A killed server's postmaster.pid whose PID now names another live program (this
    # test process): PostgreSQL alone would refuse to start ("lock file already exists").
    lines = ["99999999", str(data_dir), "0", "5432", "", "127.0.0.1", "0 0", "ready"]
    lines[0] = str(os.getpid())
    (data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")
    assert not user.running
    again = EmbeddedPostgres(data_dir)
    again.attach()
    assert again.started_here and again.running
    assert again.detach() is True
