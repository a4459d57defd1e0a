"""The worker under failure: fencing of a deposed scheduler, a device that fails, readiness, and
several scheduler addresses.

Fencing and the device-failure exit run on a real worker process (``python -m
worker_service.main``) driven with ``worker_pb2`` plans over gRPC; the rest run the worker
in-process against the fake scheduler of ``test_worker_service``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from typing import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.grpc_server import free_port
from accelgen.v1 import scheduler_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.test_worker_service import (PROFILE, REPO, FakeScheduler, batch, cluster, eventually, new,
                                                   rejected, run, serve_fake, step, worker_config)
from worker_service.config import WorkerConfig
from worker_service.executors.sim import SimExecutor, sim_token
from worker_service.main import EXIT_DEVICE_FAILED, start_worker

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def fenced(iteration: int, *chunks, fence: int, epoch: str) -> worker_pb2.BatchPlan:
    plan = batch(iteration, *chunks, epoch=epoch)
    plan.fence = fence
    return plan


@contextlib.asynccontextmanager
async def worker_process(*extra: str) -> AsyncIterator[tuple[FakeScheduler, subprocess.Popen, worker_pb2_grpc.WorkerStub, health_pb2_grpc.HealthStub]]:
    """A real worker process registered with an in-process fake scheduler."""
    fake = FakeScheduler()
    server, sched_port = await serve_fake(fake)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker_service.main", "--scheduler", f"127.0.0.1:{sched_port}", "--host", "127.0.0.1",
         "--port", str(port), "--worker-id", "proc-worker", "--time-scale", "0", "--grace-s", "0.2",
         "--log-level", "WARNING", *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await eventually(lambda: fake.registrations or proc.poll() is not None, timeout=20,
                         what="the worker process to register")
        assert proc.poll() is None, proc.stderr.read().decode()
        yield fake, proc, worker_pb2_grpc.WorkerStub(channel), health_pb2_grpc.HealthStub(channel)
    finally:
        await channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
        await server.stop(None)


# -- fencing ---------------------------------------------------------------------------------
def test_a_plan_from_a_deposed_scheduler_is_refused_and_changes_nothing():
    async def scenario():
        async with worker_process() as (_, proc, stub, _):
            r1 = await stub.ExecuteIteration(fenced(1, new("x", [1, 2, 3], [1]), fence=5, epoch="leader-5"), timeout=5)
            assert r1.sampled_token_ids["x"] == sim_token("x", 0)
            # The deposed leader (fence 4) wakes up with its own epoch: refused before the worker
            # resets for that epoch or runs anything.
            err = await rejected(stub, fenced(7, step("x", 3, sim_token("x", 0)), fence=4, epoch="leader-4"), timeout=5)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "plan from a deposed scheduler: fence 4 < 5" in err.details()
            err = await rejected(stub, fenced(8, new("y", [9], [2]), fence=4, epoch="leader-5"), timeout=5)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            # The leader's request continues where it was; "y" never entered.
            r2 = await stub.ExecuteIteration(fenced(2, step("x", 3, r1.sampled_token_ids["x"]), fence=5,
                                                    epoch="leader-5"), timeout=5)
            assert r2.sampled_token_ids["x"] == sim_token("x", 1)
            err = await rejected(stub, fenced(3, step("y", 1, sim_token("y", 0)), fence=5, epoch="leader-5"), timeout=5)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'y'" in err.details()
            # Unfenced plans (fence 0: the simulator, tests) are always accepted.
            r3 = await stub.ExecuteIteration(batch(4, step("x", 4, r2.sampled_token_ids["x"]), epoch="leader-5"),
                                             timeout=5)
            assert r3.sampled_token_ids["x"] == sim_token("x", 2)
            # A newer leader is adopted (its new epoch resets the worker); fence 5 is now deposed.
            await stub.ExecuteIteration(fenced(1, new("z", [4], [3]), fence=6, epoch="leader-6"), timeout=5)
            err = await rejected(stub, fenced(5, step("x", 5, r3.sampled_token_ids["x"]), fence=5, epoch="leader-5"),
                                 timeout=5)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "fence 5 < 6" in err.details()
            assert proc.poll() is None, "a refused plan is not a device failure"
    run(scenario)


# -- device failure --------------------------------------------------------------------------
def test_a_worker_whose_device_fails_repeatedly_deregisters_and_exits_4():
    async def scenario():
        async with worker_process("--sim-fail-after", "1", "--max-device-failures", "3") as (fake, proc, stub, health):
            await eventually(lambda: fake.heartbeats, what="a heartbeat")
            ready = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ready.status == SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service="accelgen.v1.Worker"))
            assert (await watch.read()).status == SERVING
            await stub.ExecuteIteration(batch(1, new("x", [1, 2], [1])), timeout=5)
            for i in range(2, 5):
                err = await rejected(stub, batch(i, step("x", 2, sim_token("x", 0))), timeout=5)
                assert err.code() == grpc.StatusCode.INTERNAL and "simulated device failure" in err.details()
            assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
            rc = await asyncio.to_thread(proc.wait, 20)
            assert rc == EXIT_DEVICE_FAILED, proc.stderr.read().decode()[-3000:]
            assert fake.deregistered == ["proc-worker"]
    run(scenario)


class SwitchableSim(SimExecutor):
    """A sim whose device fails while ``failing`` is set: tests decide which iteration breaks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failing = threading.Event()

    def execute(self, plan):
        if self.failing.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().execute(plan)


def test_a_successful_iteration_resets_the_failure_count():
    async def scenario():
        executor = SwitchableSim(PROFILE, time_scale=0)
        async with cluster(executor=executor, max_device_failures=3) as (fake, handle, stub):
            await stub.ExecuteIteration(batch(1, new("x", [1], [1])), timeout=2)
            executor.failing.set()
            for i in (2, 3):
                assert (await rejected(stub, batch(i, new("y", [1], [2])))).code() == grpc.StatusCode.INTERNAL
            executor.failing.clear()
            await stub.ExecuteIteration(batch(4, new("y", [1], [2])), timeout=2)  # the count starts again
            executor.failing.set()
            for i in (5, 6):
                assert (await rejected(stub, batch(i, new("z", [1], [3])))).code() == grpc.StatusCode.INTERNAL
            assert not handle.stop_event.is_set() and handle.exit_code == 0
            assert (await rejected(stub, batch(7, new("z", [1], [3])))).code() == grpc.StatusCode.INTERNAL
            await asyncio.wait_for(handle.wait(), 10)  # the third in a row: the worker stops itself
            assert handle.exit_code == EXIT_DEVICE_FAILED and fake.deregistered == ["w1"]
    run(scenario)


# -- readiness and the scheduler's address -----------------------------------------------------
async def health_status(stub: health_pb2_grpc.HealthStub, name: str) -> int:
    return (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)).status


def test_ready_only_while_registered_alive_meanwhile():
    async def scenario():
        port = free_port()
        handle = await start_worker(worker_config(port))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
        health = health_pb2_grpc.HealthStub(channel)
        server = None
        try:
            # No scheduler yet: alive, not ready.
            assert await health_status(health, "liveness") == SERVING
            for name in ("", "accelgen.v1.Worker"):
                assert await health_status(health, name) == NOT_SERVING
            fake = FakeScheduler()
            server, _ = await serve_fake(fake, port)
            await eventually(lambda: handle.registration.registered.is_set(), timeout=10, what="registration")
            for name in ("", "accelgen.v1.Worker", "liveness"):
                assert await health_status(health, name) == SERVING
            await server.stop(None)  # the scheduler goes away: heartbeats fail, not ready again
            server = None
            await eventually(lambda: not handle.registration.registered.is_set(), timeout=10, what="heartbeat failure")
            assert await health_status(health, "") == NOT_SERVING
            assert await health_status(health, "liveness") == SERVING
        finally:
            await channel.close()
            await handle.stop()
            if server is not None:
                await server.stop(None)
    run(scenario)


class RealisticFake(FakeScheduler):
    """Like the real scheduler: a heartbeat from a worker it has no registration of is unknown."""

    async def Heartbeat(self, request, context):
        self.heartbeats.append(request.worker_id)
        known = any(r.worker_id == request.worker_id for r in self.registrations)
        return scheduler_pb2.HeartbeatResponse(known=known)


def test_an_address_list_reaches_whichever_scheduler_listens():
    async def scenario():
        port_a, port_b = free_port(), free_port()
        leader = RealisticFake()
        server_a, _ = await serve_fake(leader, port_a)
        handle = await start_worker(worker_config(port_a, scheduler=f"127.0.0.1:{port_a},127.0.0.1:{port_b}"))
        server_b = None
        try:
            await eventually(lambda: leader.registrations, timeout=10, what="registration with the leader")
            await server_a.stop(None)  # the leader dies; the standby starts listening once it holds the lease
            standby = RealisticFake()
            server_b, _ = await serve_fake(standby, port_b)
            await eventually(lambda: standby.registrations, timeout=15, what="re-registration with the standby")
            await eventually(lambda: handle.registration.registered.is_set(), timeout=5, what="ready again")
            assert standby.registrations[0].worker_id == "w1"
        finally:
            await handle.stop()
            if server_b is not None:
                await server_b.stop(None)
    run(scenario)


def test_scheduler_address_lists_must_be_ip_literals():
    assert WorkerConfig(scheduler="10.0.0.1:50051,10.0.0.2:50051", host="0.0.0.0",
                        insecure=True).scheduler.count(",") == 1
    with pytest.raises(ValueError, match="IP literals"):
        WorkerConfig(scheduler="sched-a:50051,sched-b:50051")
    with pytest.raises(ValueError, match="host:port"):
        WorkerConfig(scheduler="10.0.0.1:50051,10.0.0.2")
    with pytest.raises(ValueError, match="max_device_failures"):
        WorkerConfig(max_device_failures=-1)
