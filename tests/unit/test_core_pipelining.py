"""Pipelined plans (``SchedulerCore.dispatch``): plan k+1 is decided while plan k runs.

Every plan crosses the real converters (``scheduler_service.convert`` -> ``worker_service.convert``)
into the sim executor, whose request table refuses what a vLLM worker would (unknown requests,
decodes of tokens it never sampled, blocks it does not hold, sampling where vLLM would not), and
whose tokens are a function of (request, output index): the right outputs are known exactly, so
a pipelined run must deliver precisely the tokens, stops and finish reasons of a run that waits
for each result before deciding the next plan.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from dataclasses import dataclass, field

import pytest

from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.policies.accelgen import AccelGenPolicy
from accelgen.core.policies.vllm_fcfs import VLLMConfig, VLLMPolicy
from accelgen.core.profile import CostCoefficients, DeviceProfile
from accelgen.core.request import PENDING_TOKEN, FinishReason, Request, RequestStatus, SamplingParams
from accelgen.core.scheduler import CoreConfig, SchedulerCore
from accelgen.core.slo import SLO, SLOCatalog
from scheduler_service.convert import plan_to_proto
from worker_service.convert import plan_from_proto
from worker_service.executors.sim import SimExecutor, sim_token

pytestmark = pytest.mark.unit

BS = 16


def profile(kv_blocks: int, max_model_len: int = 1024) -> DeviceProfile:
    return DeviceProfile(name="small", coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1),
                         kv_capacity_tokens=BS * kv_blocks, block_size=BS, max_model_len=max_model_len,
                         knee_search_max_tokens=1024)


def make_core(kv_blocks: int = 64, budget: int = 64, policy: str = "vllm") -> SchedulerCore:
    prof = profile(kv_blocks)
    if policy == "vllm":
        pol = VLLMPolicy(prof, SLOCatalog(), VLLMConfig(max_num_batched_tokens=budget))
    else:
        pol = AccelGenPolicy(prof, SLOCatalog())
    return SchedulerCore(pol, prof, config=CoreConfig(max_num_seqs=64))


def req(rid: str, prompt: int, max_tokens: int, **sp) -> Request:
    return Request(request_id=rid, prompt_token_ids=[7 + i % 50 for i in range(prompt)],
                   sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sp),
                   slo=SLO(ttft_s=5.0, tbt_s=1.0), app_class="chat", arrival_s=0.0, eos_token_id=2)


@dataclass
class Run:
    """What a driven core delivered, and what crossed the wire."""

    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    reasons: dict[str, str] = field(default_factory=dict)
    chunks_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sampled_inputs: int = 0
    most_in_flight: int = 0
    plans: int = 0


class Driver:
    """A lane without gRPC: up to ``depth`` plans in flight, results applied in order; the
    worker runs each plan when its result is awaited (in order, as the worker's thread does)."""

    def __init__(self, core: SchedulerCore, depth: int, kv_blocks: int = 64) -> None:
        self.core = core
        self.depth = depth
        self.worker = SimExecutor(profile(kv_blocks), time_scale=0)
        self.in_flight: deque[tuple[BatchPlan, object]] = deque()
        self.run = Run()
        self.now = 0.0
        # Outputs a request had before this driver (one adopted from a lost worker).
        self.before = {rid: r.num_output_tokens for rid, r in core.requests.items()}

    def send(self) -> bool:
        core = self.core
        if len(self.in_flight) >= self.depth or not (core.has_work() or core.has_ids_to_free):
            return False
        plan = core.step(self.now)
        if plan.is_empty and not plan.freed_request_ids:
            return False
        msg = plan_to_proto(plan, core.requests, "e1")
        if self.depth > 1:
            core.dispatch(plan)
        for c in msg.chunks:
            self.run.chunks_sent[c.request_id] += 1
            self.run.sampled_inputs += c.sampled_input
        self.in_flight.append((plan, msg))
        self.run.plans += 1
        self.run.most_in_flight = max(self.run.most_in_flight, len(self.in_flight))
        return True

    def receive(self) -> None:
        plan, msg = self.in_flight.popleft()
        result = self.worker.execute(plan_from_proto(msg))
        self.now += 0.01
        outcome = self.core.complete(plan, IterationResult(plan.iteration, result.sampled_token_ids, 0.01), self.now)
        for ev in outcome.tokens:
            before = self.before.get(ev.request_id, 0)
            assert ev.index == before + len(self.run.tokens[ev.request_id]), "tokens are delivered once, in order"
            self.run.tokens[ev.request_id].append(ev.token_id)
        for r in outcome.finished:
            self.run.reasons[r.request_id] = r.finish_reason.value
        self.core.kv.check_invariants()

    def cycle(self) -> bool:
        """Fill the pipeline, then apply the oldest result; False once nothing is left."""
        while self.send():
            pass
        if not self.in_flight:
            return False
        self.receive()
        return True

    def drain(self, limit: int = 20_000) -> Run:
        for _ in range(limit):
            if not self.cycle():
                assert not self.core.has_work(), "work left but nothing could be planned"
                return self.run
        raise AssertionError("did not finish")


def drive(requests: list[Request], depth: int, kv_blocks: int = 64, policy: str = "vllm", budget: int = 64) -> Run:
    core = make_core(kv_blocks, budget, policy)
    for r in requests:
        core.add_request(r)
    run = Driver(core, depth, kv_blocks).drain()
    assert core.kv.num_used_blocks == 0 and not core.on_worker - {r.request_id for r in requests}
    return run


def workload(seed: int, n: int = 24) -> list[Request]:
    rng = random.Random(seed)
    return [req(f"r{i}", rng.choice([3, 17, 40, 150, 400]), rng.randint(1, 40)) for i in range(n)]


@pytest.mark.parametrize("policy", ["vllm", "accelgen"])
def test_pipelined_outputs_are_the_unpipelined_ones(policy: str) -> None:
    sequential = drive(workload(1), depth=1, policy=policy)
    pipelined = drive(workload(1), depth=2, policy=policy)
    assert pipelined.most_in_flight == 2 and pipelined.sampled_inputs > 0  # it did pipeline
    assert sequential.most_in_flight == 1 and sequential.sampled_inputs == 0
    for r in workload(1):
        expected = [sim_token(r.request_id, i) for i in range(r.sampling.max_tokens)]
        assert pipelined.tokens[r.request_id] == sequential.tokens[r.request_id] == expected
        assert pipelined.reasons[r.request_id] == sequential.reasons[r.request_id] == "length"


def test_a_request_is_never_run_past_max_tokens_and_long_prompts_are_chunked() -> None:
    requests = [req("long", 400, 5), req("short", 3, 1), req("mid", 40, 12)]
    run = drive(requests, depth=2, budget=64)
    # The long prompt in chunks of at most the budget, then one decode per further token;
    # nothing is planned once the tokens in flight reach max_tokens.
    assert run.chunks_sent["long"] == -(-400 // 64) + 4
    assert run.chunks_sent["short"] == 1
    assert run.tokens["long"] == [sim_token("long", i) for i in range(5)]


def test_a_stop_mid_pipeline_discards_the_token_already_planned() -> None:
    stop_at = 5
    stopper = req("s", 20, 50, stop_token_ids=(sim_token("s", stop_at),))
    run = drive([stopper, req("other", 20, 30)], depth=2)
    assert run.tokens["s"] == [sim_token("s", i) for i in range(stop_at + 1)]
    assert run.reasons["s"] == FinishReason.STOP.value
    # Its next decode was already on the wire when the stop was learnt: run, never delivered.
    assert run.chunks_sent["s"] == stop_at + 2
    assert run.tokens["other"] == [sim_token("other", i) for i in range(30)]


def test_preemption_under_the_lag_recomputes_to_the_same_outputs() -> None:
    # 12 blocks of 16 for 4 requests that each grow to 5-6 blocks: recompute preemptions.
    requests = [req(f"p{i}", 30, 60) for i in range(4)]
    core = make_core(kv_blocks=12)
    for r in requests:
        core.add_request(r)
    driver = Driver(core, depth=2, kv_blocks=12)
    run = driver.drain()
    assert sum(r.num_preemptions for r in requests) > 0
    for r in requests:
        assert run.tokens[r.request_id] == [sim_token(r.request_id, i) for i in range(60)]
        assert r.output_token_ids == run.tokens[r.request_id] and r.num_pending_outputs == 0


def two_plans_in_flight(requests: list[Request], cycles: int) -> tuple[SchedulerCore, Driver]:
    """A pipelined core after ``cycles`` results, with two plans sent and not yet answered."""
    core = make_core()
    for r in requests:
        core.add_request(r)
    driver = Driver(core, depth=2)
    for _ in range(cycles):
        driver.cycle()
    while driver.send():
        pass
    assert len(driver.in_flight) == 2
    return core, driver


def test_a_cancel_with_two_plans_in_flight_delivers_nothing_more_and_frees_everything() -> None:
    victim, other = req("c", 20, 100), req("o", 20, 30)
    core, driver = two_plans_in_flight([victim, other], cycles=5)
    assert victim.num_pending_outputs == 2
    delivered = list(driver.run.tokens["c"])
    assert core.cancel("c", driver.now)
    assert victim.output_token_ids == delivered and PENDING_TOKEN not in victim.output_token_ids
    assert core.kv.num_blocks_of("c") == 0
    run = driver.drain()
    assert run.tokens["c"] == delivered  # the two results in flight are dropped
    assert "c" not in driver.worker.requests  # a later plan told the worker to forget it
    assert run.tokens["o"] == [sim_token("o", i) for i in range(30)]


def test_a_worker_lost_with_two_plans_in_flight_hands_back_requests_without_placeholders() -> None:
    requests = [req("a", 30, 40), req("b", 200, 20)]
    core, driver = two_plans_in_flight(requests, cycles=6)
    delivered = {rid: list(t) for rid, t in driver.run.tokens.items()}
    moved = core.release_unfinished()  # the worker died: both plans' tokens are lost
    assert {r.request_id for r in moved} == {"a", "b"}
    for r in moved:
        assert r.output_token_ids == delivered.get(r.request_id, []) and r.num_pending_outputs == 0
    survivor = make_core()
    for r in moved:
        survivor.adopt(r)
    rest = Driver(survivor, depth=2).drain()
    for r in requests:
        tokens = delivered.get(r.request_id, []) + rest.tokens[r.request_id]
        assert tokens == [sim_token(r.request_id, i) for i in range(r.sampling.max_tokens)]


def test_an_unpipelined_core_never_holds_placeholders() -> None:
    core = make_core()
    core.add_request(req("x", 10, 3))
    plan = core.step(0.0)
    msg = plan_to_proto(plan, core.requests, "e1")
    assert core.requests["x"].output_token_ids == [] and not plan.dispatched
    assert msg.chunks[0].num_output_tokens == 0 and list(msg.chunks[0].token_ids) == core.requests["x"].prompt_token_ids
    assert core.requests["x"].status is RequestStatus.RUNNING


def test_take_unstarted_leaves_what_plans_in_flight_name_and_loses_nothing() -> None:
    """A drain moves the requests its worker never started; those in the two plans in flight
    (one mid-prefill, sampling nothing yet) stay, and both sides finish with their exact outputs."""
    prof = profile(64)
    core = SchedulerCore(VLLMPolicy(prof, SLOCatalog(), VLLMConfig(max_num_batched_tokens=64)), prof,
                         config=CoreConfig(max_num_seqs=2))
    a, b, c, d = req("a", 20, 30), req("b", 200, 20), req("c", 20, 10), req("d", 30, 10)
    for r in (a, b, c, d):
        core.add_request(r)
    driver = Driver(core, depth=2)
    while driver.send():
        pass
    assert len(driver.in_flight) == 2 and b.num_pending_outputs == 0 < b.num_computed_tokens  # b mid-prefill
    assert core.take_unstarted() == [c, d]
    assert set(core.requests) == {"a", "b"} and len(core.waiting) == 0 and core.take_unstarted() == []
    assert driver.drain().tokens == {r.request_id: [sim_token(r.request_id, i) for i in range(r.sampling.max_tokens)]
                                     for r in (a, b)}
    other = make_core()
    for r in (c, d):
        other.add_request(r)  # as routing places a new request: nothing to recompute
    rest = Driver(other, depth=2).drain()
    assert rest.tokens == {r.request_id: [sim_token(r.request_id, i) for i in range(10)] for r in (c, d)}


def test_take_unstarted_keeps_a_request_with_outputs() -> None:
    core = make_core()
    resumed, fresh = req("r", 20, 10), req("f", 20, 10)
    resumed.output_token_ids = [5, 6]  # ran on a lost worker: adopted, to be recomputed here
    core.adopt(resumed)
    core.adopt(fresh)  # adopted with nothing produced: as good as new
    assert core.take_unstarted() == [fresh]
    assert list(core.waiting) == [resumed] and set(core.requests) == {"r"}
