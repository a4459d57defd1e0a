"""Logprobs through a real scheduler (gRPC, Redis) and an in-process sim worker: Submit asks for
them, WatchMany delivers them aligned with the tokens from any start index, and a restarted
scheduler delivers the same ones from Redis."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import pytest

from accelgen.core.request import SamplingParams
from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from accelgen.wire.logprobs import logprob_from_proto
from scheduler_service.config import SchedulerConfig
from scheduler_service.main import SchedulerHandle, start_scheduler
from tests.support.in_process_worker import InProcessWorker
from worker_service.executors.sim import sim_logprob

pytestmark = pytest.mark.integration


async def _scheduler(url: str, prefix: str, hang: bool = False) -> SchedulerHandle:
    config = SchedulerConfig(port=0, redis_url=url, redis_prefix=prefix, heartbeat_interval_s=0.5,
                             heartbeat_ttl_s=60.0, lease_ttl_s=2.0)
    handle = await start_scheduler(config)
    worker = InProcessWorker(hang)
    await handle.app.workers.register("w0", "127.0.0.1:1", worker.servicer.info)
    handle.app.workers.lanes["w0"].link.stub = worker  # before the lane's first await
    return handle


def _submit(rid: str, max_tokens: int, logprobs: int | None) -> scheduler_pb2.SubmitRequest:
    sp = common_pb2.SamplingParams(max_new_tokens=max_tokens, ignore_eos=True, temperature=0.7)
    if logprobs is not None:
        sp.logprobs = logprobs
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=[7] * 20, app_class="batch", sampling_params=sp)


async def _watch(stub: scheduler_pb2_grpc.SchedulerStub, rid: str, start: int,
                 until: int | None = None) -> tuple[list[int], list[common_pb2.TokenLogprob], bool]:
    """Tokens and logprobs of ``rid`` from ``start`` until it finished (or has ``until`` tokens)."""
    async def requests() -> AsyncIterator[scheduler_pb2.WatchManyRequest]:
        yield scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=rid, start_index=start)])
        await asyncio.Event().wait()

    tokens: list[int] = []
    lps: list[common_pb2.TokenLogprob] = []
    call = stub.WatchMany(requests(), timeout=20)
    try:
        async for resp in call:
            assert not resp.errors, resp.errors
            for b in resp.batches:
                assert b.start_index == start + len(tokens) and len(b.logprobs) in (0, len(b.token_ids))
                tokens += b.token_ids
                lps += b.logprobs
                if b.finished or (until is not None and len(tokens) >= until):
                    return tokens, lps, b.finished
    finally:
        call.cancel()
    raise AssertionError("the stream ended before the request finished")


def _expected(rid: str, start: int, n: int, k: int) -> list:
    sp = SamplingParams(temperature=0.7, logprobs=k)
    return [(lp.token_id, lp.rank, [t for t, _ in lp.top]) for lp in (sim_logprob(rid, i, sp) for i in range(start, n))]


def _seen(lps: list[common_pb2.TokenLogprob]) -> list:
    return [(lp.token_id, lp.rank, [t for t, _ in lp.top]) for lp in map(logprob_from_proto, lps)]


def test_watchmany_delivers_logprobs_aligned_from_any_start_and_only_when_asked(redis_url: str) -> None:
    async def main() -> None:
        handle = await _scheduler(redis_url, "lpw:")
        try:
            async with grpc.aio.insecure_channel(handle.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await stub.Submit(_submit("bad", 4, logprobs=21), timeout=5)
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "sampling_params.logprobs must be in 0..20" in bad.value.details()
                await stub.Submit(_submit("a", 12, logprobs=3), timeout=5)
                await stub.Submit(_submit("b", 12, logprobs=None), timeout=5)
                tokens, lps, _ = await _watch(stub, "a", 0)
                assert len(tokens) == 12 and [lp.token_id for lp in lps] == tokens
                assert _seen(lps) == _expected("a", 0, 12, 3)
                tokens, lps, _ = await _watch(stub, "a", 5)  # a resume from index 5
                assert len(tokens) == 7 and _seen(lps) == _expected("a", 5, 12, 3)
                tokens, lps, _ = await _watch(stub, "b", 0)
                assert len(tokens) == 12 and lps == []
        finally:
            await handle.stop(grace_s=0.2)

    asyncio.run(main())


def test_a_restarted_scheduler_delivers_the_stored_logprobs(redis_url: str) -> None:
    async def main() -> None:
        first = await _scheduler(redis_url, "lpr:")
        async with grpc.aio.insecure_channel(first.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            await stub.Submit(_submit("r", 1500, logprobs=2), timeout=5)
            await _watch(stub, "r", 0, until=3)
        await first.stop(grace_s=0.2)  # mid-run (or just finished: then Redis answers alone)

        second = await _scheduler(redis_url, "lpr:", hang=True)  # recovers r; no new token comes
        try:
            async with grpc.aio.insecure_channel(second.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="r"), timeout=5)
                n = len(state.output_ids)
                assert n >= 3
                tokens, lps, _ = await _watch(stub, "r", 1, until=n - 1)  # from the recovered channel
                assert tokens == list(state.output_ids[1:]) and _seen(lps) == _expected("r", 1, n, 2)
        finally:
            await second.stop(grace_s=0.2)

    asyncio.run(main())
