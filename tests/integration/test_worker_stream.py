"""The per-step transport over real gRPC: the worker's ``ExecuteStream`` (plans pipelined on one
stream, results in order, the first failure ends it) and the scheduler's ``WorkerLink``
(falling back to ``ExecuteIteration`` for a worker without the stream)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from accelgen.v1 import worker_pb2, worker_pb2_grpc
from scheduler_service.worker_link import LinkTimeout, WorkerLink
from tests.integration.test_worker_service import batch, cluster, new, run
from worker_service.executors.sim import SimExecutor, sim_token
from worker_service.server import WorkerServicer

pytestmark = pytest.mark.integration


def pending(rid: str, computed: int) -> worker_pb2.ScheduledChunk:
    """A decode of the token this worker sampled for ``rid`` in the previous plan."""
    return worker_pb2.ScheduledChunk(request_id=rid, num_computed_tokens=computed, samples=True, sampled_input=True)


def test_plans_sent_ahead_run_in_order_and_decode_the_tokens_the_worker_sampled():
    async def scenario():
        async with cluster() as (_, handle, stub):
            call = stub.ExecuteStream()
            # Three plans on the wire before the first result is read: plans 2 and 3 decode the
            # tokens plans 1 and 2 sample, which the scheduler has not seen yet.
            await call.write(batch(1, new("x", [5, 6, 7], [1]), new("y", [1] * 20, [2])))
            await call.write(batch(2, pending("x", 3), pending("y", 20)))
            await call.write(batch(3, pending("x", 4), freed=("y",)))
            results = [await call.read() for _ in range(3)]
            assert [r.iteration for r in results] == [1, 2, 3]
            assert [dict(r.sampled_token_ids) for r in results] == [
                {"x": sim_token("x", 0), "y": sim_token("y", 0)},
                {"x": sim_token("x", 1), "y": sim_token("y", 1)},
                {"x": sim_token("x", 2)},
            ]
            assert "y" not in handle.executor.requests
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
    run(scenario)


def test_the_first_bad_plan_ends_the_stream_and_the_plans_behind_it_do_not_run():
    async def scenario():
        async with cluster() as (_, handle, stub):
            call = stub.ExecuteStream()
            await call.write(batch(1, new("x", [5, 6, 7], [1])))
            await call.write(batch(2, pending("ghost", 4)))
            await call.write(batch(3, new("z", [1, 2], [2])))
            first = await call.read()
            assert first.sampled_token_ids["x"] == sim_token("x", 0)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "iteration 2" in info.value.details() and "'ghost'" in info.value.details()
            await asyncio.sleep(0.1)
            assert "z" not in handle.executor.requests  # queued behind the failure: never run
            # The worker stays usable: a new stream (a new lane) is served.
            again = stub.ExecuteStream()
            await again.write(batch(4, new("z", [1, 2], [2])))
            assert (await again.read()).sampled_token_ids["z"] == sim_token("z", 0)
            again.cancel()
    run(scenario)


@pytest.mark.parametrize("chunk, message", [
    (worker_pb2.ScheduledChunk(request_id="x", is_new=True, sampled_input=True, samples=True),
     "sampled_input is a decode of a request this worker holds"),
    (worker_pb2.ScheduledChunk(request_id="x", token_ids=[9], sampled_input=True, samples=True),
     "token_ids empty"),
])
def test_sampled_input_chunks_are_checked(chunk, message):
    async def scenario():
        async with cluster() as (_, _, stub):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ExecuteIteration(batch(1, chunk), timeout=2)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
    run(scenario)


def test_sampled_input_where_the_worker_sampled_nothing_is_refused():
    async def scenario():
        async with cluster() as (_, _, stub):
            # A 3-token prompt of which 2 ran: position 2 is a prompt token, never sampled.
            await stub.ExecuteIteration(batch(1, new("x", [5, 6], [1], samples=False)), timeout=2)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ExecuteIteration(batch(2, pending("x", 2)), timeout=2)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sampled no token there" in info.value.details()
    run(scenario)


class _UnaryOnlyWorker(worker_pb2_grpc.WorkerServicer):
    """A worker from before ExecuteStream: the generated base answers it UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.inner = WorkerServicer(SimExecutor(time_scale=0))
        self.calls = 0

    async def ExecuteIteration(self, request, context):
        self.calls += 1
        return await self.inner.ExecuteIteration(request, context)


async def _serve(servicer) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def test_link_falls_back_to_one_call_per_plan_for_a_worker_without_the_stream():
    async def scenario():
        worker = _UnaryOnlyWorker()
        server, channel = await _serve(worker)
        try:
            link = WorkerLink(worker_pb2_grpc.WorkerStub(channel), "old", timeout_s=5)
            await link.send(batch(1, new("x", [5, 6, 7], [1])))
            await link.send(batch(2, worker_pb2.ScheduledChunk(request_id="x", num_computed_tokens=3,
                                                               token_ids=[sim_token("x", 0)], samples=True)))
            first, second = await link.receive(), await link.receive()
            assert not link.streaming and worker.calls == 2  # each plan ran once, in order
            assert (first.iteration, second.iteration) == (1, 2)
            assert second.sampled_token_ids["x"] == sim_token("x", 1)
        finally:
            await channel.close()
            await server.stop(None)
    run(scenario)


class _SilentWorker(worker_pb2_grpc.WorkerServicer):
    async def ExecuteStream(self, request_iterator, context):
        async for _ in request_iterator:
            await asyncio.Event().wait()  # takes the plan, never answers
        yield worker_pb2.IterationResult()


def test_link_gives_up_on_a_worker_that_goes_silent():
    async def scenario():
        server, channel = await _serve(_SilentWorker())
        try:
            link = WorkerLink(worker_pb2_grpc.WorkerStub(channel), "silent", timeout_s=0.3)
            await link.send(batch(1, new("x", [5], [1])))
            with pytest.raises(LinkTimeout):
                await link.receive()
            link.close()
        finally:
            await channel.close()
            await server.stop(None)
    run(scenario)


def test_a_stopping_worker_ends_its_plan_stream_instead_of_holding_the_grace_period():
    async def scenario():
        async with cluster(grace_s=60.0) as (_, handle, stub):
            call = stub.ExecuteStream()
            await call.write(batch(1, new("x", [5, 6, 7], [1])))
            assert (await call.read()).sampled_token_ids["x"] == sim_token("x", 0)
            # The scheduler keeps its stream open; the worker must still stop well inside its grace.
            await asyncio.wait_for(handle.stop(), timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "stopping" in info.value.details()
    run(scenario)
