"""serve's connection cap, derived from the descriptor limit (otelworker/front/server.py)."""

from __future__ import annotations

import errno
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


class _Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, str]] = []

    def emit(self, event: str, reason: str, message: str, **context: object) -> None:
        self.emitted.append((event, reason))


def test_running_out_of_descriptors_in_accept_is_one_counted_event() -> None:
    from types import SimpleNamespace

    from otelworker.front.server import _Hooks
    from otelworker.metrics import Metrics

    metrics, events = Metrics(), _Events()
    app = SimpleNamespace(
        state=SimpleNamespace(service=SimpleNamespace(metrics=metrics, events=events))
    )
    hooks = _Hooks(app)
    passed_on: list[dict[str, object]] = []
    loop = SimpleNamespace(default_exception_handler=passed_on.append)
    exhausted = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(errno.EMFILE, "Too many open files"),
    }
    for _ in range(3):
        hooks.exception(loop, exhausted)  # type: ignore[arg-type]
    other = {"message": "something else", "exception": ValueError("x")}
    hooks.exception(loop, other)  # type: ignore[arg-type]
    assert metrics.registry.get_sample_value("otelworker_descriptors_exhausted_total") == 3
    assert events.emitted == [("descriptors_exhausted", "EMFILE")] * 3  # aggregated there
    assert passed_on == [other]
