"""``grpc.health.v1.Health`` on ``python -m otelworker serve``'s gRPC port, checked as
``grpc_health_probe`` and a Kubernetes ``grpc:`` probe check it: SERVING once ready, then
NOT_SERVING from the SIGTERM on (while the port still answers, during the readiness drain
delay); an open Watch stream gets NOT_SERVING and ends, so the process exits promptly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import free_port

pytestmark = pytest.mark.acceptance

READY_S = 90  # deadlines, not waits
DRAIN_DELAY_S = 4.0
SHUTDOWN_GRACE_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _env(**settings: str) -> dict[str, str]:
    from otelworker.settings import Settings, env_key

    keys = {env_key(n) for n in Settings.model_fields}
    keys |= {f"OTEL_{k}" for k in keys}
    env = {k: v for k, v in os.environ.items() if k.upper() not in keys}
    return {**env, **settings, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port, grpc_port = free_port(), free_port()
    env = _env(
        DATABASE_URL=database_url,
        HOST="127.0.0.1",
        PORT=str(port),
        GRPC_PORT=str(grpc_port),
        ROLE="ingress",
        READINESS_DRAIN_DELAY_S=str(DRAIN_DELAY_S),
        SHUTDOWN_GRACE_S=str(SHUTDOWN_GRACE_S),
    )
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "otelworker", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_S
        with httpx.Client(timeout=2) as client:
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "serve not ready in time"
                time.sleep(0.1)
        yield proc, grpc_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def probe(channel: grpc.Channel, service: str = "") -> int:
    """What grpc_health_probe does: one Check, its status."""
    stub = health_pb2_grpc.HealthStub(channel)
    answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(answer.status)


def test_health_is_serving_then_not_serving_from_sigterm(
    served: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, grpc_port = served
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        assert probe(channel) == SERVING
        assert probe(channel, "opentelemetry.proto.collector.trace.v1.TraceService") == SERVING
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING

        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # At once, while the port still answers (the drain delay): NOT_SERVING.
        deadline = sigterm_at + DRAIN_DELAY_S
        while probe(channel) != NOT_SERVING:
            assert time.monotonic() < deadline, "still SERVING after the SIGTERM"
            time.sleep(0.05)
        assert time.monotonic() - sigterm_at < DRAIN_DELAY_S  # answered before the drain ended
        # The Watch stream says so too, and then ends instead of holding the shutdown.
        assert [answer.status for answer in watch] == [NOT_SERVING]
    assert proc.wait(SHUTDOWN_GRACE_S) == 0
    # An open Watch would have held the gRPC server's graceful stop for SHUTDOWN_GRACE_S.
    assert time.monotonic() - sigterm_at < SHUTDOWN_GRACE_S / 2
