"""RedisStore against a real redis-server: the records a restarted scheduler relies on."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from accelgen.core.request import Request, RequestStatus, SamplingParams
from accelgen.core.slo import SLO
from accelgen.core.worker_info import WorkerInfo
from scheduler_service.state.store import IterationChanges, RedisStore, RequestIdTaken

pytestmark = pytest.mark.integration


def _request(rid: str) -> Request:
    return Request(request_id=rid, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4),
                   slo=SLO(ttft_s=1.0, tbt_s=0.1), app_class="chat", arrival_s=1.0)


def _finish(rid: str, tokens: list[int]) -> IterationChanges:
    return IterationChanges(worker_id="w0", tokens={rid: (tokens, [2.0] * len(tokens))},
                            status={rid: (RequestStatus.FINISHED, "length")}, finished=[rid])


def test_an_id_with_a_record_is_refused_even_finished_but_its_own_retry_is_accepted(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="reuse:")
        first = _request("r1")
        await store.add_request(first, "w0", tenant="team-a", label="client:1")
        await store.add_request(first, "w0", tenant="team-a", label="client:1")  # the same accept, re-sent
        assert [r.request.request_id for r in await store.load_live()] == ["r1"]
        await store.commit_iteration(_finish("r1", [11, 12, 13]))
        later = dataclasses.replace(first, arrival_s=2.0)  # another Submit with the id, after it finished
        with pytest.raises(RequestIdTaken, match="'r1' is already in use"):
            await store.add_request(later, "w1", tenant="team-b")
        rec = await store.load_request("r1")  # untouched: its tokens, its owner, its expiry
        assert rec is not None and rec.request.output_token_ids == [11, 12, 13] and rec.worker_id == "w0"
        assert (rec.tenant, rec.label) == ("team-a", "client:1")
        assert await store.redis.ttl("reuse:req:r1") > 0 and await store.load_live() == []
        await store.close()

    asyncio.run(scenario())


def test_an_id_whose_record_redis_lost_is_taken_with_a_clean_record(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="relost:")
        # Redis lost r1's record; a late commit then wrote its status and tokens without a prompt.
        await store.commit_iteration(IterationChanges(
            worker_id="w0", tokens={"r1": ([9], [1.0])}, status={"r1": (RequestStatus.FINISHED, "stop")},
            finished=["r1"]))
        await store.add_request(_request("r1"), "w1")
        new = await store.load_request("r1")
        assert new is not None and new.request.output_token_ids == [] and new.emitted_at == []
        assert new.request.status == RequestStatus.WAITING and new.worker_id == "w1"
        assert await store.redis.ttl("relost:req:r1") == -1, "the old record's expiry must not carry over"
        await store.close()

    asyncio.run(scenario())


def test_tenant_and_label_are_stored_and_old_records_read_them_as_empty(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="tags:")
        await store.add_request(_request("r1"), "w0", tenant="key-0123456789ab", label="my.req-1")
        await store.add_request(_request("r2"), "w0")
        await store.redis.hdel("tags:req:r2", "tenant", "label")  # written before the fields existed
        live = {r.request.request_id: (r.tenant, r.label) for r in await store.load_live()}
        assert live == {"r1": ("key-0123456789ab", "my.req-1"), "r2": ("", "")}
        await store.close()

    asyncio.run(scenario())


def test_fields_written_after_the_record_was_lost_read_as_unknown(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="lost:")
        # Redis restarted empty; a cancel (or an iteration commit) then writes its status fields.
        await store.commit_iteration(IterationChanges(
            worker_id="w0", status={"gone": (RequestStatus.CANCELLED, "abort")}, finished=["gone"]))
        assert await store.load_request("gone") is None
        await store.close()

    asyncio.run(scenario())


def test_a_burst_beyond_the_connection_pool_waits_instead_of_failing(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="burst:")
        await asyncio.gather(*(store.add_request(_request(f"b{i}"), "w0") for i in range(300)))
        assert len(await store.load_live()) == 300
        await store.close()

    asyncio.run(scenario())


def test_the_worker_registry_keeps_each_workers_address_and_info(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="workers:")
        info = WorkerInfo(model="m", executor="sim", block_size=16, num_blocks=100, max_model_len=2048,
                          profile_json="", eos_token_id=2, vocab_size=50272, max_num_seqs=8)
        await store.register_worker("w0", "127.0.0.1:7001", info, ttl_s=30)
        # The format before WorkerInfo: the description's fields, the address and the id in one dict.
        old = {"worker_id": "w1", "address": "127.0.0.1:7002", "model": "m", "executor": "sim", "block_size": 16,
               "num_blocks": 50, "max_model_len": 2048, "profile_json": "", "eos_token_id": 2, "vocab_size": 0,
               "max_num_batched_tokens": 0, "max_num_seqs": 0}
        await store.redis.hset("workers:workers", "w1", json.dumps(old))
        await store.redis.set("workers:alive:w1", "1", px=30_000)
        await store.register_worker("w2", "127.0.0.1:7003", info, ttl_s=30)
        await store.remove_worker("w2")
        live = await store.live_workers()
        old_info = dataclasses.replace(info, num_blocks=50, vocab_size=0, max_num_seqs=0)
        assert live == {"w0": ("127.0.0.1:7001", info), "w1": ("127.0.0.1:7002", old_info)}
        await store.close()

    asyncio.run(scenario())


def _tokens(rid: str, tokens: list[int], offset: int) -> IterationChanges:
    return IterationChanges(worker_id="w0", tokens={rid: (tokens, [float(offset + i) for i in range(len(tokens))])},
                            offsets={rid: offset})


def test_a_commit_sent_twice_appends_its_tokens_once(redis_url: str) -> None:
    """redis-py re-sends a command whose reply was lost: the commit script must be idempotent."""
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="twice:")
        await store.add_request(_request("r1"), "w0")
        first = _tokens("r1", [11, 12], offset=0)
        await store.commit_iteration(first)
        await store.commit_iteration(first)  # the same iteration again
        second = _tokens("r1", [13], offset=2)
        await store.commit_iteration(second)
        await store.commit_iteration(second)
        rec = await store.load_request("r1")
        assert rec is not None and rec.request.output_token_ids == [11, 12, 13]
        assert rec.emitted_at == [0.0, 1.0, 2.0]
        await store.close()

    asyncio.run(scenario())


def test_tokens_redis_lost_are_restored_from_what_clients_were_delivered(redis_url: str) -> None:
    """A failover (or a crash with AOF everysec) loses acknowledged commits: the next commit finds
    the gap, writes nothing, and the committer restores the delivered output before writing it."""
    from scheduler_service.committer import Committer
    from scheduler_service.state.store import OutputGap

    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="gap:")
        await store.add_request(_request("r1"), "w0")
        await store.commit_iteration(_tokens("r1", [11, 12], offset=0))
        await store.redis.delete("gap:out:r1", "gap:tim:r1")  # the lost write
        with pytest.raises(OutputGap) as lost:
            await store.commit_iteration(_tokens("r1", [13], offset=2))
        assert lost.value.request_ids == ["r1"]
        assert await store.redis.get("gap:out:r1") is None, "a commit with a gap writes nothing"

        delivered: list[IterationChanges] = []
        committer = Committer(store, delivered.append, history=lambda rid: ([11, 12], [0.0, 1.0]))
        await committer.commit(_tokens("r1", [13], offset=2))
        rec = await store.load_request("r1")
        assert rec is not None and rec.request.output_token_ids == [11, 12, 13]
        assert rec.emitted_at == [0.0, 1.0, 2.0]
        assert [list(ch.tokens) for ch in delivered] == [["r1"]]

        # Without a history to restore from, the request is ended (abort) rather than corrupted.
        await store.redis.delete("gap:out:r1", "gap:tim:r1")
        blind = Committer(store, delivered.append, history=lambda rid: None)
        await blind.commit(_tokens("r1", [14], offset=3))
        assert delivered[-1].status["r1"][0] == RequestStatus.CANCELLED
        assert await store.redis.get("gap:out:r1") is None
        await store.close()

    asyncio.run(scenario())
