"""Logprobs in Redis, against a real redis-server: stored with the tokens (only for requests that
asked), appended exactly once per token across retries, restored with them after a lost write,
expired with them, and read back aligned with the output for a recovery or a late watcher."""

from __future__ import annotations

import asyncio

import pytest

from accelgen.core.logprobs import TokenLogprob
from accelgen.core.request import Request, RequestStatus, SamplingParams
from accelgen.core.slo import SLO
from scheduler_service.committer import Committer
from scheduler_service.delivery import Delivery
from scheduler_service.state.store import IterationChanges, OutputGap, RedisStore

pytestmark = pytest.mark.integration


def _request(rid: str, logprobs: int | None) -> Request:
    return Request(request_id=rid, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=8, logprobs=logprobs),
                   slo=SLO(ttft_s=1.0, tbt_s=0.1), app_class="chat", arrival_s=1.0)


def _lp(token: int) -> TokenLogprob:
    return TokenLogprob(token, -0.5, 1, ((token, -0.5), (token + 1, -1.5)))


def _step(tokens: dict[str, list[int]], offsets: dict[str, int], asked: set[str],
          finished: tuple[str, ...] = ()) -> IterationChanges:
    return IterationChanges(
        worker_id="w0", tokens={rid: (toks, [float(t) for t in toks]) for rid, toks in tokens.items()},
        offsets=dict(offsets), logprobs={rid: [_lp(t) for t in toks] for rid, toks in tokens.items() if rid in asked},
        status={rid: (RequestStatus.FINISHED, "length") for rid in finished}, finished=list(finished))


def test_logprobs_are_stored_with_their_tokens_once_and_only_for_requests_that_asked(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="lp:", finished_ttl_s=300)
        await store.add_request(_request("a", 2), "w0")
        await store.add_request(_request("b", None), "w0")
        first = _step({"a": [11, 12], "b": [21, 22]}, {"a": 0, "b": 0}, {"a"})
        await store.commit_iteration(first)
        await store.commit_iteration(first)  # a retry whose first attempt landed: nothing twice
        await store.commit_iteration(_step({"a": [13], "b": [23]}, {"a": 2, "b": 2}, {"a"}, finished=("a",)))
        rec = await store.load_request("a")
        assert rec is not None and rec.request.output_token_ids == [11, 12, 13]
        assert rec.request.sampling.logprobs == 2
        assert rec.logprobs == [_lp(11), _lp(12), _lp(13)]
        assert await store.redis.ttl("lp:lp:a") > 0, "expires with the record"
        other = await store.load_request("b")
        assert other is not None and other.logprobs == [] and other.request.output_token_ids == [21, 22, 23]
        assert not await store.redis.exists("lp:lp:b"), "a request that did not ask pays nothing"
        # A late watcher (the channel gone) reads them aligned from any index.
        batch = await Delivery(store).batch_from_store("a", 1)
        assert list(batch.token_ids) == [12, 13] and [m.token_id for m in batch.logprobs] == [12, 13]
        await store.close()

    asyncio.run(scenario())


def test_logprobs_redis_lost_are_restored_with_the_tokens(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="lpgap:")
        await store.add_request(_request("r", 2), "w0")
        await store.commit_iteration(_step({"r": [11, 12]}, {"r": 0}, {"r"}))
        await store.redis.delete("lpgap:out:r", "lpgap:tim:r", "lpgap:lp:r")  # a failover lost the write
        with pytest.raises(OutputGap):
            await store.commit_iteration(_step({"r": [13]}, {"r": 2}, {"r"}))
        delivered: list[IterationChanges] = []
        history = ([11, 12], [11.0, 12.0], [_lp(11), _lp(12)])
        committer = Committer(store, delivered.append, history=lambda rid: history)
        await committer.commit(_step({"r": [13]}, {"r": 2}, {"r"}))
        rec = await store.load_request("r")
        assert rec is not None and rec.request.output_token_ids == [11, 12, 13]
        assert rec.logprobs == [_lp(11), _lp(12), _lp(13)]
        assert delivered[0].logprobs == {"r": [_lp(13)]}
        await store.close()

    asyncio.run(scenario())


def test_a_bad_key_isolates_only_its_request_and_the_others_keep_their_logprobs(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="lpbad:")
        await store.add_request(_request("good", 1), "w0")
        await store.add_request(_request("bad", 1), "w0")
        await store.redis.hset("lpbad:lp:bad", "x", "1")  # wrong type: its APPEND fails
        delivered: list[IterationChanges] = []
        committer = Committer(store, delivered.append)
        await committer.commit(_step({"good": [11], "bad": [31]}, {"good": 0, "bad": 0}, {"good", "bad"}))
        rec = await store.load_request("good")
        assert rec is not None and rec.logprobs == [_lp(11)] and rec.request.output_token_ids == [11]
        assert delivered[0].logprobs == {"good": [_lp(11)]} and "bad" in delivered[0].finished
        await store.close()

    asyncio.run(scenario())
