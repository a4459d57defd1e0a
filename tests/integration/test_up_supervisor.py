"""``accelgen up`` as a supervisor: a service that exits is restarted with backoff while the
others keep running; a configuration error (exit 2) is not retried; SIGTERM stops everything.

Real processes throughout: a real stack with a kill -9'd worker, short ``sh`` processes for the
backoff schedule, and the ``accelgen up`` command itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
import pytest

from accelgen.common.grpc_server import free_port
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from launcher.stack import Stack, Supervisor, describe_exit, spawn, start_stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCHED = ["--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "2", "--log-level", "WARNING"]
QUIET = ["--log-level", "WARNING"]


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def live_workers(scheduler_address: str) -> int:
    with grpc.insecure_channel(scheduler_address) as ch:
        info = scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
    return info.live_workers


def generate(gateway_address: str, max_tokens: int) -> list[int]:
    req = gateway_pb2.GenerateRequest(tokenized=common_pb2.TokenizedInput(input_ids=[7] * 16),
                                      sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens,
                                                                                ignore_eos=True),
                                      app_class="chat", stream=True)
    tokens: list[int] = []
    with grpc.insecure_channel(gateway_address) as ch:
        for resp in gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=30):
            if resp.HasField("chunk"):
                tokens.extend(resp.chunk.token_ids)
    return tokens


def test_a_killed_worker_is_restarted_while_the_scheduler_keeps_running(tmp_path: Path) -> None:
    stack = start_stack(workers=1, executor="sim", worker_args=["--time-scale", "0.02", *QUIET], scheduler_args=SCHED,
                        gateway_args=QUIET, log_dir=tmp_path)
    supervisor = Supervisor(stack, backoff_initial_s=0.2, say=lambda line: None).start()
    try:
        scheduler, gateway, worker = stack.find("scheduler"), stack.find("gateway"), stack.find("worker-0")
        os.killpg(worker.popen.pid, signal.SIGKILL)  # kill -9
        wait_until(lambda: supervisor.restarts, "the supervisor to notice the exit")
        restart = supervisor.restarts[0]
        assert (restart.name, restart.exit_code, restart.delay_s) == ("worker-0", -signal.SIGKILL, 0.2)
        wait_until(lambda: stack.find("worker-0") is not worker and stack.find("worker-0").alive(),
                   "a new worker-0 process")
        # The only worker died, so a request that completes ran on the restarted one.
        wait_until(lambda: live_workers(stack.scheduler_address) >= 1, "the new worker to register")
        deadline = time.monotonic() + 20
        while True:
            try:
                assert len(generate(stack.gateway_address, 5)) == 5
                break
            except grpc.RpcError as exc:  # the dead worker's lane may still be draining
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert stack.find("scheduler") is scheduler and scheduler.alive(), "the scheduler kept running"
        assert stack.find("gateway") is gateway and gateway.alive()
        assert [r.name for r in supervisor.restarts] == ["worker-0"]
    finally:
        supervisor.stop()
        stack.stop()
    assert not any(p.alive() for p in stack.procs)


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    crashing = Stack(procs=[spawn("crasher", ["sh", "-c", "exit 1"])])
    supervisor = Supervisor(crashing, backoff_initial_s=0.05, backoff_max_s=0.2, poll_s=0.01,
                            say=lambda line: None).start()
    try:
        wait_until(lambda: len(supervisor.restarts) >= 5, "five restarts")
    finally:
        supervisor.stop()
        crashing.stop()
    assert [r.delay_s for r in supervisor.restarts[:5]] == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert all(r.exit_code == 1 for r in supervisor.restarts)
    # A process that stayed up longer than stable_after_s starts the backoff again.
    stable = Stack(procs=[spawn("stable", ["sh", "-c", "sleep 0.3; exit 3"])])
    supervisor = Supervisor(stable, backoff_initial_s=0.05, stable_after_s=0.2, poll_s=0.01,
                            say=lambda line: None).start()
    try:
        wait_until(lambda: len(supervisor.restarts) >= 3, "three restarts")
    finally:
        supervisor.stop()
        stable.stop()
    assert [r.delay_s for r in supervisor.restarts[:3]] == [0.05, 0.05, 0.05]
    assert describe_exit(3) == "status 3 (lost the leader lease)" and describe_exit(-9) == "killed by SIGKILL"


def test_a_configuration_error_is_not_retried() -> None:
    lines: list[str] = []
    stack = Stack(procs=[spawn("sleeper", ["sleep", "30"]), spawn("misconfigured", ["sh", "-c", "exit 2"])])
    try:
        assert Supervisor(stack, poll_s=0.01, say=lines.append).run() == 1
        assert stack.find("sleeper").alive(), "giving up leaves stopping the stack to the caller"
    finally:
        stack.stop()
    assert any("misconfigured exited: status 2 (configuration error); not restarting it" in line
               for line in lines)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_accelgen_up_restarts_a_killed_worker_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "up", "--executor", "sim", "--workers", "1", "--time-scale", "0.02",
         "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--log-dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("AccelGen is up" in line for line in lines) or proc.poll() is not None,
                   "accelgen up to start", timeout_s=90)
        assert proc.poll() is None, "".join(lines)
        worker = next(c for c in _children(proc.pid) if "worker_service.main" in _cmdline(c))
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: any("worker-0 restarted" in line for line in lines), "the worker's restart")
        assert any("worker-0 exited: killed by SIGKILL; restarting in 0.5 s" in line for line in lines)
        children = _children(proc.pid)
        assert len(children) == 4 and worker not in children  # redis, scheduler, gateway, the new worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
        reader.join(10)
        assert lines[-1].strip() == "stopped"
        assert not _listening(grpc_port) and not _listening(http_port)
        assert not any(Path(f"/proc/{c}").exists() for c in children), "every service was stopped and reaped"
    finally:
        if proc.poll() is None:  # a failed test: stop the stack, whose services have sessions of their own
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                for child in _children(proc.pid):
                    os.killpg(child, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
