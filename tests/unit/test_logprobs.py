"""Logprobs from the worker to the gateway, without a network: the converters, the sim's fake
distribution, the core carrying them with the tokens (pipelined, preempted), delivery's batches
from any start index, and the gateway's Delta/Outcome."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict, deque

import pytest

from accelgen.core.fields import FieldError
from accelgen.core.logprobs import MAX_LOGPROBS, TokenLogprob
from accelgen.core.plan import BatchPlan
from accelgen.core.request import Request, SamplingParams
from accelgen.core.scheduler import TokenEvent
from accelgen.core.slo import SLO
from accelgen.v1 import common_pb2, scheduler_pb2
from accelgen.wire.logprobs import (logprob_from_proto, logprob_to_proto, pack_logprobs, unpack_logprobs)
from accelgen.wire.sampling import sampling_from_json, sampling_from_proto, sampling_to_json, sampling_to_proto
from gateway.generation import _split
from gateway.logprobs import TokenLogprobInfo, logprobs_from_proto
from gateway.scheduler_client import _trim
from scheduler_service import convert as sched_convert
from scheduler_service.delivery import Delivery, token_batch
from scheduler_service.state.store import IterationChanges
from tests.unit.test_core_pipelining import make_core, profile
from worker_service import convert as worker_convert
from worker_service.executors.sim import SimExecutor, sim_logprob, sim_token
from worker_service.plan import ChunkSpec, WorkerPlan

pytestmark = pytest.mark.unit

LP = TokenLogprob(token_id=42, logprob=-0.25, rank=2, top=((7, -0.125), (42, -0.25)))


# -- wire ------------------------------------------------------------------------------------
def test_sampling_logprobs_round_trip_and_unset_means_none() -> None:
    msg = common_pb2.SamplingParams(temperature=0.5, logprobs=3)
    sp = sampling_from_proto(msg)
    assert sp.logprobs == 3 and sampling_to_proto(sp).logprobs == 3
    assert sampling_from_json(sampling_to_json(sp)) == sp
    unset = sampling_from_proto(common_pb2.SamplingParams())
    assert unset.logprobs is None and not sampling_to_proto(unset).HasField("logprobs")
    assert sampling_from_proto(common_pb2.SamplingParams(logprobs=0)).logprobs == 0  # the sampled token only
    # A record that does not use logprobs reads in a scheduler from before them (no unknown field).
    assert "logprobs" not in sampling_to_json(unset) and sampling_from_json(sampling_to_json(unset)) == unset


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1])
def test_logprobs_out_of_range_is_refused_under_the_client_field_name(bad: int) -> None:
    with pytest.raises(FieldError, match=rf"sampling_params.logprobs must be in 0..{MAX_LOGPROBS}.*got {bad}"):
        sampling_from_proto(common_pb2.SamplingParams(logprobs=bad))
    with pytest.raises(FieldError, match="^logprobs must be"):
        SamplingParams(logprobs=bad)


def test_token_logprob_proto_and_bytes_round_trip() -> None:
    assert logprob_from_proto(logprob_to_proto(LP)) == LP  # values exact in float32
    records = [LP, TokenLogprob(3, -1.5, 1), TokenLogprob(2**32 - 1, -math.inf, 50_000, ((1, -0.5),))]
    assert unpack_logprobs(pack_logprobs(records)) == records
    assert unpack_logprobs(b"") == [] and unpack_logprobs(None) == []
    # Records append: two appends decode as one list, in order.
    assert unpack_logprobs(pack_logprobs(records[:1]) + pack_logprobs(records[1:])) == records
    with pytest.raises(ValueError, match="truncated"):
        unpack_logprobs(pack_logprobs([LP])[:-3])


# -- the sim's fake distribution ---------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sim_logprobs_are_a_consistent_distribution(temperature: float) -> None:
    sp = SamplingParams(temperature=temperature, logprobs=5)
    for index in range(40):
        lp = sim_logprob("req", index, sp)
        assert lp is not None and lp.token_id == sim_token("req", index)
        assert lp == sim_logprob("req", index, sp), "deterministic"
        ids, values = [t for t, _ in lp.top], [v for _, v in lp.top]
        assert len(ids) == 5 == len(set(ids)) and values == sorted(values, reverse=True)
        assert all(v < 0 for v in values) and sum(math.exp(v) for v in values) < 1
        assert lp.logprob < 0 and 1 <= lp.rank <= 3
        assert lp.top[lp.rank - 1] == (lp.token_id, lp.logprob), "the sampled token sits at its rank"
        if temperature == 0:
            assert lp.rank == 1 and lp.top[0][0] == lp.token_id
    assert sim_logprob("req", 0, SamplingParams()) is None and sim_logprob("req", 0, None) is None
    assert sim_logprob("req", 0, SamplingParams(logprobs=0)).top == ()


def test_sim_executor_reports_logprobs_only_for_requests_that_asked() -> None:
    ex = SimExecutor(profile(64), time_scale=0)

    def new(rid: str, sp: SamplingParams) -> ChunkSpec:
        return ChunkSpec(rid, 0, [5, 6, 7], [1 + len(rid)], True, [1 + len(rid)], sp, True, 0, 3)

    plan = WorkerPlan(1, "e1", [new("a", SamplingParams(logprobs=2)), new("bb", SamplingParams())])
    out = ex.execute(plan)
    assert set(out.sampled_token_ids) == {"a", "bb"} and set(out.logprobs) == {"a"}
    assert out.logprobs["a"] == sim_logprob("a", 0, SamplingParams(logprobs=2))
    # Across the worker's wire and into the scheduler's core type.
    msg = worker_convert.result_to_proto(out)
    assert set(msg.logprobs) == {"a"} and msg.logprobs["a"].rank == 1
    back = sched_convert.result_from_proto(msg)
    assert back.logprobs["a"].token_id == out.sampled_token_ids["a"] and len(back.logprobs["a"].top) == 2
    assert worker_convert.result_from_proto(msg).logprobs.keys() == {"a"}


# -- the core carries them with the tokens -------------------------------------------------------
def _req(rid: str, prompt: int, max_tokens: int, logprobs: int | None) -> Request:
    return Request(request_id=rid, prompt_token_ids=[7 + i % 50 for i in range(prompt)],
                   sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs),
                   slo=SLO(ttft_s=5.0, tbt_s=1.0), app_class="chat", arrival_s=0.0, eos_token_id=2)


def _drive(requests: list[Request], depth: int, kv_blocks: int) -> dict[str, list[TokenEvent]]:
    """A lane without gRPC, every plan and result through the real converters."""
    core = make_core(kv_blocks)
    for r in requests:
        core.add_request(r)
    worker = SimExecutor(profile(kv_blocks), time_scale=0)
    in_flight: deque[tuple[BatchPlan, object]] = deque()
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    now = 0.0
    for _ in range(20_000):
        while len(in_flight) < depth and (core.has_work() or core.has_ids_to_free):
            plan = core.step(now)
            if plan.is_empty and not plan.freed_request_ids:
                break
            msg = sched_convert.plan_to_proto(plan, core.requests, "e1")
            if depth > 1:
                core.dispatch(plan)
            in_flight.append((plan, msg))
        if not in_flight:
            return events
        plan, msg = in_flight.popleft()
        reply = worker_convert.result_to_proto(worker.execute(worker_convert.plan_from_proto(msg)))
        now += 0.01
        for ev in core.complete(plan, sched_convert.result_from_proto(reply), now).tokens:
            events[ev.request_id].append(ev)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("depth", [1, 2])
def test_each_token_keeps_the_logprobs_it_was_sampled_with_through_pipelining_and_preemption(depth: int) -> None:
    # 12 blocks of 16 for 4 requests that each grow to 5-6 blocks: recompute preemptions.
    requests = [_req(f"p{i}", 30, 60, logprobs=3 if i % 2 == 0 else None) for i in range(4)]
    events = _drive(requests, depth, kv_blocks=12)
    assert sum(r.num_preemptions for r in requests) > 0
    for r in requests:
        evs = events[r.request_id]
        assert [ev.index for ev in evs] == list(range(60))
        if r.sampling.logprobs is None:
            assert all(ev.logprob is None for ev in evs), "nothing for a request that did not ask"
        else:
            expected = [sim_logprob(r.request_id, i, r.sampling) for i in range(60)]
            assert [ev.logprob for ev in evs] == [
                TokenLogprob(e.token_id, _f32(e.logprob), e.rank, tuple((t, _f32(v)) for t, v in e.top))
                for e in expected]
            assert all(ev.logprob.token_id == ev.token_id for ev in evs)


def test_a_result_without_the_logprobs_asked_for_is_refused() -> None:
    from accelgen.core.plan import IterationResult

    core = make_core()
    core.add_request(_req("a", 5, 3, logprobs=1))
    plan = core.step(0.0)
    token = sim_token("a", 0)
    with pytest.raises(ValueError, match="no logprobs for 'a'"):
        core.complete(plan, IterationResult(plan.iteration, {"a": token}, 0.01), 0.01)
    core = make_core()
    core.add_request(_req("a", 5, 3, logprobs=1))
    plan = core.step(0.0)
    with pytest.raises(ValueError, match="for token 9 with 0 top tokens; it sampled"):
        core.complete(plan, IterationResult(plan.iteration, {"a": token}, 0.01, {"a": TokenLogprob(9, -1.0, 1)}),
                      0.01)


def _f32(x: float) -> float:
    import struct
    return struct.unpack("<f", struct.pack("<f", x))[0]


# -- delivery: aligned with the tokens from any start index ----------------------------------------
def _lps(n: int) -> list[TokenLogprob]:
    return [TokenLogprob(100 + i, -0.5 * (i + 1), i + 1, ((1, -0.25),)) for i in range(n)]


def test_token_batches_carry_aligned_logprobs_from_any_start_index() -> None:
    tokens, times, lps = [100, 101, 102, 103], [1.0, 2.0, 3.0, 4.0], _lps(4)
    for start in range(5):
        b = token_batch("r", 3, tokens, times, start, 4, None, lps)
        assert list(b.token_ids) == tokens[start:] and b.start_index == start
        assert [logprob_from_proto(m) for m in b.logprobs] == lps[start:]
    assert not token_batch("r", 3, tokens, times, 0, 4, "length").logprobs  # not asked
    assert not token_batch("r", 3, tokens, times, 0, 4, None, lps[:2]).logprobs  # never misaligned


def test_delivery_channels_and_the_store_fallback_keep_logprobs_aligned() -> None:
    async def scenario() -> None:
        class Store:
            async def load_request(self, rid: str):
                from scheduler_service.state.store import StoredRequest
                r = _req(rid, 3, 4, logprobs=1)
                r.output_token_ids = [100, 101, 102, 103]
                r.status = r.status.FINISHED
                return StoredRequest(request=r, emitted_at=[1.0] * 4, logprobs=_lps(4))

        delivery = Delivery(Store())  # type: ignore[arg-type]
        delivery.open("a", 3, [100], [1.0], _lps(1))  # recovered with one token
        delivery.open("b", 3)  # did not ask
        lps = _lps(3)
        delivery.publish(IterationChanges(worker_id="w", tokens={"a": ([101, 102], [2.0, 3.0]), "b": ([7], [2.0])},
                                          logprobs={"a": lps[1:]}))
        ch = delivery.channels["a"]
        batch, end = ch.batch(2)
        assert end == 3 and list(batch.token_ids) == [102]
        assert [logprob_from_proto(m) for m in batch.logprobs] == lps[2:]
        assert delivery.history("a") == ([100, 101, 102], [1.0, 2.0, 3.0], lps)
        assert not delivery.channels["b"].batch(0)[0].logprobs
        stored = await delivery.batch_from_store("done", 1)
        assert list(stored.token_ids) == [101, 102, 103]
        assert logprobs_from_proto(stored.logprobs) == [
            TokenLogprobInfo(lp.token_id, lp.logprob, lp.rank, list(lp.top)) for lp in _lps(4)[1:]]

    asyncio.run(scenario())


# -- the gateway ------------------------------------------------------------------------------
def _batch(start: int, n: int, finished: bool = False) -> scheduler_pb2.TokenBatch:
    lps = _lps(start + n)[start:]
    return scheduler_pb2.TokenBatch(request_id="r", token_ids=[lp.token_id for lp in lps], start_index=start,
                                    emitted_at=[1.0] * n, finished=finished, finish_reason="length" if finished else "",
                                    logprobs=[logprob_to_proto(lp) for lp in lps])


def test_gateway_trim_and_split_keep_logprobs_with_their_tokens() -> None:
    trimmed = _trim(_batch(0, 4), 1)
    assert trimmed is not None and [m.token_id for m in trimmed.logprobs] == list(trimmed.token_ids) == [101, 102, 103]
    head, rest = _split(_batch(0, 4, finished=True), 3)
    assert [m.token_id for m in head.logprobs] == list(head.token_ids) == [100, 101, 102]
    assert rest is not None and [m.token_id for m in rest.logprobs] == list(rest.token_ids) == [103]
    info = logprobs_from_proto(_batch(0, 1).logprobs)
    assert info == [TokenLogprobInfo(token_id=100, logprob=-0.5, rank=1, top=[(1, -0.25)])]


def test_active_request_deltas_and_outcome_carry_logprobs() -> None:
    from gateway.generation import ActiveRequest, Prepared

    class Client:
        async def watch(self, rid: str, start: int):
            for b in (_batch(0, 2), _batch(2, 1, finished=True)):
                yield b

        def cancel_in_background(self, rid: str) -> None:
            raise AssertionError("finished requests are not cancelled")

    prepared = Prepared(submit=scheduler_pb2.SubmitRequest(request_id="r", prompt_token_ids=[1, 2]),
                        text_output=False, arrival_s=0.5)
    active = ActiveRequest(prepared=prepared, slo=common_pb2.SLOSpec(), client=Client(),  # type: ignore[arg-type]
                           tokenizer=None, tbt_tolerance=0.0)  # type: ignore[arg-type]

    async def scenario() -> list:
        return [d async for d in active.deltas()]

    deltas = asyncio.run(scenario())
    for d in deltas:
        assert [lp.token_id for lp in d.logprobs] == d.token_ids
    outcome = active.outcome()
    assert [lp.token_id for lp in outcome.logprobs] == outcome.output_ids == [100, 101, 102]
    assert outcome.logprobs[1] == TokenLogprobInfo(101, -1.0, 2, [(1, -0.25)])
