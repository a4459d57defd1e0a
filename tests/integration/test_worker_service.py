"""The worker as a gRPC service against an in-process fake Scheduler (grpc.aio, port 0).

Each test is a plain function running one async scenario with ``asyncio.run`` (no
pytest-asyncio). The sim runs with ``time_scale=0`` unless a test is about timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.grpc_server import free_port
from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from accelgen.profiles import load_profile
from worker_service.config import WorkerConfig
from accelgen.wire.worker_info import worker_info_to_proto
from worker_service.executors.sim import SimExecutor, sim_token
from worker_service.main import WorkerHandle, start_worker

pytestmark = pytest.mark.integration

PROFILE = load_profile()
REPO = Path(__file__).resolve().parents[2]


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Records what workers tell it; answers ``known=False`` to the next ``forget`` heartbeats."""

    def __init__(self, heartbeat_interval_s: float = 0.05) -> None:
        self.interval = heartbeat_interval_s
        self.registrations: list[scheduler_pb2.RegisterWorkerRequest] = []
        self.heartbeats: list[str] = []
        self.deregistered: list[str] = []
        self.forget = 0

    async def RegisterWorker(self, request, context):
        self.registrations.append(request)
        return scheduler_pb2.RegisterWorkerResponse(heartbeat_interval_s=self.interval, heartbeat_ttl_s=10 * self.interval)

    async def Heartbeat(self, request, context):
        self.heartbeats.append(request.worker_id)
        if self.forget:
            self.forget -= 1
            return scheduler_pb2.HeartbeatResponse(known=False)
        return scheduler_pb2.HeartbeatResponse(known=True)

    async def DeregisterWorker(self, request, context):
        self.deregistered.append(request.worker_id)
        return scheduler_pb2.DeregisterWorkerResponse()


async def serve_fake(fake: FakeScheduler, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def eventually(cond: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def failed_registrations(handle: WorkerHandle) -> list[grpc.StatusCode]:
    """From now on, the status of every RegisterWorker call of the worker's registration loop that
    fails (the loop's stub is wrapped: the worker itself counts only the calls that succeed)."""
    stub = handle.registration._stub
    register = stub.RegisterWorker
    failures: list[grpc.StatusCode] = []

    async def counted(*args, **kwargs):
        try:
            return await register(*args, **kwargs)
        except grpc.aio.AioRpcError as exc:
            failures.append(exc.code())
            raise

    stub.RegisterWorker = counted
    return failures


def worker_config(scheduler_port: int, **overrides) -> WorkerConfig:
    fields = dict(scheduler=f"127.0.0.1:{scheduler_port}", host="127.0.0.1", port=0, worker_id="w1",
                  time_scale=0.0, grace_s=0.2, rpc_timeout_s=1.0, register_backoff_max_s=0.2)
    return WorkerConfig(**{**fields, **overrides})


@contextlib.asynccontextmanager
async def cluster(executor: SimExecutor | None = None,
                  **overrides) -> AsyncIterator[tuple[FakeScheduler, WorkerHandle, worker_pb2_grpc.WorkerStub]]:
    fake = FakeScheduler()
    server, port = await serve_fake(fake)
    handle = await start_worker(worker_config(port, **overrides), executor=executor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    try:
        await eventually(lambda: fake.registrations, what="registration")
        yield fake, handle, worker_pb2_grpc.WorkerStub(channel)
    finally:
        await channel.close()
        await handle.stop()
        await server.stop(None)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


# -- plans on the wire ---------------------------------------------------------------------
def new(rid: str, prompt: list[int], blocks: list[int], samples: bool = True) -> worker_pb2.ScheduledChunk:
    """The whole prompt (``samples``), or its first part of a longer one (not ``samples``)."""
    return worker_pb2.ScheduledChunk(request_id=rid, token_ids=prompt, new_block_ids=blocks, is_new=True,
                                     block_table=blocks, prompt_len=len(prompt) + (0 if samples else 1),
                                     samples=samples,
                                     sampling_params=common_pb2.SamplingParams(max_new_tokens=8))


def step(rid: str, computed: int, token: int) -> worker_pb2.ScheduledChunk:
    return worker_pb2.ScheduledChunk(request_id=rid, num_computed_tokens=computed, token_ids=[token], samples=True)


def batch(iteration: int, *chunks, epoch: str = "e1", freed: tuple[str, ...] = ()) -> worker_pb2.BatchPlan:
    return worker_pb2.BatchPlan(iteration=iteration, epoch=epoch, chunks=list(chunks), freed_request_ids=list(freed))


async def rejected(stub: worker_pb2_grpc.WorkerStub, plan: worker_pb2.BatchPlan, timeout: float = 2) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteIteration(plan, timeout=timeout)
    return info.value


# -- registration ----------------------------------------------------------------------------
def test_registers_with_its_description_heartbeats_and_deregisters():
    async def scenario():
        async with cluster() as (fake, handle, _):
            reg = fake.registrations[0]
            assert (reg.worker_id, reg.address) == ("w1", f"127.0.0.1:{handle.port}")
            expected = worker_info_to_proto(SimExecutor(PROFILE, time_scale=0).describe())
            assert reg.description == expected
            assert reg.description.num_blocks == PROFILE.num_blocks and reg.description.executor == "sim"
            await eventually(lambda: len(fake.heartbeats) >= 3, what="heartbeats")
            assert set(fake.heartbeats) == {"w1"} and len(fake.registrations) == 1
        assert fake.deregistered == ["w1"]
    run(scenario)


def test_reregisters_when_the_scheduler_forgot_it():
    async def scenario():
        async with cluster() as (fake, handle, stub):
            await stub.ExecuteIteration(batch(1, new("x", [1, 2], [1])), timeout=2)
            fake.forget = 1
            await eventually(lambda: len(fake.registrations) == 2, what="re-registration")
            # Registering resets nothing: a scheduler keeping this worker's lane still finds "x".
            assert "x" in handle.executor.requests
            assert fake.registrations[1].description == fake.registrations[0].description
            # A fresh lane's first plan carries a new epoch, and that is what clears the worker.
            await stub.ExecuteIteration(batch(2, new("y", [3], [2]), epoch="e1.2"), timeout=2)
            assert "x" not in handle.executor.requests and "y" in handle.executor.requests
            n = len(fake.heartbeats)
            await eventually(lambda: len(fake.heartbeats) >= n + 2, what="heartbeats after re-registering")
            assert len(fake.registrations) == 2
    run(scenario)


def test_retries_until_the_scheduler_answers_and_again_after_it_was_down():
    async def scenario():
        port = free_port()
        handle = await start_worker(worker_config(port))
        failures = failed_registrations(handle)
        server = None
        try:
            # nobody listening: registration fails, backs off and retries
            await eventually(lambda: len(failures) >= 2, timeout=10,
                             what="two failed registration attempts while no scheduler listens")
            fake = FakeScheduler()
            server, _ = await serve_fake(fake, port)
            await eventually(lambda: fake.registrations, what="registration once the scheduler is up")
            await server.stop(None)  # the scheduler dies ...
            await eventually(lambda: not handle.registration.registered.is_set(), what="heartbeat failure")
            fake2 = FakeScheduler()
            server, _ = await serve_fake(fake2, port)  # ... and a new one comes up empty
            await eventually(lambda: fake2.registrations, what="re-registration with the new scheduler")
        finally:
            await handle.stop()
            if server is not None:
                await server.stop(None)
    run(scenario)


# -- iterations ------------------------------------------------------------------------------
def test_execute_iteration_samples_exactly_the_sampling_chunks_deterministically():
    async def scenario():
        results = []
        for epoch in ("a", "b"):
            async with cluster() as (_, _, stub):
                r1 = await stub.ExecuteIteration(batch(1, new("x", [5, 6, 7], [1]), new("y", [1] * 40, [2], samples=False),
                                                       epoch=epoch), timeout=2)
                r2 = await stub.ExecuteIteration(batch(2, step("x", 3, r1.sampled_token_ids["x"]), epoch=epoch), timeout=2)
                assert r1.iteration == 1 and r2.iteration == 2
                assert r1.elapsed_s == 0.0
                results.append((dict(r1.sampled_token_ids), dict(r2.sampled_token_ids)))
        assert results[0] == results[1] == ({"x": sim_token("x", 0)}, {"x": sim_token("x", 1)})
    run(scenario)


def test_execute_iteration_takes_the_profiles_time():
    async def scenario():
        async with cluster(time_scale=1.0) as (_, _, stub):
            plan = batch(1, new("x", [1] * 64, [1]), new("y", [1] * 16, [2]))
            predicted = PROFILE.batch_time_s([(64, 0), (16, 0)])
            start = time.perf_counter()
            result = await stub.ExecuteIteration(plan, timeout=5)
            wall = time.perf_counter() - start
            assert 0.9 * predicted <= result.elapsed_s <= predicted + 0.25
            assert wall >= result.elapsed_s
    run(scenario)


def test_bad_plans_are_invalid_argument_naming_the_problem():
    async def scenario():
        async with cluster() as (_, _, stub):
            err = await rejected(stub, batch(1, step("ghost", 4, 9)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'ghost'" in err.details() and "unknown to this worker" in err.details()
            err = await rejected(stub, batch(2, worker_pb2.ScheduledChunk(request_id="z", is_new=True)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids is empty" in err.details()
            # A rejected plan leaves the worker usable.
            ok = await stub.ExecuteIteration(batch(3, new("x", [1], [1])), timeout=2)
            assert set(ok.sampled_token_ids) == {"x"}
    run(scenario)


def test_freed_requests_are_forgotten():
    async def scenario():
        async with cluster() as (_, handle, stub):
            await stub.ExecuteIteration(batch(1, new("x", [1, 2], [1]), new("y", [3], [2])), timeout=2)
            await stub.ExecuteIteration(batch(2, step("y", 1, sim_token("y", 0)), freed=("x",)), timeout=2)
            assert "x" not in handle.executor.requests and "y" in handle.executor.requests
            err = await rejected(stub, batch(3, step("x", 2, 5)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'x'" in err.details()
    run(scenario)


def test_epoch_change_resets_the_worker():
    async def scenario():
        async with cluster() as (_, handle, stub):
            await stub.ExecuteIteration(batch(1, new("x", [1, 2], [1]), epoch="old"), timeout=2)
            err = await rejected(stub, batch(1, step("x", 2, 5), epoch="new"))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "epoch change" in err.details()
            # The new scheduler resends full state; it runs.
            r = await stub.ExecuteIteration(batch(2, new("x", [1, 2], [1]), epoch="new"), timeout=2)
            assert r.sampled_token_ids["x"] == sim_token("x", 0) and handle.servicer.runner.epoch == "new"
    run(scenario)


def test_describe():
    async def scenario():
        async with cluster(vocab_size=1000, eos_token_id=7) as (_, _, stub):
            d = await stub.Describe(worker_pb2.DescribeRequest(), timeout=2)
            assert (d.executor, d.model, d.block_size, d.num_blocks, d.max_model_len) == (
                "sim", PROFILE.name, PROFILE.block_size, PROFILE.num_blocks, PROFILE.max_model_len)
            assert (d.vocab_size, d.eos_token_id) == (1000, 7) and '"coefficients"' in d.profile_json
    run(scenario)


# -- health and shutdown ---------------------------------------------------------------------
def test_health_serving_then_not_serving_on_stop():
    async def scenario():
        fake = FakeScheduler()
        server, port = await serve_fake(fake)
        handle = await start_worker(worker_config(port, grace_s=0.3))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
        health = health_pb2_grpc.HealthStub(channel)
        try:
            # Ready once registered (tests/integration/test_worker_supervision.py: not before).
            await eventually(lambda: handle.registration.registered.is_set(), what="registration")
            for name in ("", "accelgen.v1.Worker", "liveness"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service="accelgen.v1.Worker"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(handle.stop())
            assert (await asyncio.wait_for(watch.read(), 2)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping
            assert fake.deregistered == ["w1"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            await channel.close()
            await server.stop(None)
    run(scenario)


class StartSignallingSim(SimExecutor):
    """Tells the test when an iteration is running, so stopping mid-iteration is no race."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()

    def execute(self, plan):
        self.started.set()
        return super().execute(plan)


def test_stop_lets_the_in_flight_iteration_finish():
    async def scenario():
        executor = StartSignallingSim(PROFILE, time_scale=5.0)
        async with cluster(executor=executor, grace_s=2.0) as (_, handle, stub):
            call = asyncio.ensure_future(stub.ExecuteIteration(batch(1, new("x", [1] * 8, [1])), timeout=5))
            assert await asyncio.to_thread(executor.started.wait, 5)
            await handle.stop()
            assert set((await call).sampled_token_ids) == {"x"}
    run(scenario)


def test_main_module_registers_and_exits_cleanly_on_sigterm():
    async def scenario():
        fake = FakeScheduler()
        server, port = await serve_fake(fake)
        env = {**os.environ, "ACCELGEN_WORKER_TIME_SCALE": "0", "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker_service.main", "--scheduler", f"127.0.0.1:{port}", "--host", "127.0.0.1",
             "--worker-id", "proc-worker", "--grace-s", "0.2"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            await eventually(lambda: fake.registrations, timeout=15, what="the process to register")
            assert fake.registrations[0].worker_id == "proc-worker"
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 10)
            assert rc == 0, proc.stderr.read().decode()
            assert fake.deregistered == ["proc-worker"]
        finally:
            if proc.poll() is None:
                proc.kill()
            await server.stop(None)
    run(scenario)


def test_iterations_stay_serialised_when_a_caller_gives_up():
    async def scenario():
        async with cluster(time_scale=5.0) as (_, _, stub):
            err = await rejected(stub, batch(1, new("x", [1] * 8, [1])), timeout=0.02)
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The abandoned iteration still runs to the end before the next one starts, so the
            # request it introduced is known when the next plan refers to it.
            r = await stub.ExecuteIteration(batch(2, step("x", 8, sim_token("x", 0))), timeout=5)
            assert r.sampled_token_ids["x"] == sim_token("x", 1)
    run(scenario)
