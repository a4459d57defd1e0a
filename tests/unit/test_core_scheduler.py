"""SchedulerCore lifecycle, chunking, stops, cancellation and preemption, driven with the vLLM
policy on a small hand-made profile (block size 16) so every block id can be predicted."""

from __future__ import annotations

import random

import pytest

from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.policies.vllm_fcfs import VLLMConfig, VLLMPolicy
from accelgen.core.profile import CostCoefficients, DeviceProfile
from accelgen.core.request import FinishReason, Request, RequestStatus, SamplingParams
from accelgen.core.scheduler import CoreConfig, SchedulerCore
from accelgen.core.slo import SLO, SLOCatalog

pytestmark = pytest.mark.unit

EOS = 2
BS = 16


def small_profile(kv_blocks: int = 32, max_model_len: int = 256) -> DeviceProfile:
    return DeviceProfile(
        name="small",
        coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1),
        kv_capacity_tokens=BS * kv_blocks,
        block_size=BS,
        max_model_len=max_model_len,
        knee_search_max_tokens=1024,
    )


def make_core(budget: int = 64, kv_blocks: int = 32, max_model_len: int = 256, max_num_seqs: int = 256) -> SchedulerCore:
    profile = small_profile(kv_blocks, max_model_len)
    policy = VLLMPolicy(profile, SLOCatalog(), VLLMConfig(max_num_batched_tokens=budget))
    return SchedulerCore(policy, profile, config=CoreConfig(max_num_seqs=max_num_seqs))


def req(rid: str, prompt: int, max_tokens: int = 16, arrival: float = 0.0, **sp) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=[7] * prompt,
        sampling=SamplingParams(max_tokens=max_tokens, **sp),
        slo=SLO(ttft_s=1.0, tbt_s=0.1),
        app_class="chat",
        arrival_s=arrival,
        eos_token_id=EOS,
    )


def result_for(plan: BatchPlan, tokens: dict[str, int] | None = None, default: int = 5) -> IterationResult:
    tokens = tokens or {}
    sampled = {c.request_id: tokens.get(c.request_id, default) for c in plan.chunks if c.samples}
    return IterationResult(iteration=plan.iteration, sampled_token_ids=sampled, elapsed_s=0.01)


def check_kv(core: SchedulerCore) -> None:
    """KV invariants, checked through check_invariants() and independently."""
    kv = core.kv
    kv.check_invariants()
    owners = kv.owners()
    owned = [b for t in owners.values() for b in t]
    assert len(owned) == len(set(owned)) and 0 not in owned
    assert len(owned) + kv.num_free_blocks == kv.total_usable_blocks
    # Only running requests hold blocks, and each holds enough for what it has computed.
    holders = {rid for rid, t in owners.items() if t}
    assert holders <= {r.request_id for r in core.running}
    for r in core.running:
        assert len(owners.get(r.request_id, [])) * BS >= r.num_computed_tokens
    for r in core.requests.values():
        if r.status is not RequestStatus.RUNNING:
            assert not owners.get(r.request_id)


def mirror_on_worker(worker: dict[str, list[int]], plan: BatchPlan, core: SchedulerCore) -> None:
    """Apply a plan as a worker would (forget freed ids, take full tables of new requests, append
    new blocks of known ones) and check that its tables match the scheduler's."""
    for rid in plan.freed_request_ids:
        worker.pop(rid, None)
    for c in plan.chunks:
        if c.is_new:
            assert c.request_id not in worker
            assert c.block_table[len(c.block_table) - len(c.new_block_ids):] == c.new_block_ids
            worker[c.request_id] = list(c.block_table)
        else:
            assert c.request_id in worker
            worker[c.request_id].extend(c.new_block_ids)
        assert worker[c.request_id] == core.kv.block_table(c.request_id)
        assert len(worker[c.request_id]) * BS >= c.num_computed_tokens + c.num_new_tokens


def run_step(core: SchedulerCore, now: float, tokens: dict[str, int] | None = None):
    plan = core.step(now)
    check_kv(core)
    outcome = core.complete(plan, result_for(plan, tokens), now + 0.01)
    check_kv(core)
    return plan, outcome


# -- lifecycle ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_waiting_running_finished_lifecycle() -> None:
    core = make_core()
    a = req("a", prompt=10, max_tokens=3)
    core.add_request(a)
    assert a.status is RequestStatus.WAITING and "a" in core.waiting and core.has_work()

    plan1 = core.step(0.0)
    assert a.status is RequestStatus.RUNNING and core.running == [a] and "a" not in core.waiting
    assert plan1.iteration == 1
    [c] = plan1.chunks
    # Whole 10-token prompt in one chunk: one 16-token block, the first free id (1).
    assert (c.request_id, c.num_computed_tokens, c.num_new_tokens) == ("a", 0, 10)
    assert c.new_block_ids == (1,) and c.block_table == (1,)
    assert c.is_new and c.samples and not c.is_decode
    out = core.complete(plan1, result_for(plan1, {"a": 11}), 0.1)
    assert [(t.request_id, t.token_id, t.index, t.time_s) for t in out.tokens] == [("a", 11, 0, 0.1)]
    assert a.num_computed_tokens == 10 and a.output_token_ids == [11]
    assert a.first_token_s == 0.1 and a.last_token_s == 0.1 and not out.finished

    plan2 = core.step(0.1)
    [c] = plan2.chunks
    # Decode: the sampled token (index 10) runs; it fits in block 1. The worker has the table
    # already: only appended blocks travel ("full data once, then diffs").
    assert (c.num_computed_tokens, c.num_new_tokens, c.new_block_ids, c.block_table) == (10, 1, (), ())
    assert core.kv.block_table("a") == [1]
    assert not c.is_new and c.samples and c.is_decode
    core.complete(plan2, result_for(plan2, {"a": 12}), 0.2)

    plan3 = core.step(0.2)
    out = core.complete(plan3, result_for(plan3, {"a": 13}), 0.3)
    # max_tokens = 3 reached.
    assert out.finished == [a]
    assert a.status is RequestStatus.FINISHED and a.finish_reason is FinishReason.LENGTH
    assert a.finish_s == 0.3 and a.output_token_ids == [11, 12, 13]
    assert core.kv.num_used_blocks == 0 and core.running == [] and not core.has_work()
    assert core.num_unfinished == 0

    plan4 = core.step(0.3)
    assert plan4.is_empty and plan4.freed_request_ids == ["a"]
    assert core.step(0.4).freed_request_ids == []  # told once

    core.forget("a")
    assert "a" not in core.requests


@pytest.mark.unit
def test_decode_opens_a_new_block_at_the_boundary() -> None:
    core = make_core()
    a = req("a", prompt=15, max_tokens=10)
    core.add_request(a)
    p1, _ = run_step(core, 0.0)
    assert p1.chunks[0].block_table == (1,)
    # Decode of token index 15: 16 slots -> still one block.
    p2, _ = run_step(core, 0.1)
    assert (p2.chunks[0].num_computed_tokens, p2.chunks[0].new_block_ids) == (15, ())
    # Decode of token index 16: 17 slots -> a second block.
    p3, _ = run_step(core, 0.2)
    assert (p3.chunks[0].num_computed_tokens, p3.chunks[0].new_block_ids) == (16, (2,))
    assert core.kv.block_table("a") == [1, 2]


@pytest.mark.unit
def test_eos_stops_with_stop_reason() -> None:
    core = make_core()
    a = req("a", prompt=10, max_tokens=50)
    core.add_request(a)
    run_step(core, 0.0, {"a": 9})
    _, out = run_step(core, 0.1, {"a": EOS})
    assert out.finished == [a] and a.finish_reason is FinishReason.STOP
    assert a.output_token_ids == [9, EOS]
    assert core.kv.num_used_blocks == 0


@pytest.mark.unit
def test_stop_token_ids_and_ignore_eos() -> None:
    core = make_core()
    a = req("a", prompt=10, max_tokens=50, stop_token_ids=(42,))
    b = req("b", prompt=10, max_tokens=2, ignore_eos=True)
    core.add_request(a)
    core.add_request(b)
    _, out = run_step(core, 0.0, {"a": 42, "b": EOS})
    assert out.finished == [a] and a.finish_reason is FinishReason.STOP
    assert b.status is RequestStatus.RUNNING  # EOS ignored
    _, out = run_step(core, 0.1, {"b": EOS})
    assert out.finished == [b] and b.finish_reason is FinishReason.LENGTH


@pytest.mark.unit
def test_model_context_stops_with_length() -> None:
    core = make_core(max_model_len=64)
    a = req("a", prompt=60, max_tokens=100)
    core.add_request(a)
    n = 0
    while a.status is RequestStatus.RUNNING or a.status is RequestStatus.WAITING:
        run_step(core, 0.1 * n)
        n += 1
        assert n < 20
    # 60 + 4 = 64 tokens fill the context.
    assert a.finish_reason is FinishReason.LENGTH and a.num_output_tokens == 4 and a.num_tokens == 64


@pytest.mark.unit
def test_add_request_validation() -> None:
    core = make_core(max_model_len=64)
    core.add_request(req("a", prompt=63))  # one token of room left: accepted
    with pytest.raises(ValueError):
        core.add_request(req("a", prompt=5))  # duplicate id
    with pytest.raises(ValueError):
        core.add_request(req("b", prompt=64))  # prompt == max_model_len
    with pytest.raises(ValueError):
        core.add_request(req("c", prompt=100))
    assert set(core.requests) == {"a"} and len(core.waiting) == 1


# -- chunked prefill ---------------------------------------------------------------------------


@pytest.mark.unit
def test_long_prompt_chunked_to_the_budget() -> None:
    core = make_core(budget=32)
    a = req("a", prompt=80, max_tokens=4)
    core.add_request(a)
    expected = [
        # (computed before, new, is_new, samples, new block ids): 32 tokens = 2 blocks per chunk.
        (0, 32, True, False, (1, 2)),
        (32, 32, False, False, (3, 4)),
        (64, 16, False, True, (5,)),
    ]
    for i, (k, q, new, samples, blocks) in enumerate(expected):
        plan, out = run_step(core, 0.1 * i)
        assert plan.token_budget == 32 and plan.num_tokens == q
        [c] = plan.chunks
        assert (c.num_computed_tokens, c.num_new_tokens, c.is_new, c.samples, c.new_block_ids) == (k, q, new, samples, blocks)
        assert a.num_computed_tokens == k + q
        assert [t.request_id for t in out.tokens] == (["a"] if samples else [])
    assert a.num_output_tokens == 1 and a.first_token_s == pytest.approx(0.21)
    assert a.num_computed_tokens == 80
    plan, _ = run_step(core, 0.3)
    assert plan.chunks[0].is_decode and plan.chunks[0].num_computed_tokens == 80


@pytest.mark.unit
def test_running_requests_share_the_budget_and_new_ones_wait() -> None:
    core = make_core(budget=32)
    a = req("a", prompt=20, max_tokens=10, arrival=0.0)
    b = req("b", prompt=20, max_tokens=10, arrival=0.1)
    core.add_request(a)
    core.add_request(b)
    plan, _ = run_step(core, 0.0)
    # a takes 20 tokens, b the 12 left (a chunk that does not sample).
    assert [(c.request_id, c.num_new_tokens, c.samples) for c in plan.chunks] == [("a", 20, True), ("b", 12, False)]
    plan, _ = run_step(core, 0.1)
    assert [(c.request_id, c.num_computed_tokens, c.num_new_tokens, c.is_new) for c in plan.chunks] == [
        ("a", 20, 1, False), ("b", 12, 8, False)]  # fmt: skip


@pytest.mark.unit
def test_max_num_seqs_limits_admission() -> None:
    core = make_core(max_num_seqs=2)
    for i in range(3):
        core.add_request(req(f"r{i}", prompt=4, arrival=0.01 * i))
    plan, _ = run_step(core, 0.0)
    assert plan.request_ids() == ["r0", "r1"] and len(core.waiting) == 1


# -- freeing and cancellation ------------------------------------------------------------------


@pytest.mark.unit
def test_finished_ids_reach_the_next_plan_with_other_work() -> None:
    core = make_core()
    a = req("a", prompt=10, max_tokens=1)
    b = req("b", prompt=10, max_tokens=5)
    core.add_request(a)
    core.add_request(b)
    _, out = run_step(core, 0.0)
    assert out.finished == [a]
    plan, _ = run_step(core, 0.1)
    assert plan.freed_request_ids == ["a"] and plan.request_ids() == ["b"]


@pytest.mark.unit
def test_cancel_waiting_request() -> None:
    core = make_core(budget=16)
    a = req("a", prompt=16, arrival=0.0)
    b = req("b", prompt=16, arrival=0.1)
    core.add_request(a)
    core.add_request(b)
    run_step(core, 0.0)  # a takes the whole budget, b waits
    assert b.status is RequestStatus.WAITING
    assert core.cancel("b", 0.05)
    assert b.status is RequestStatus.CANCELLED and b.finish_reason is FinishReason.CANCELLED and b.finish_s == 0.05
    assert "b" not in core.waiting and core.num_unfinished == 1
    plan, _ = run_step(core, 0.1)
    # The worker never saw b: nothing to free.
    assert plan.freed_request_ids == [] and plan.request_ids() == ["a"]
    assert not core.cancel("b", 0.2)  # already done
    assert not core.cancel("nope", 0.2)


@pytest.mark.unit
def test_cancel_running_request_frees_blocks_and_ignores_its_inflight_result() -> None:
    core = make_core()
    a = req("a", prompt=40, max_tokens=10)  # 3 blocks
    core.add_request(a)
    run_step(core, 0.0)
    assert core.kv.num_blocks_of("a") == 3
    plan = core.step(0.1)  # a decode in flight ...
    assert core.cancel("a", 0.105)  # ... when the client cancels
    assert core.kv.num_used_blocks == 0 and core.running == []
    check_kv(core)
    out = core.complete(plan, result_for(plan), 0.11)
    assert out.tokens == [] and a.num_output_tokens == 1  # the in-flight token is dropped
    assert a.status is RequestStatus.CANCELLED and a.finish_reason is FinishReason.CANCELLED
    nxt = core.step(0.2)
    assert nxt.freed_request_ids == ["a"] and nxt.is_empty


@pytest.mark.unit
def test_completing_without_a_sampled_token_is_an_error() -> None:
    core = make_core()
    core.add_request(req("a", prompt=4))
    plan = core.step(0.0)
    with pytest.raises(ValueError):
        core.complete(plan, IterationResult(plan.iteration, {}, 0.01), 0.01)


# -- preemption ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_preemption_newest_running_is_the_victim() -> None:
    core = make_core(budget=96, kv_blocks=6)
    reqs = [req(n, prompt=32, max_tokens=10, arrival=0.01 * i) for i, n in enumerate("abc")]
    for r in reqs:
        core.add_request(r)
    plan, _ = run_step(core, 0.0)
    # 3 x 2 blocks fill the 6-block pool.
    assert plan.request_ids() == ["a", "b", "c"] and core.kv.num_free_blocks == 0
    a, b, c = reqs
    c_blocks = core.kv.block_table("c")
    plan, _ = run_step(core, 0.1)
    # a's decode needs a third block: c (admitted last) is recomputed; its 2 blocks go to a and b.
    assert plan.preempted_request_ids == ["c"] and plan.freed_request_ids == ["c"]
    assert plan.request_ids() == ["a", "b"]
    assert set(core.kv.block_table("a")[2:] + core.kv.block_table("b")[2:]) == set(c_blocks)
    assert c.status is RequestStatus.PREEMPTED and c.num_preemptions == 1 and c.num_computed_tokens == 0
    assert c.output_token_ids == [5]  # generated tokens are kept and recomputed
    assert core.running == [a, b] and core.waiting.head(1) == [c]
    assert a.num_preemptions == b.num_preemptions == 0


@pytest.mark.unit
def test_preempted_request_requeued_at_front_and_recomputed() -> None:
    core = make_core(budget=64, kv_blocks=4)
    a = req("a", prompt=32, max_tokens=2, arrival=0.0)
    b = req("b", prompt=32, max_tokens=4, arrival=0.02)
    core.add_request(a)
    core.add_request(b)
    plan, _ = run_step(core, 0.0, {"a": 5, "b": 6})
    assert plan.request_ids() == ["a", "b"] and core.kv.num_free_blocks == 0

    # c arrived before b but is added only now: FCFS would put it ahead of b...
    c = req("c", prompt=16, max_tokens=4, arrival=0.01)
    core.add_request(c)
    plan = core.step(0.1)
    check_kv(core)
    # a needs a third block: b (newest running) is preempted and its blocks freed; no admission
    # happens in an iteration that preempted.
    assert plan.preempted_request_ids == ["b"] and plan.freed_request_ids == ["b"]
    assert plan.request_ids() == ["a"]
    assert plan.chunks[0].new_block_ids == (3,)  # the first of b's blocks (3, 4)
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and core.kv.num_blocks_of("b") == 0
    assert core.kv.num_free_blocks == 1
    # ... but a preempted request goes back to the front of the queue.
    assert core.waiting.head(2) == [b, c]
    out = core.complete(plan, result_for(plan, {"a": 7}), 0.11)
    assert out.finished == [a]  # max_tokens = 2
    check_kv(core)

    plan, _ = run_step(core, 0.2, {"b": 8, "c": 9})
    assert plan.freed_request_ids == ["a"]
    cb, cc = plan.chunks
    # b is recomputed from scratch: prompt + its one generated token = 33 tokens = 3 blocks.
    assert (cb.request_id, cb.num_computed_tokens, cb.num_new_tokens, cb.is_new, cb.samples) == ("b", 0, 33, True, True)
    assert len(cb.block_table) == 3 and len(cb.new_block_ids) == 3
    assert (cc.request_id, cc.num_new_tokens, cc.is_new) == ("c", 16, True)
    assert b.output_token_ids == [6, 8] and b.num_computed_tokens == 33


@pytest.mark.unit
def test_preempted_request_can_be_cancelled() -> None:
    core = make_core(budget=96, kv_blocks=6)
    for i, n in enumerate("abc"):
        core.add_request(req(n, prompt=32, arrival=0.01 * i))
    run_step(core, 0.0)
    run_step(core, 0.1)
    c = core.requests["c"]
    assert c.status is RequestStatus.PREEMPTED
    assert core.cancel("c", 0.2)
    assert c.status is RequestStatus.CANCELLED and "c" not in core.waiting
    plan, _ = run_step(core, 0.3)
    assert "c" not in plan.freed_request_ids  # the worker already forgot it at preemption


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(8))
def test_random_load_on_a_tight_cache_keeps_invariants_and_finishes(seed: int) -> None:
    """Random prompts and lengths on an 8-block cache: every request ends with exactly the
    tokens it was meant to produce, and the KV tables are consistent after every step."""
    rng = random.Random(seed)
    core = make_core(budget=48, kv_blocks=8, max_model_len=128)
    lengths = {}
    for i in range(12):
        prompt = rng.randint(1, 100)
        out_len = rng.randint(1, 128 - prompt)
        lengths[f"r{i}"] = out_len
        core.add_request(req(f"r{i}", prompt=prompt, max_tokens=200, arrival=rng.random()))
    now, steps = 0.0, 0
    worker: dict[str, list[int]] = {}  # the worker's copy of the block tables, rebuilt from plans
    while core.has_work():
        plan = core.step(now)
        check_kv(core)
        mirror_on_worker(worker, plan, core)
        assert plan.num_tokens <= 48
        assert not plan.is_empty, "stuck: work left but nothing scheduled"
        tokens = {}
        for c in plan.chunks:
            if c.samples:
                r = core.requests[c.request_id]
                tokens[c.request_id] = EOS if r.num_output_tokens + 1 >= lengths[c.request_id] else 100
        now += 0.01
        core.complete(plan, result_for(plan, tokens), now)
        check_kv(core)
        steps += 1
        assert steps < 20000
    for rid, n in lengths.items():
        r = core.requests[rid]
        assert r.status is RequestStatus.FINISHED
        assert r.num_output_tokens == n
        expected = FinishReason.STOP if r.output_token_ids[-1] == EOS else FinishReason.LENGTH
        assert r.finish_reason is expected
    assert core.kv.num_used_blocks == 0


# -- the batch builder's time limit --------------------------------------------------------------


def _partially_prefilled(limit_s: float):
    from accelgen.core.batch_builder import BatchBuilder

    p = DeviceProfile(
        name="attn",
        coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1, attn_ms=0.01, decode_ctx_ms=0.01),
        kv_capacity_tokens=BS * 200,
        block_size=BS,
        max_model_len=4096,
        knee_search_max_tokens=1024,
    )
    core = SchedulerCore(VLLMPolicy(p, SLOCatalog(), VLLMConfig(max_num_batched_tokens=1000)), p)
    r = req("r", prompt=2000, max_tokens=10)
    core.add_request(r)
    plan = core.step(0.0)
    core.complete(plan, result_for(plan), 0.1)
    assert r.num_computed_tokens == 1000 and r.status is RequestStatus.RUNNING
    builder = BatchBuilder(core, 0.1)
    builder.set_budget(500, 0.05, limit_s)
    return builder, r


@pytest.mark.unit
def test_time_limit_shrinks_a_prefill_chunk() -> None:
    # Chunk of q over k = 1000: 10 + 0.1 q + 0.01 q (q + 2000) ms. Within 60 ms:
    # 0.01 q^2 + 20.1 q <= 50 -> q = 2 (40.24 ms; q = 3 gives 70.39 ms).
    builder, r = _partially_prefilled(0.060)
    assert builder.schedule(r) == 2
    assert builder.cost.time_s() == pytest.approx(0.05024)


@pytest.mark.unit
def test_time_limit_is_never_exceeded_by_a_scheduled_chunk() -> None:
    # Within 10.5 ms nothing over k = 1000 fits: one token costs 10.1 + 0.01 * 1001 = 20.11 ms.
    builder, r = _partially_prefilled(0.0105)
    n = builder.schedule(r)
    assert n == 0 or builder.cost.time_s() <= 0.0105, (n, builder.cost.time_s())
