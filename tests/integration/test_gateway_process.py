"""`python -m gateway.main` as a real process: serves, then exits cleanly on SIGTERM."""

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

from accelgen.common.grpc_server import free_port

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


def test_process_serves_health_and_stops_on_sigterm() -> None:
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, ACCELGEN_GATEWAY_HTTP_PORT=str(http_port), ACCELGEN_GATEWAY_GRACE_S="1")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.main", "--host", "127.0.0.1", "--grpc-port",
                             str(grpc_port), "--scheduler-address", f"127.0.0.1:{free_port()}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{http_port}/health", timeout_s=20)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="accelgen.v1.Gateway"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert b"gateway_stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
