"""`python -m gateway.main` as a real process: serves, then exits cleanly on SIGTERM; alive
(liveness) without a scheduler, ready (readiness) only while its scheduler answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.grpc_server import LIVENESS, free_port
from tests.support.gateway_stack import FakeScheduler, LoopThread, start_fake_scheduler

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def wait_until_healthy(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200. Fails as soon as the process exits, or after ``timeout_s``
    (then the process is killed so that its stderr can be read), showing its stderr either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the gateway exited with code {proc.returncode} before {url} answered; its stderr:\n"
                        f"{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{url} did not answer 200 within {timeout_s:g} s; the gateway's stderr:\n"
                        f"{proc.communicate()[1].decode()}")
        time.sleep(0.1)  # the poll interval


def start_gateway_proc(scheduler_address: str, grpc_port: int, http_port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, ACCELGEN_GATEWAY_HTTP_PORT=str(http_port), ACCELGEN_GATEWAY_GRACE_S="1",
               ACCELGEN_GATEWAY_HEALTH_CHECK_INTERVAL_S="0.2")
    return subprocess.Popen([sys.executable, "-m", "gateway.main", "--host", "127.0.0.1", "--grpc-port",
                             str(grpc_port), "--scheduler-address", scheduler_address],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def health_status(grpc_port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def poll(predicate, timeout_s: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_process_serves_health_and_stops_on_sigterm() -> None:
    """Without a scheduler the gateway is alive (/livez, "liveness") but not ready (/health 503,
    NOT_SERVING); SIGTERM stops it with status 0."""
    grpc_port, http_port = free_port(), free_port()
    proc = start_gateway_proc(f"127.0.0.1:{free_port()}", grpc_port, http_port)
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{http_port}/livez", timeout_s=20)
        assert health_status(grpc_port, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(grpc_port, "accelgen.v1.Gateway") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).status_code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert b"gateway_stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_readiness_follows_the_scheduler() -> None:
    """Ready while the scheduler answers, not ready while it is gone, ready again when it is
    back (same port); alive throughout."""
    loop = LoopThread()
    fake = FakeScheduler()
    server, port = loop.run(start_fake_scheduler(fake))
    grpc_port, http_port = free_port(), free_port()
    proc = start_gateway_proc(f"127.0.0.1:{port}", grpc_port, http_port)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    health_url = f"http://127.0.0.1:{http_port}/health"
    try:
        wait_until_healthy(proc, health_url, timeout_s=20)
        assert health_status(grpc_port, "accelgen.v1.Gateway") == serving
        loop.run(server.stop(0))
        assert poll(lambda: health_status(grpc_port, "") == not_serving), "still ready without a scheduler"
        assert httpx.get(health_url, timeout=5).status_code == 503
        assert httpx.get(f"http://127.0.0.1:{http_port}/livez", timeout=5).status_code == 200
        assert health_status(grpc_port, LIVENESS) == serving
        server, _ = loop.run(start_fake_scheduler(fake, port))
        assert poll(lambda: health_status(grpc_port, "accelgen.v1.Gateway") == serving), "not ready again"
        assert httpx.get(health_url, timeout=5).status_code == 200
    finally:
        proc.kill()
        proc.wait()
        loop.run(server.stop(0))
        loop.close()
