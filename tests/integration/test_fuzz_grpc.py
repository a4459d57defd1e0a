"""Property-based fuzzing of every gRPC method: the gateway's (against the fake scheduler), the
scheduler's (a real scheduler process, a real Redis, a sim worker process) and the worker's (a
sim worker process fed random plans).

Requests are built from the proto descriptors (``bench/fuzz_inputs.message_strategy``: every
field at its edges, mixed with realistic values so calls get past the first check) and are
sometimes damaged on the wire. The property: no call ends INTERNAL, UNKNOWN, DATA_LOSS or
UNIMPLEMENTED (nor reports one in-band), and no process exits. ``bench/fuzz.py`` runs the
same cases >= 10,000 times per surface; inputs that once failed stay here as ``@example``s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings

from accelgen.common.grpc_server import free_port
from accelgen.v1 import common_pb2, scheduler_pb2, worker_pb2
from bench.fuzz_grpc import (GATEWAY, SCHEDULER, WORKER, GrpcCase, IdPool, call, case_strategy, gateway_hints,
                             scheduler_hints, worker_hints)
from launcher.stack import Proc, Stack, _wait_workers, python_module, spawn, start_redis, start_scheduler_proc, \
    start_worker_proc, wait_healthy
from tests.support.gateway_stack import GatewayStack

pytestmark = pytest.mark.integration

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
POOL = IdPool()
DEAD = f"127.0.0.1:{free_port()}"  # nothing listens: fuzzed workers register here


def assert_good(channel: grpc.Channel, service, case: GrpcCase, timeout_s: float = 10.0) -> None:
    outcome = call(channel, service, case, POOL, timeout_s=timeout_s)
    assert not outcome.bad, f"{outcome.code} {outcome.details} {outcome.inband_bad} for {case.describe()}"


def assert_serving(target: str, service: str) -> None:
    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- the gateway ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[GatewayStack, grpc.Channel]]:
    s = GatewayStack(reconnect_timeout_s=2.0)
    with grpc.insecure_channel(s.grpc_target) as ch:
        yield s, ch
    s.close()


@FUZZ
@given(case=case_strategy(GATEWAY, gateway_hints(POOL)))
@example(case=GrpcCase("Generate", [b"\xff\xff\xff"]))
@example(case=GrpcCase("Cancel", [b"\x0a\x03\xff\xfe\xfd"]))
def test_gateway_grpc_never_fails_internally(gateway: tuple[GatewayStack, grpc.Channel], case: GrpcCase) -> None:
    assert_good(gateway[1], GATEWAY, case)


def test_gateway_still_serves_after_fuzzing(gateway: tuple[GatewayStack, grpc.Channel]) -> None:
    assert_serving(gateway[0].grpc_target, "accelgen.v1.Gateway")


# -- the scheduler (real process, real Redis, a sim worker) -----------------------------------------
@pytest.fixture(scope="module")
def scheduler() -> Iterator[tuple[Stack, grpc.Channel]]:
    stack = Stack(log_dir=Path(tempfile.mkdtemp(prefix="accelgen-fuzz-")))
    try:
        redis_proc, stack.redis_url = start_redis(log_dir=stack.log_dir)
        stack.procs.append(redis_proc)
        port = free_port()
        stack.scheduler_address = f"127.0.0.1:{port}"
        stack.procs.append(start_scheduler_proc(stack, port, ["--heartbeat-ttl-s", "3"]))
        stack.procs.append(start_worker_proc(stack, "worker-0", ["--executor", "sim", "--time-scale", "0"]))
        _wait_workers(stack.scheduler_address, 1, 60, stack)
        with grpc.insecure_channel(stack.scheduler_address) as ch:
            yield stack, ch
    finally:
        stack.stop()


@FUZZ
@given(case=case_strategy(SCHEDULER, scheduler_hints(POOL, DEAD)))
@example(case=GrpcCase("WatchMany", [b"", b"\xff\xff"]))
@example(case=GrpcCase("RegisterWorker", [scheduler_pb2.RegisterWorkerRequest(  # took 18 GB and the scheduler
    worker_id="fzw-1", address=DEAD, description=common_pb2.WorkerDescription(
        block_size=1, num_blocks=2**32 - 1, max_model_len=2**32 - 1)).SerializeToString()]))
@example(case=GrpcCase("RegisterWorker", [scheduler_pb2.RegisterWorkerRequest(
    worker_id="fzw-0", address=DEAD, description=common_pb2.WorkerDescription(
        block_size=16, num_blocks=64, profile_json="[]")).SerializeToString()]))
def test_scheduler_grpc_never_fails_internally(scheduler: tuple[Stack, grpc.Channel], case: GrpcCase) -> None:
    assert_good(scheduler[1], SCHEDULER, case)


def test_scheduler_and_worker_survive_fuzzing(scheduler: tuple[Stack, grpc.Channel]) -> None:
    stack, _ = scheduler
    dead = [f"{p.name} exited {p.popen.returncode}" for p in stack.procs if not p.alive()]
    assert not dead, dead
    assert_serving(stack.scheduler_address, "accelgen.v1.Scheduler")


# -- the worker (a sim worker process with no scheduler) ---------------------------------------------
@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[Proc, grpc.Channel]]:
    port = free_port()
    proc = spawn("fuzz-worker", python_module("worker_service.main", "--scheduler", DEAD, "--port", str(port),
                                              "--host", "127.0.0.1", "--executor", "sim", "--time-scale", "0",
                                              "--worker-id", "fuzz-worker"))
    try:
        wait_healthy(f"127.0.0.1:{port}", "liveness", proc=proc)  # ready needs a scheduler; alive suffices
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield proc, ch
    finally:
        proc.stop()


@FUZZ
@given(case=case_strategy(WORKER, worker_hints(POOL)))
@example(case=GrpcCase("ExecuteIteration", [worker_pb2.BatchPlan(epoch="e1", chunks=[worker_pb2.ScheduledChunk(
    request_id="r0", token_ids=[5], is_new=True, block_table=[1], prompt_len=1, samples=True,
    sampling_params=common_pb2.SamplingParams(max_new_tokens=1))]).SerializeToString()]))
def test_worker_grpc_never_fails_internally(worker: tuple[Proc, grpc.Channel], case: GrpcCase) -> None:
    assert_good(worker[1], WORKER, case)


def test_worker_survives_fuzzing(worker: tuple[Proc, grpc.Channel]) -> None:
    assert worker[0].alive(), f"the worker exited with {worker[0].popen.returncode}"
