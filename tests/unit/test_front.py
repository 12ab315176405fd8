"""serve's connection cap, derived from the descriptor limit (otelworker/front/server.py)."""

from __future__ import annotations

import resource

import pytest

from otelworker.front.server import FD_HEADROOM, max_connections
from otelworker.settings import load_settings


def test_the_cap_is_the_descriptor_limit_less_the_pool_and_headroom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    assert max_connections(load_settings(db_pool_max_size=10)) == 1024 - 10 - FD_HEADROOM
    monkeypatch.setattr(resource, "getrlimit", lambda _: (200, 4096))
    assert max_connections(load_settings()) == 32  # never below
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    assert max_connections(load_settings(db_pool_max_size=10)) == (1 << 20) - 10 - FD_HEADROOM


def test_a_set_cap_wins() -> None:
    assert max_connections(load_settings(http_max_connections=500)) == 500
