"""The scheduler's side of a drain, in-process against a real Redis: what it routes, who may drain
whom, the deadline, and that a scheduler taking over keeps it (the whole-stack drains under load
are tests/e2e/test_worker_drain.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from scheduler_service.errors import ServiceError
from scheduler_service.workers import DEFAULT_DRAIN_GRACE_S, WorkerRegistry
from tests.integration.test_scheduler_intake import _scheduler, _submit, redis_url  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


def test_a_draining_worker_gets_nothing_new_and_a_new_scheduler_keeps_the_drain(redis_url: str) -> None:  # noqa: F811
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


def test_past_the_grace_period_the_worker_is_dropped_and_forgotten(redis_url: str) -> None:  # noqa: F811
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
