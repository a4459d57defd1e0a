"""A gateway's stop string through a real scheduler (gRPC, Redis) and an in-process sim worker: a
Cancel with finish_reason "stop" and keep_output_tokens N finishes the request (not cancels it),
with exactly its first N outputs in memory, in Redis and on every WatchMany after it, counted as
finished in the scheduler's metrics; the Submit's stop strings come back in GetRequest."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.integration.test_scheduler_logprobs import _scheduler

pytestmark = pytest.mark.integration

P = "accelgen_scheduler_"


def _submit(rid: str, stop: list[str]) -> scheduler_pb2.SubmitRequest:
    sp = common_pb2.SamplingParams(max_new_tokens=100_000, ignore_eos=True, temperature=0.7, logprobs=2)
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=[7] * 20, app_class="batch",
                                       sampling_params=sp, stop=stop, include_stop_str_in_output=True)


async def _watch(stub: scheduler_pb2_grpc.SchedulerStub, rid: str, until: int | None = None
                 ) -> tuple[list[int], int, scheduler_pb2.TokenBatch]:
    """Tokens of ``rid`` from 0 (and how many logprobs came) until it finished or has ``until``."""
    async def requests() -> AsyncIterator[scheduler_pb2.WatchManyRequest]:
        yield scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=rid)])
        await asyncio.Event().wait()

    tokens: list[int] = []
    lps = 0
    call = stub.WatchMany(requests(), timeout=20)
    try:
        async for resp in call:
            assert not resp.errors, resp.errors
            for b in resp.batches:
                tokens += b.token_ids
                lps += len(b.logprobs)
                if b.finished or (until is not None and len(tokens) >= until):
                    return tokens, lps, b
    finally:
        call.cancel()
    raise AssertionError("the stream ended before the request finished")


async def _expect_invalid(stub: scheduler_pb2_grpc.SchedulerStub, msg: common_pb2.CancelRequest, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Cancel(msg, timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in bad.value.details()


def test_a_stop_cancel_finishes_with_exactly_n_outputs_everywhere(redis_url: str) -> None:
    async def main() -> None:
        handle = await _scheduler(redis_url, "stopf:")
        restarted = None
        try:
            async with grpc.aio.insecure_channel(handle.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                await stub.Submit(_submit("s", ["</s>", "\n\n"]), timeout=5)
                seen, _, _ = await _watch(stub, "s", until=8)
                bad = (common_pb2.CancelRequest(request_id="s", finish_reason="stop"), "needs keep_output_tokens")
                await _expect_invalid(stub, *bad)
                await _expect_invalid(stub, common_pb2.CancelRequest(request_id="s", finish_reason="done"),
                                      "finish_reason may be")
                await _expect_invalid(stub, common_pb2.CancelRequest(request_id="s", finish_reason="stop",
                                                                     keep_output_tokens=10**6), "is beyond the")
                reply = await stub.Cancel(common_pb2.CancelRequest(request_id="s", finish_reason="stop",
                                                                   keep_output_tokens=5), timeout=5)
                assert reply.cancelled
                state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="s"), timeout=5)
                assert (state.status, state.finish_reason) == ("finished", "stop")
                assert list(state.output_ids) == seen[:5]
                assert list(state.stop) == ["</s>", "\n\n"] and state.include_stop_str_in_output
                tokens, lps, last = await _watch(stub, "s")  # the channel: no token past 5
                assert tokens == seen[:5] and lps == 5 and last.finish_reason == "stop"
                with pytest.raises(grpc.aio.AioRpcError) as again:  # done: a second stop is NOT_FOUND
                    await stub.Cancel(common_pb2.CancelRequest(request_id="s", finish_reason="stop",
                                                               keep_output_tokens=5), timeout=5)
                assert again.value.code() == grpc.StatusCode.NOT_FOUND
            registry = handle.app.metrics.registry
            assert registry.get_sample_value(P + "requests_finished_total",
                                             {"app_class": "batch", "finish_reason": "stop"}) == 1
            assert not registry.get_sample_value(P + "requests_cancelled_total", {"app_class": "batch"})
            await handle.stop(grace_s=0.2)
            # Redis alone (a restarted scheduler, no channel): the record holds exactly 5 too.
            restarted = await _scheduler(redis_url, "stopf:", hang=True)
            async with grpc.aio.insecure_channel(restarted.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                tokens, lps, last = await _watch(stub, "s")
                assert tokens == seen[:5] and lps == 5 and last.finished and last.finish_reason == "stop"
                state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="s"), timeout=5)
                assert (state.status, len(state.output_ids)) == ("finished", 5)
            r = aioredis.from_url(redis_url)
            try:
                assert 0 < await r.ttl("stopf:out:s") and 0 < await r.ttl("stopf:lp:s")  # kept finished_ttl_s
            finally:
                await r.aclose()
        finally:
            if restarted is not None:
                await restarted.stop(grace_s=0.2)
            else:
                await handle.stop(grace_s=0.2)

    asyncio.run(main())


def test_records_without_stop_fields_read_as_none(redis_url: str) -> None:
    async def main() -> None:
        handle = await _scheduler(redis_url, "stopo:", hang=True)
        try:
            async with grpc.aio.insecure_channel(handle.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                await stub.Submit(_submit("old", ["x"]), timeout=5)
                r = aioredis.from_url(redis_url)
                try:
                    await r.hdel("stopo:req:old", "stop", "include_stop")  # as written before them
                finally:
                    await r.aclose()
                state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="old"), timeout=5)
                assert list(state.stop) == [] and not state.include_stop_str_in_output
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await stub.Submit(_submit("many", ["s"] * 17), timeout=5)
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await handle.stop(grace_s=0.2)

    asyncio.run(main())
