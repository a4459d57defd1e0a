"""Start and stop the services as processes: ``accelgen up`` and the integration tests share this.

Every process is started in its own process group and stopped with SIGTERM first (so services
run their clean shutdown), then SIGKILL after a grace period. Readiness is the service's own
``grpc.health.v1`` answer, not a sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.grpc_server import free_port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)


def spawn(name: str, argv: Sequence[str], log_dir: Path | None = None, env: dict[str, str] | None = None) -> Proc:
    log_path = None
    out = None
    if log_dir is not None:
        log_path = log_dir / f"{name}.log"
        out = open(log_path, "ab")
    full_env = {**os.environ, **(env or {})}
    popen = subprocess.Popen(list(argv), stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT if out else None,
                             env=full_env, start_new_session=True)
    return Proc(name, popen, log_path)


def wait_healthy(address: str, service: str = "", timeout_s: float = 60.0, proc: Proc | None = None) -> None:
    """Block until the server at ``address`` answers SERVING for ``service``."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}" +
                                   (f"; see {proc.log_path}" if proc.log_path else ""))
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s")
            time.sleep(0.1)


def start_redis(port: int | None = None, workdir: Path | None = None, log_dir: Path | None = None) -> tuple[Proc, str]:
    """A private redis-server on a free loopback port, no persistence (tests, ``accelgen up``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server (make install does this)")
    port = port or free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="accelgen-redis-"))
    proc = spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                           "--dir", str(workdir), "--protected-mode", "yes"], log_dir)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            if client.ping():
                break
        except redis.exceptions.ConnectionError:
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


@dataclass
class Stack:
    """The local stack: Redis, one scheduler, N workers, one gateway."""

    procs: list[Proc] = field(default_factory=list)
    redis_url: str = ""
    scheduler_address: str = ""
    gateway_address: str = ""
    http_port: int = 0
    log_dir: Path | None = None

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def find(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def start_scheduler_proc(stack: Stack, port: int, extra: Sequence[str] = (), name: str = "scheduler") -> Proc:
    proc = spawn(name, python_module("scheduler_service.main", "--port", str(port), "--redis-url", stack.redis_url,
                                     *extra), stack.log_dir)
    wait_healthy(f"127.0.0.1:{port}", "accelgen.v1.Scheduler", proc=proc)
    return proc


def start_worker_proc(stack: Stack, name: str, extra: Sequence[str] = ()) -> Proc:
    return spawn(name, python_module("worker_service.main", "--scheduler", stack.scheduler_address,
                                     "--worker-id", name, *extra), stack.log_dir)


def start_stack(workers: int = 1, executor: str = "sim", scheduler_args: Sequence[str] = (),
                worker_args: Sequence[str] = (), gateway_args: Sequence[str] = (), log_dir: Path | None = None,
                http_port: int | None = None, grpc_port: int | None = None, worker_timeout_s: float = 120.0) -> Stack:
    stack = Stack(log_dir=log_dir)
    try:
        redis_proc, stack.redis_url = start_redis(log_dir=log_dir)
        stack.procs.append(redis_proc)
        sched_port = free_port()
        stack.scheduler_address = f"127.0.0.1:{sched_port}"
        stack.procs.append(start_scheduler_proc(stack, sched_port, scheduler_args))
        for i in range(workers):
            stack.procs.append(start_worker_proc(stack, f"worker-{i}", ["--executor", executor, *worker_args]))
        _wait_workers(stack.scheduler_address, workers, worker_timeout_s, stack)
        gport, stack.http_port = grpc_port or free_port(), http_port or free_port()
        stack.gateway_address = f"127.0.0.1:{gport}"
        gw = spawn("gateway", python_module("gateway.main", "--scheduler-address", stack.scheduler_address, "--grpc-port",
                                            str(gport), "--http-port", str(stack.http_port), *gateway_args), log_dir)
        stack.procs.append(gw)
        wait_healthy(stack.gateway_address, "accelgen.v1.Gateway", proc=gw)
    except BaseException:
        stack.stop()
        raise
    return stack


def _wait_workers(address: str, n: int, timeout_s: float, stack: Stack) -> None:
    from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        while True:
            info = stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
            if info.live_workers >= n:
                return
            dead = [p for p in stack.procs if p.name.startswith("worker") and not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].popen.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {info.live_workers} of {n} workers registered after {timeout_s:.0f} s")
            time.sleep(0.1)
