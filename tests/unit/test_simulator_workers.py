"""The simulator with N workers (lanes) and the routers that spread requests over them.

With one worker the simulator must give exactly what it gave before lanes existed: the
single-lane algorithm is kept below, verbatim, as the reference.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Sequence

import pytest

from bench.simulator import CostModelExecutor, SimConfig, SimResult, make_request, simulate
from bench.workloads import WorkloadRequest
from accelgen.core.budget import TokenBudget
from accelgen.core.policies.accelgen import AccelGenConfig
from accelgen.core.metrics import IterationSample, MetricsCollector
from accelgen.core.policies.registry import POLICY_NAMES, make_policy
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request, SamplingParams
from accelgen.core.routing import (LeastWorkRouter, SLOAwareRouter, lane_work, make_router)
from accelgen.core.scheduler import SchedulerCore
from accelgen.core.slo import SLOCatalog
from accelgen.profiles import load_profile

pytestmark = pytest.mark.unit

# The reference loop below adds arrivals between iterations, the lanes at their arrival time;
# with SLO-aware admission the two would decide on different queue states. Equivalence of the
# event loops is checked with admission off (admission has tests of its own).
_NO_ADMISSION = {"accelgen": AccelGenConfig(admission=False), "oracle": AccelGenConfig(admission=False)}


def reference_simulate(
    workload: Sequence[WorkloadRequest],
    profile: DeviceProfile,
    config: SimConfig,
    progress: Callable[[float], None] | None = None,
) -> SimResult:
    """bench.simulator.simulate as it was before workers/routing (commit bcef774), verbatim."""
    started = time.perf_counter()
    output_lengths = {w.request_id: w.output_len for w in workload}
    prompt_lengths = {w.request_id: w.prompt_len for w in workload}
    policy = make_policy(config.policy, profile, config.catalog, config=config.policy_config,
                         output_lengths=output_lengths)
    core = SchedulerCore(policy, profile, config=config.core)
    executor = CostModelExecutor(profile, output_lengths, prompt_lengths, config.time_noise, config.seed)
    metrics = MetricsCollector(profile.s_pf, tbt_tolerance=config.tbt_tolerance)
    items = sorted(workload, key=lambda w: (w.arrival_s, w.request_id))
    last_arrival = items[-1].arrival_s if items else 0.0
    stop_at = math.inf if config.drain_limit_s is None else last_arrival + config.drain_limit_s
    now, i, n = 0.0, 0, len(items)
    kv_total = core.kv.total_usable_blocks
    while now <= stop_at:
        while i < n and items[i].arrival_s <= now:
            item = items[i]
            core.add_request(make_request(item, config.catalog, profile.max_model_len))
            metrics.on_arrival(item.request_id, item.app_class, core.requests[item.request_id].slo,
                               item.arrival_s, item.prompt_len)
            i += 1
        t0 = time.perf_counter()
        plan = core.step(now)
        decision_s = time.perf_counter() - t0
        if plan.is_empty:
            if i >= n:
                if core.has_work():
                    raise RuntimeError(f"policy {config.policy!r} scheduled nothing with work left (stuck)")
                break
            now = max(now, items[i].arrival_s)
            continue
        result = executor.execute(plan)
        kv_used = core.kv.num_used_blocks
        start = now
        now += result.elapsed_s
        outcome = core.complete(plan, result, now)
        metrics.on_iteration(IterationSample(start, result.elapsed_s, plan.num_tokens, len(plan.chunks),
                                             kv_used, kv_total, decision_s, plan.predicted_time_s))
        for ev in outcome.tokens:
            metrics.on_token(ev.request_id, ev.time_s)
        for req in outcome.finished:
            metrics.on_finish(req.request_id, now, req.finish_reason.value if req.finish_reason else "", req.num_preemptions)
        if progress is not None:
            progress(now)
    for req in core.requests.values():  # preemption counts of unfinished requests too
        rec = metrics.requests[req.request_id]
        rec.num_preemptions = req.num_preemptions
    summary = metrics.summary()
    summary["policy"] = config.policy
    return SimResult(config.policy, summary, metrics, time.perf_counter() - started)


# -- workloads and helpers -----------------------------------------------------------------
CLASSES = ("chat", "code", "summarization", "batch")
WALL_CLOCK_KEYS = {"sched_ms_p50", "sched_ms_p99", "wall_s"}


def handmade(n: int, rate: float, seed: int = 0, long_every: int = 3) -> list[WorkloadRequest]:
    """Poisson arrivals; every ``long_every``-th prompt long (1100-1900 tokens), the rest short."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for k in range(n):
        t += rng.expovariate(rate)
        long = k % long_every == 0
        prompt = rng.randint(1100, 1900) if long else rng.randint(20, 400)
        out.append(WorkloadRequest(request_id=f"r{k:04d}", arrival_s=t, prompt_len=prompt,
                                   output_len=rng.randint(1, min(300, 2047 - prompt)),
                                   app_class=CLASSES[rng.randrange(len(CLASSES))], source="handmade",
                                   is_long=long))
    return out


@pytest.fixture(scope="module")
def profile() -> DeviceProfile:
    return load_profile("opt-13b_a100-80g")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _assert_identical(new: SimResult, ref: SimResult) -> None:
    keys = set(ref.summary) - WALL_CLOCK_KEYS
    assert set(new.summary) - WALL_CLOCK_KEYS == keys
    diff = {k: (new.summary[k], ref.summary[k]) for k in keys if not _same(new.summary[k], ref.summary[k])}
    assert not diff
    assert new.metrics.requests == ref.metrics.requests  # every token time, finish and preemption count
    strip = [(s.start_s, s.duration_s, s.forward_tokens, s.num_requests, s.kv_used_blocks, s.kv_total_blocks,
              s.predicted_s) for s in ref.metrics.iterations]
    assert [(s.start_s, s.duration_s, s.forward_tokens, s.num_requests, s.kv_used_blocks, s.kv_total_blocks,
             s.predicted_s) for s in new.metrics.iterations] == strip


def _request(rid: str, prompt: int, app_class: str) -> Request:
    return Request(request_id=rid, prompt_token_ids=[7] * prompt, sampling=SamplingParams(max_tokens=100),
                   slo=SLOCatalog().get(app_class).slo, app_class=app_class, arrival_s=0.0, eos_token_id=2)


def _core(profile: DeviceProfile, *requests: Request) -> SchedulerCore:
    core = SchedulerCore(make_policy("vllm", profile, SLOCatalog()), profile)
    for r in requests:
        core.add_request(r)
    return core


# -- one worker is the old simulator -----------------------------------------------------------
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_one_worker_is_identical_to_the_single_lane_simulator(profile: DeviceProfile, policy: str) -> None:
    workload = handmade(120, rate=6.0, seed=3)
    config = SimConfig(policy=policy, time_noise=0.1, seed=5, policy_config=_NO_ADMISSION.get(policy))
    ref = reference_simulate(workload, profile, config)
    assert ref.summary["iterations"] > 0 and ref.summary["num_finished"] == len(workload)
    _assert_identical(simulate(workload, profile, config), ref)


@pytest.mark.parametrize("routing", ["least-work", "slo-aware"])
def test_one_worker_is_identical_with_a_drain_limit_idle_gaps_and_preemptions(profile: DeviceProfile,
                                                                               routing: str) -> None:
    # Two bursts with an idle gap between them: requests arriving together (at 0 s, when the lane
    # first plans, and at 60 s, when it is idle), and a KV pool small enough to preempt.
    small = DeviceProfile(name="small-kv", coefficients=profile.coefficients, kv_capacity_tokens=8 * 1024,
                          block_size=profile.block_size, max_model_len=profile.max_model_len,
                          measured_forward_ms=profile.measured_forward_ms)
    burst = [WorkloadRequest(w.request_id, 0.0 if k < 5 else w.arrival_s, w.prompt_len, w.output_len, w.app_class,
                             w.source, w.is_long) for k, w in enumerate(handmade(40, rate=20.0, seed=1))]
    later = [WorkloadRequest(w.request_id + "b", 60.0, w.prompt_len, w.output_len, w.app_class,
                             w.source, w.is_long) for w in burst]
    workload = burst + later
    for policy in ("accelgen", "vllm"):
        for drain in (None, 3.0):
            config = SimConfig(policy=policy, drain_limit_s=drain, routing=routing,
                               policy_config=_NO_ADMISSION.get(policy))
            ref = reference_simulate(workload, small, config)
            if drain is None:
                assert ref.summary["preemptions"] > 0
            _assert_identical(simulate(workload, small, config), ref)


# -- N workers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["least-work", "slo-aware"])
def test_two_workers_finish_every_request_each_on_one_lane(profile: DeviceProfile, routing: str) -> None:
    workload = handmade(150, rate=10.0, seed=2)
    result = simulate(workload, profile, SimConfig(policy="accelgen", workers=2, routing=routing, time_noise=0.1))
    s = result.summary
    assert s["num_requests"] == s["num_finished"] == len(workload)
    assert s["output_tokens"] == sum(w.output_len for w in workload)
    assert len(result.cores) == 2
    owners: dict[str, list[int]] = {}
    for k, core in enumerate(result.cores):
        for rid in core.requests:
            owners.setdefault(rid, []).append(k)
        assert not core.has_work() and core.kv.num_used_blocks == 0
        core.kv.check_invariants()
    assert owners == {w.request_id: owners[w.request_id] for w in workload}  # every request, nothing else
    assert all(len(lanes) == 1 for lanes in owners.values())
    assert all(len(core.requests) >= 0.3 * len(workload) for core in result.cores)  # both lanes worked
    for w in workload:
        rec = result.metrics.requests[w.request_id]
        assert len(rec.token_times) == w.output_len and rec.token_times[0] > w.arrival_s
    # Each lane's iterations follow one another (a worker runs one iteration at a time).
    kv_total = result.cores[0].kv.total_usable_blocks
    assert all(it.kv_total_blocks == kv_total for it in result.metrics.iterations)
    assert sum(it.duration_s for it in result.metrics.iterations) > s["duration_s"]  # lanes overlapped


def test_two_workers_raise_the_throughput_of_a_saturated_one(profile: DeviceProfile) -> None:
    workload = handmade(150, rate=10.0, seed=2)
    one = simulate(workload, profile, SimConfig(policy="accelgen")).summary
    two = simulate(workload, profile, SimConfig(policy="accelgen", workers=2)).summary
    assert one["slo_attainment"] < 0.9  # one worker is overloaded at this rate
    assert two["throughput_tok_s"] > 1.4 * one["throughput_tok_s"]
    assert two["mean_jct_s"] < one["mean_jct_s"]


def test_lane_zero_of_many_uses_the_single_lane_seed(profile: DeviceProfile) -> None:
    # Noise is seeded per lane with seed + lane: a request alone on lane 0 sees the times it
    # would see with one worker.
    workload = handmade(1, rate=1.0, seed=4)
    one = simulate(workload, profile, SimConfig(policy="vllm", time_noise=0.2, seed=9))
    three = simulate(workload, profile, SimConfig(policy="vllm", time_noise=0.2, seed=9, workers=3))
    assert three.metrics.requests == one.metrics.requests
    assert [len(c.requests) for c in three.cores] == [1, 0, 0]


def test_bad_worker_count_and_router_name_are_refused(profile: DeviceProfile) -> None:
    with pytest.raises(ValueError, match="workers"):
        SimConfig(policy="vllm", workers=0)
    with pytest.raises(ValueError, match="unknown router 'round-robin'"):
        simulate(handmade(2, rate=1.0), profile, SimConfig(policy="vllm", workers=2, routing="round-robin"))


# -- routers --------------------------------------------------------------------------------------
def test_least_work_router_picks_the_lane_with_fewest_uncomputed_tokens(profile: DeviceProfile) -> None:
    busy = _core(profile, _request("a", 900, "code"), _request("b", 300, "chat"))
    light = _core(profile, _request("c", 1000, "summarization"))
    empty_later = _core(profile)
    router = LeastWorkRouter()
    new = _request("x", 10, "chat")
    assert [lane_work(c) for c in (busy, light)] == [1200, 1000]
    assert router.pick(new, [busy, light]) == 1
    assert router.pick(new, [busy, light, empty_later]) == 2
    assert router.pick(new, [_core(profile), _core(profile)]) == 0  # ties: the lowest index
    # Work counts only what is still to run: a finished request weighs nothing.
    core = _core(profile, _request("d", 50, "chat"))
    core.cancel("d", 1.0)
    assert lane_work(core) == 0 and router.pick(new, [light, core]) == 1


def test_slo_aware_router_keeps_tight_requests_and_long_prefills_apart(profile: DeviceProfile) -> None:
    router = SLOAwareRouter(tight_tbt_s=0.05, long_prompt_tokens=1024)
    prefilling = _core(profile, _request("long", 1500, "summarization"))  # work 1500, a big prefill
    tight = _core(profile, *[_request(f"t{k}", 400, "chat") for k in range(5)])  # work 2000, tight requests
    # Least work would put both on the lane with the big prefill.
    assert LeastWorkRouter().pick(_request("x", 10, "chat"), [prefilling, tight]) == 0
    assert router.pick(_request("chat", 10, "chat"), [prefilling, tight]) == 1  # tight: away from the prefill
    assert router.pick(_request("long2", 1800, "code"), [tight, prefilling]) == 1  # long: away from tight ones
    assert router.pick(_request("mid", 200, "code"), [tight, prefilling]) == 1  # others: least work
    assert router.pick(_request("both", 1800, "chat"), [prefilling, tight]) == 1  # tight and long: tight
    # Among lanes equally free of what it avoids, a request takes the least work.
    assert router.pick(_request("chat2", 10, "chat"), [tight, _core(profile)]) == 1
    # A decoded long request no longer counts as a prefill to avoid.
    done = _core(profile, _request("long3", 1500, "summarization"))
    done.requests["long3"].num_computed_tokens = 1500
    done.requests["long3"].output_token_ids.append(100)
    assert router.stats(done).long_prefill == 0 and router.pick(_request("c", 10, "chat"), [tight, done]) == 1
    # With a slack, a lane whose KV demand is far above the smallest one is no candidate.
    bounded = SLOAwareRouter(tight_tbt_s=0.05, long_prompt_tokens=1024, slack_tokens=200)
    assert [bounded.stats(c).kv_demand for c in (prefilling, tight)] == [1500, 2000]
    assert bounded.pick(_request("chat3", 10, "chat"), [prefilling, tight]) == 0


def test_slo_aware_thresholds_come_from_the_catalog_and_profile(profile: DeviceProfile) -> None:
    router = SLOAwareRouter.for_profile(SLOCatalog(), profile)
    assert router.tight_tbt_s == 0.05
    assert router.long_prompt_tokens == TokenBudget(profile).for_slo(0.05)  # the tightest class's budget
    assert router.slack_tokens == profile.kv_capacity_tokens // 2
    plain = SLOAwareRouter.for_profile(SLOCatalog())
    assert (plain.long_prompt_tokens, plain.slack_tokens) == (1024, None)


def test_make_router_by_name() -> None:
    assert isinstance(make_router("least-work"), LeastWorkRouter)
    slo = make_router("slo-aware", SLOCatalog(), long_prompt_tokens=512)
    assert isinstance(slo, SLOAwareRouter) and slo.long_prompt_tokens == 512
    with pytest.raises(ValueError, match="unknown router 'fastest'.*least-work, slo-aware"):
        make_router("fastest")
