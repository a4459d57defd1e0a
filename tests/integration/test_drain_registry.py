"""The scheduler's side of a drain, in-process against a real Redis: what it routes, who may drain
whom, the deadline, that a scheduler taking over keeps it, and that the requests the worker has not
started move to another worker at once (the whole-stack drains under load are
tests/e2e/test_worker_drain.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from structlog.testing import capture_logs

from accelgen.core.request import RequestStatus
from accelgen.v1 import worker_pb2
from scheduler_service.config import SchedulerConfig
from scheduler_service.errors import ServiceError
from scheduler_service.main import start_scheduler
from scheduler_service.workers import DEFAULT_DRAIN_GRACE_S, WorkerRegistry
from tests.integration.test_scheduler_intake import _scheduler, _submit, _until
from tests.support.in_process_worker import InProcessWorker

pytestmark = pytest.mark.integration


def test_a_draining_worker_gets_nothing_new_and_a_new_scheduler_keeps_the_drain(redis_url: str) -> None:
    async def main() -> None:
        first = await _scheduler(redis_url, "drain1:")
        workers: WorkerRegistry = first.app.workers
        info = workers.lanes["w0"].info
        try:
            await workers.register("w1", "127.0.0.1:5", info, identity="a" * 64)  # never answers: gets nothing
            with pytest.raises(ServiceError) as refused:  # another worker's certificate
                await workers.drain("w1", 60, identity="b" * 64)
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(ServiceError) as unknown:
                await workers.drain("nobody", 60, operator=True)
            assert unknown.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(ServiceError) as bad:
                await workers.drain("w1", -1, operator=True)
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT

            state = await workers.drain("w1", 60, identity="a" * 64)
            assert state.draining and state.assigned == 0 and 59 < state.left_s <= 60
            assert (await workers.drain("w1", 600, operator=True)).left_s <= 60  # the sooner deadline holds
            for i in range(6):
                await first.app.intake.submit(_submit(f"r{i}"))
                assert workers.worker_of(f"r{i}") in ("w0", None)  # w0, or already finished there
            assert workers.pick_lane() is workers.lanes["w0"]
            # The same worker back after a blip keeps its drain.
            await workers.register("w1", "127.0.0.1:5", info, identity="a" * 64)
            assert workers.drain_state("w1").draining
        finally:
            await first.stop(grace_s=0.2)

        second = await _scheduler(redis_url, "drain1:")  # recovers w1 from Redis, drain included
        try:
            workers = second.app.workers
            state = workers.drain_state("w1")
            assert state.draining and 50 < state.left_s <= 60
            assert workers.pick_lane() is workers.lanes["w0"]
            # A new worker under the id (another address) starts undrained, in Redis too.
            await workers.register("w1", "127.0.0.1:6", info, identity="a" * 64)
            assert not workers.drain_state("w1").draining
            assert (await second.app.store.live_worker_records())["w1"].draining_until == 0.0
        finally:
            await second.stop(grace_s=0.2)

    asyncio.run(main())


def test_past_the_grace_period_the_worker_is_dropped_and_forgotten(redis_url: str) -> None:
    async def main() -> None:
        handle = await _scheduler(redis_url, "drain2:")
        workers: WorkerRegistry = handle.app.workers
        try:
            info = dataclasses.replace(workers.lanes["w0"].info)
            await workers.register("w1", "127.0.0.1:5", info)
            state = await workers.drain("w1", 0)  # 0: the default grace
            assert DEFAULT_DRAIN_GRACE_S - 1 < state.left_s <= DEFAULT_DRAIN_GRACE_S
            workers.hand_over_drained(time.time())  # not yet
            assert "w1" in workers.lanes
            workers.hand_over_drained(time.time() + DEFAULT_DRAIN_GRACE_S)
            deadline = time.monotonic() + 10
            while "w1" in workers.lanes or "w1" in await handle.app.store.live_worker_records():
                assert time.monotonic() < deadline, "w1 was not dropped"
                await asyncio.sleep(0.02)
            assert not await workers.heartbeat("w1")  # its worker hears it is forgotten, and exits
        finally:
            await handle.stop(grace_s=0.2)

    asyncio.run(main())


class _Recording(InProcessWorker):
    """An in-process worker that notes the requests it sampled tokens for: where they ran."""

    def __init__(self, hang: bool = False) -> None:
        super().__init__(hang)
        self.ran: set[str] = set()

    def received(self, reply: worker_pb2.IterationResult) -> worker_pb2.IterationResult:
        self.ran.update(reply.sampled_token_ids)
        return reply


def test_a_drain_moves_what_its_worker_has_not_started_to_another_worker(redis_url: str) -> None:
    async def main() -> None:
        config = SchedulerConfig(port=0, redis_url=redis_url, redis_prefix="drain3:", heartbeat_interval_s=0.5,
                                 heartbeat_ttl_s=60.0, lease_ttl_s=2.0, max_num_seqs=1)
        handle = await start_scheduler(config)
        workers: WorkerRegistry = handle.app.workers
        leaving, staying = _Recording(hang=True), _Recording()  # leaving: one request at a time, never done
        try:
            await workers.register("w1", "127.0.0.1:1", leaving.servicer.info)
            workers.lanes["w1"].link.stub = leaving  # before the lane's first await
            for i in range(4):
                await handle.app.intake.submit(_submit(f"r{i}", max_tokens=8))
            core = workers.lanes["w1"].core

            async def started() -> bool:
                r0 = core.requests["r0"]
                return r0.status is RequestStatus.RUNNING and r0.num_computed_tokens > 0

            await _until(started, "r0 to start on w1")
            await workers.register("w0", "127.0.0.1:2", staying.servicer.info)
            workers.lanes["w0"].link.stub = staying
            with capture_logs() as logs:
                state = await workers.drain("w1", 60, operator=True)
            assert state.draining and state.assigned == 1  # only r0, which it started, is left to it
            assert [(e["worker"], e["moved"]) for e in logs if e["event"] == "drain_moved"] == [("w1", 3)]
            moved = [f"r{i}" for i in (1, 2, 3)]

            async def finished() -> bool:
                records = [await handle.app.store.load_request(rid) for rid in moved]
                return all(rec is not None and rec.request.status is RequestStatus.FINISHED for rec in records)

            await _until(finished, "the moved requests to finish")
            assert staying.ran == set(moved) and leaving.ran == set()  # they ran on w0 only
            for rid in moved:
                rec = await handle.app.store.load_request(rid)
                assert rec is not None and len(rec.request.output_token_ids) == 8 and rec.request.num_preemptions == 0
            assert workers.worker_of("r0") == "w1" and set(core.requests) == {"r0"}
            assert [rec.request.request_id for rec in await handle.app.store.load_live()] == ["r0"]
        finally:
            await handle.stop(grace_s=0.2)

    asyncio.run(main())
