"""AccelGen policy: remaining time T_r, urgency, per-iteration budget, dynamic chunking, ERA,
the Euclidean (compute, KV) pick, SLO grouping and the SLO-aware preemption victim.

Profile used throughout: T(S) = 10 + 0.1*S ms, knee searched up to 1024 tokens, block size 16.
Hand-worked numbers (see test_core_profile_budget.py for the derivations):

* S_pf = 656, T_pf = 75.6 ms.
* Budgets (5% margin, guard on):
    tight  TBT 50.3 ms -> 10 + 0.1 S <= 47.785 ms -> S_b = 377; one full iteration T(377) = 47.7 ms
    mid    TBT 81 ms   -> min(formula 702, table 669) = 669;   T(669) = 76.9 ms
    loose  TBT 200 ms  -> min(formula 1735, table 1800) = 1735; T(1735) = 183.5 ms
    JCT / nothing      -> 8192 tokens;                          T(8192) = 829.2 ms
* T_max with nothing running = T(8192) = 0.8292 s; with a tight request running = 0.0477 s.
* SLO groups (floor(log2(TBT in ms))): tight 5, mid 6, loose 7.
"""

from __future__ import annotations

import pytest

from accelgen.core.budget import TokenBudget
from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
from accelgen.core.profile import CostCoefficients, DeviceProfile
from accelgen.core.request import Request, RequestStatus, SamplingParams
from accelgen.core.scheduler import SchedulerCore
from accelgen.core.slo import SLO, SLOCatalog, SLOClass

pytestmark = pytest.mark.unit

BS = 16
TIGHT, MID, LOOSE = 0.0503, 0.081, 0.2
T_TIGHT, T_MID, T_LOOSE, T_FULL = 0.0477, 0.0769, 0.1835, 0.8292

CATALOG = SLOCatalog(
    classes=(
        SLOClass("tight", SLO(ttft_s=1.0, tbt_s=TIGHT)),
        SLOClass("mid", SLO(ttft_s=2.0, tbt_s=MID)),
        SLOClass("loose", SLO(ttft_s=5.0, tbt_s=LOOSE)),
        SLOClass("batch", SLO(jct_s=100.0)),
    )
)


def profile(kv_blocks: int = 1000) -> DeviceProfile:
    return DeviceProfile(
        name="linear",
        coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1),
        kv_capacity_tokens=BS * kv_blocks,
        block_size=BS,
        max_model_len=4096,
        knee_search_max_tokens=1024,
    )


# The arithmetic below is the paper's: token budgets and KV blocks of the prompt only. Pin the
# two extensions that would change it (cost-model time guard, KV headroom for future output);
# every other option keeps its default unless a test says otherwise.
PAPER = dict(time_guard=False, kv_headroom_tokens=0)


def make(kv_blocks: int = 1000, **cfg) -> tuple[SchedulerCore, AccelGenPolicy]:
    p = profile(kv_blocks)
    policy = AccelGenPolicy(p, CATALOG, AccelGenConfig(**{**PAPER, **cfg}))
    return SchedulerCore(policy, p), policy


def areq(rid: str, prompt: int, tbt: float | None, ttft: float = 1.0, arrival: float = 0.0, jct: float | None = None) -> Request:
    slo = SLO(jct_s=jct) if tbt is None else SLO(ttft_s=ttft, tbt_s=tbt)
    return Request(
        request_id=rid,
        prompt_token_ids=[7] * prompt,
        sampling=SamplingParams(max_tokens=1000),
        slo=slo,
        app_class="x",
        arrival_s=arrival,
        eos_token_id=2,
    )


def complete(core: SchedulerCore, plan: BatchPlan, now: float) -> None:
    sampled = {c.request_id: 100 for c in plan.chunks if c.samples}
    core.complete(plan, IterationResult(plan.iteration, sampled, 0.0), now)
    core.kv.check_invariants()


def chunk_sizes(plan: BatchPlan) -> dict[str, tuple[int, int]]:
    return {c.request_id: (c.num_computed_tokens, c.num_new_tokens) for c in plan.chunks}


# -- the numbers the tests rely on -------------------------------------------------------------


@pytest.mark.unit
def test_profile_numbers_used_below() -> None:
    _, policy = make()
    b = policy.budget
    assert (policy.profile.s_pf, policy.profile.t_pf_s) == (656, pytest.approx(0.0756))
    assert (b.for_slo(TIGHT), b.for_slo(MID), b.for_slo(LOOSE), b.for_slo(None)) == (377, 669, 1735, 8192)
    assert policy.iteration_time_s(TIGHT) == pytest.approx(T_TIGHT)
    assert policy.iteration_time_s(MID) == pytest.approx(T_MID)
    assert policy.iteration_time_s(LOOSE) == pytest.approx(T_LOOSE)
    assert policy.static_budget == 377  # tightest class of the catalog
    core, policy = make()
    assert policy.t_max_s() == pytest.approx(T_FULL)


# -- remaining time ----------------------------------------------------------------------------


@pytest.mark.unit
def test_remaining_time_of_a_waiting_request() -> None:
    _, policy = make()
    r = areq("a", prompt=1000, tbt=TIGHT, ttft=2.0)
    # T_e = ceil(1000 / 377) = 3 iterations x 47.7 ms = 0.1431 s; T_r = 2.0 - 0.5 - 0.1431.
    assert policy.execution_estimate_s(r) == pytest.approx(0.1431)
    assert policy.remaining_time_s(r, now=0.5) == pytest.approx(1.3569)
    # A pace looser than its own SLO changes nothing: the request itself sets the budget.
    assert policy.remaining_time_s(r, now=0.5, pace_slo_s=LOOSE) == pytest.approx(1.3569)
    # A loose request: ceil(2000 / 1735) = 2 iterations x 183.5 ms = 0.367 s.
    loose = areq("b", prompt=2000, tbt=LOOSE, ttft=10.0, arrival=1.0)
    assert policy.remaining_time_s(loose, now=2.0) == pytest.approx(11.0 - 2.0 - 0.367)
    # Beside tight requests it is cut into tight chunks at the tight pace:
    # ceil(2000 / 377) = 6 iterations x 47.7 ms = 0.2862 s.
    assert policy.remaining_time_s(loose, now=2.0, pace_slo_s=TIGHT) == pytest.approx(11.0 - 2.0 - 0.2862)


@pytest.mark.unit
def test_remaining_time_of_a_partial_prefill_and_a_decode() -> None:
    _, policy = make()
    r = areq("a", prompt=1000, tbt=TIGHT, ttft=2.0)
    r.num_computed_tokens = 754  # 246 left: one iteration
    assert policy.remaining_time_s(r, now=0.5) == pytest.approx(2.0 - 0.5 - 0.0477)
    d = areq("d", prompt=100, tbt=TIGHT, ttft=2.0)
    d.output_token_ids.append(5)
    d.num_computed_tokens = 100  # only the sampled token is left: a decode, one iteration
    d.first_token_s = d.last_token_s = 1.0
    # Deadline = last token + TBT = 1.0503; T_r = 1.0503 - 1.0 - 0.0477 = 0.0026.
    assert policy.remaining_time_s(d, now=1.0) == pytest.approx(0.0026)
    # A decode needs one iteration at its own pace; a looser running pace does not slow it.
    assert policy.remaining_time_s(d, now=1.0, pace_slo_s=LOOSE) == pytest.approx(0.0026)


@pytest.mark.unit
def test_remaining_time_of_a_jct_request() -> None:
    _, policy = make()
    r = areq("j", prompt=100, tbt=None, jct=100.0)
    # Prefill: ceil(100 / 8192) = 1 iteration, then 128 - 1 expected decodes: 128 iterations of
    # T_pf = 75.6 ms = 9.6768 s. T_r = 100 - 1 - 9.6768.
    assert policy.remaining_time_s(r, now=1.0) == pytest.approx(89.3232)


# -- urgency and the budget --------------------------------------------------------------------


def _crowd_with_one_urgent(**cfg) -> tuple[SchedulerCore, AccelGenPolicy, Request]:
    core, policy = make(**cfg)
    for i in range(100):  # earlier, loose, plenty of slack (T_r ~ 9 s)
        core.add_request(areq(f"l{i:03d}", prompt=200, tbt=LOOSE, ttft=10.0, arrival=0.01 * i))
    # Arrives last; T_r = 1.2 - 1.0 - 1 x 0.0477 = 0.1523 s <= T_max = 0.8292 s: urgent.
    urgent = areq("t", prompt=100, tbt=TIGHT, ttft=0.2, arrival=1.0)
    core.add_request(urgent)
    return core, policy, urgent


@pytest.mark.unit
def test_urgent_request_always_in_the_batch_and_sets_the_budget() -> None:
    core, policy, urgent = _crowd_with_one_urgent()
    assert policy.remaining_time_s(urgent, 1.0, policy.t_max_s()) == pytest.approx(0.1523)
    plan = core.step(1.0)
    assert "t" in plan.request_ids()
    assert chunk_sizes(plan)["t"] == (0, 100)
    # Budget of the tightest urgent SLO: 377 tokens, filled by loose requests (looser group).
    assert plan.token_budget == 377 == TokenBudget(policy.profile).for_slo(TIGHT)
    assert plan.slo_min_s == TIGHT
    assert plan.num_tokens == 377


@pytest.mark.unit
def test_without_prioritisation_the_urgent_request_waits_behind_the_crowd() -> None:
    # The control for the test above: FCFS order keeps it out, so that test can fail.
    core, _, _ = _crowd_with_one_urgent(prioritise=False)
    plan = core.step(1.0)
    assert "t" not in plan.request_ids()
    assert plan.token_budget == 1735  # the loose head of the queue sets the budget


@pytest.mark.unit
def test_budget_is_that_of_the_tightest_urgent_slo_and_tighter_nonurgent_stays_out() -> None:
    core, _ = make()
    # Urgent: loose T_r = 0.5 - 0.1835 = 0.3165, mid T_r = 0.5 - 0.0769 = 0.4231 (<= 0.8292).
    core.add_request(areq("loose", prompt=300, tbt=LOOSE, ttft=0.5))
    core.add_request(areq("mid", prompt=300, tbt=MID, ttft=0.5))
    # Not urgent (T_r ~ 50 s) and tighter than the batch.
    core.add_request(areq("tight", prompt=50, tbt=TIGHT, ttft=50.0))
    plan = core.step(0.0)
    # SLO_min among urgent = 81 ms -> 669 tokens.
    assert plan.token_budget == 669 and plan.slo_min_s == MID
    assert chunk_sizes(plan) == {"loose": (0, 300), "mid": (0, 300)}
    # The tight request stays out: the 600-token batch (T = 70 ms) already breaks its 50.3 ms,
    # although 69 tokens of budget are left.
    assert plan.predicted_time_s == pytest.approx(0.070)
    assert core.requests["tight"].status is RequestStatus.WAITING


@pytest.mark.unit
def test_tighter_nonurgent_request_joins_a_batch_that_meets_its_slo_and_tightens_it() -> None:
    core, _ = make()
    core.add_request(areq("loose", prompt=100, tbt=LOOSE, ttft=0.5))
    core.add_request(areq("mid", prompt=100, tbt=MID, ttft=0.5))
    core.add_request(areq("tight", prompt=50, tbt=TIGHT, ttft=50.0))
    plan = core.step(0.0)
    # 200 tokens (T = 30 ms) meet 50.3 ms less 5%: the tight one joins, the budget becomes 377.
    assert chunk_sizes(plan) == {"loose": (0, 100), "mid": (0, 100), "tight": (0, 50)}
    assert plan.token_budget == 377 and plan.slo_min_s == TIGHT


@pytest.mark.unit
def test_jct_only_batch_gets_the_full_budget() -> None:
    core, _ = make()
    core.add_request(areq("j", prompt=3000, tbt=None, jct=100.0))
    plan = core.step(0.0)
    assert plan.token_budget == 8192 and plan.slo_min_s is None
    assert chunk_sizes(plan) == {"j": (0, 3000)}


# -- dynamic chunking --------------------------------------------------------------------------


@pytest.mark.unit
def test_long_prompt_chunk_fills_exactly_the_budget_left() -> None:
    core, _ = make()
    core.add_request(areq("short", prompt=50, tbt=TIGHT, ttft=0.2))  # urgent: 0.2 - 0.0477
    core.add_request(areq("long", prompt=1000, tbt=TIGHT, ttft=10.0))  # not urgent
    plan = core.step(0.0)
    assert plan.token_budget == 377
    assert chunk_sizes(plan) == {"short": (0, 50), "long": (0, 327)}  # 377 - 50
    complete(core, plan, 0.0477)
    plan = core.step(0.0477)
    # short decodes (1 token); long takes the other 376.
    assert chunk_sizes(plan) == {"short": (50, 1), "long": (327, 376)}
    complete(core, plan, 0.0954)
    plan = core.step(0.0954)
    # 1000 - 703 = 297 left: the last chunk, which samples.
    assert chunk_sizes(plan) == {"short": (51, 1), "long": (703, 297)}
    assert [c.samples for c in plan.chunks] == [True, True]


@pytest.mark.unit
def test_single_long_prompt_takes_the_whole_budget_each_iteration() -> None:
    core, _ = make()
    core.add_request(areq("long", prompt=1000, tbt=TIGHT, ttft=10.0))
    sizes = []
    now = 0.0
    for _ in range(3):
        plan = core.step(now)
        sizes.append(chunk_sizes(plan)["long"])
        now += 0.0477
        complete(core, plan, now)
    assert sizes == [(0, 377), (377, 377), (754, 246)]


# -- ERA ---------------------------------------------------------------------------------------


def _era_scenario(**cfg) -> tuple[SchedulerCore, BatchPlan]:
    """A long prompt A is being prefilled when a long prompt B with an earlier deadline arrives.

    Iteration 2: neither is urgent (T_max = 47.7 ms while A runs). B's T_r = 1.0 - 3 x 0.0477 =
    0.8569 s is below A's (5 - 0.0477 - 2 x 0.0477 = 4.857 s), so B is considered first.
    """
    core, _ = make(multi_resource=False, **cfg)
    core.add_request(areq("A", prompt=1000, tbt=TIGHT, ttft=5.0, arrival=0.0))
    plan = core.step(0.0)
    assert chunk_sizes(plan) == {"A": (0, 377)}
    complete(core, plan, 0.0477)
    core.add_request(areq("B", prompt=1000, tbt=TIGHT, ttft=1.0, arrival=0.0477))
    return core, core.step(0.0477)


@pytest.mark.unit
def test_era_cap_one_keeps_a_second_long_prompt_from_starting() -> None:
    core, plan = _era_scenario(era=True, era_cap=1)
    assert chunk_sizes(plan) == {"A": (377, 377)}
    assert core.requests["B"].status is RequestStatus.WAITING


@pytest.mark.unit
@pytest.mark.parametrize("cfg", [dict(era=False), dict(era=True, era_cap=2)])
def test_without_era_two_long_prompts_are_prefilled_at_once(cfg) -> None:
    core, plan = _era_scenario(**cfg)
    assert chunk_sizes(plan) == {"B": (0, 377)}
    complete(core, plan, 0.0954)
    a, b = core.requests["A"], core.requests["B"]
    # Both now hold a partial prefill.
    assert 0 < a.num_computed_tokens < a.num_prompt_tokens
    assert 0 < b.num_computed_tokens < b.num_prompt_tokens




@pytest.mark.unit
def test_era_counts_a_long_prompt_until_its_prefill_ends() -> None:
    # paper.md: "long" = prompt longer than S_b; at most era_cap = 1 of them prefilled at once.
    core, _ = make()
    core.add_request(areq("A", prompt=930, tbt=TIGHT, ttft=3.0, arrival=0.0))
    core.add_request(areq("B", prompt=920, tbt=TIGHT, ttft=3.0, arrival=0.0))
    now = 0.0
    for _ in range(3):
        plan = core.step(now)
        now += 0.0477
        complete(core, plan, now)
        partial = sorted(
            r.request_id for r in core.requests.values() if 0 < r.num_computed_tokens < r.num_prompt_tokens
        )
        # Iteration 1 starts one prompt (377 tokens), iteration 2 continues it (754); iteration 3
        # must finish it (176 left) rather than start the other: never two half-done prompts.
        assert len(partial) <= 1, (partial, chunk_sizes(plan))


@pytest.mark.unit
def test_era_at_most_one_partial_long_prefill_over_a_run() -> None:
    core, _ = make()
    for i in range(4):
        core.add_request(areq(f"L{i}", prompt=900 + 10 * i, tbt=TIGHT, ttft=3.0 + i * 0.01, arrival=0.001 * i))
    now = 0.0
    for _ in range(40):
        if not core.has_work():
            break
        plan = core.step(now)
        now += plan.predicted_time_s
        complete(core, plan, now)
        partial = [r.request_id for r in core.running if 0 < r.num_computed_tokens < r.num_prompt_tokens]
        assert len(partial) <= 1, (partial, chunk_sizes(plan))


@pytest.mark.unit
def test_era_blocks_a_second_long_start_while_the_first_remainder_exceeds_the_budget() -> None:
    # The part of ERA that holds today: while A's remainder is above the budget, B cannot start.
    core, _ = make()
    core.add_request(areq("A", prompt=930, tbt=TIGHT, ttft=3.0, arrival=0.0))
    core.add_request(areq("B", prompt=920, tbt=TIGHT, ttft=3.0, arrival=0.0))
    first = core.step(0.0)
    [(started, _)] = chunk_sizes(first).items()
    complete(core, first, 0.0477)
    second = core.step(0.0477)
    assert list(chunk_sizes(second)) == [started]
    other = "B" if started == "A" else "A"
    assert core.requests[other].num_computed_tokens == 0


# -- multi-resource (Euclidean) pick -----------------------------------------------------------


def _euclid(ghost_blocks: int, **cfg) -> BatchPlan:
    """Two non-urgent waiting prompts of the tight class on a 100-block cache.

    X (earlier, smaller T_r): 400 tokens = 25 blocks.  Y (later): 800 tokens = 50 blocks.
    Both demand the whole budget of 377 tokens: d_c = 1 = a_c, so only the KV axis decides.
    """
    core, policy = make(kv_blocks=100, **cfg)
    if ghost_blocks:
        assert core.kv.allocate("ghost", ghost_blocks * BS) is not None  # KV held by someone else
    x = areq("X", prompt=400, tbt=TIGHT, ttft=10.0, arrival=0.0)
    y = areq("Y", prompt=800, tbt=TIGHT, ttft=10.0, arrival=0.1)
    core.add_request(x)
    core.add_request(y)
    # X would go first by T_r: 10 - 0.1 - 2 x 0.0477 = 9.8046 < 10.1 - 0.1 - 3 x 0.0477 = 9.8569.
    assert policy.remaining_time_s(x, 0.1) < policy.remaining_time_s(y, 0.1)
    return core.step(0.1)


@pytest.mark.unit
def test_euclidean_pick_prefers_closer_kv_demand_over_the_earlier_request() -> None:
    # 60 of 100 blocks free: a = (1, 0.60).
    #   X: d = (1, 0.25) -> distance^2 = 0 + 0.35^2 = 0.1225
    #   Y: d = (1, 0.50) -> distance^2 = 0 + 0.10^2 = 0.0100   <- closer, wins
    # Y fits: its whole prompt (50 blocks, 51 with room for its first output token) <= 60 free.
    plan = _euclid(ghost_blocks=40)
    assert chunk_sizes(plan) == {"Y": (0, 377)}


@pytest.mark.unit
def test_euclidean_pick_flips_with_kv_availability() -> None:
    # 30 of 100 blocks free: a = (1, 0.30).
    #   X: distance^2 = 0.05^2 = 0.0025   <- closer, wins
    #   Y: distance^2 = 0.20^2 = 0.0400
    plan = _euclid(ghost_blocks=70)
    assert chunk_sizes(plan) == {"X": (0, 377)}


@pytest.mark.unit
def test_without_multi_resource_the_earlier_request_wins() -> None:
    plan = _euclid(ghost_blocks=40, multi_resource=False)
    assert chunk_sizes(plan) == {"X": (0, 377)}


@pytest.mark.unit
def test_euclidean_pick_on_the_compute_axis() -> None:
    # Full free cache (a_m = 1), budget 377, a_c = 1. P (earlier): 48 tokens = 3 blocks,
    # d = (48/377, 0.03) = (0.1273, 0.03): distance^2 = 0.8727^2 + 0.97^2 = 0.7616 + 0.9409 = 1.7025.
    # Q (later): 377 tokens = 24 blocks, d = (1, 0.24): distance^2 = 0 + 0.76^2 = 0.5776 -> wins,
    # and takes the whole budget.
    core, _ = make(kv_blocks=100)
    core.add_request(areq("P", prompt=48, tbt=TIGHT, ttft=10.0, arrival=0.0))
    core.add_request(areq("Q", prompt=377, tbt=TIGHT, ttft=10.0, arrival=0.1))
    plan = core.step(0.1)
    assert chunk_sizes(plan) == {"Q": (0, 377)}


# -- preemption victims ------------------------------------------------------------------------


def _victim_scenario(victim: str) -> tuple[SchedulerCore, BatchPlan, list[Request]]:
    """A 6-block cache filled by three 31-token prompts (2 blocks each): A loose, B and C tight.

    Iteration 1 prefills all three (31 tokens + the first output token fit 2 blocks), iteration 2
    decodes all three (32 tokens: still 2 blocks). In iteration 3 each decode needs a third
    block and none is free. T_max = 47.7 ms (tight requests run); last tokens at 0.04 s, so
    T_r: A = 0.2 - 0.0477 = 0.1523 (not urgent), B = C = 0.0503 - 0.0477 = 0.0026 (urgent).
    """
    core, _ = make(kv_blocks=6, victim=victim)
    reqs = [
        areq("A", prompt=31, tbt=LOOSE, ttft=5.0),
        areq("B", prompt=31, tbt=TIGHT, ttft=5.0),
        areq("C", prompt=31, tbt=TIGHT, ttft=5.0),
    ]
    for r in reqs:
        core.add_request(r)
    plan = core.step(0.0)
    assert sorted(plan.request_ids()) == ["A", "B", "C"] and core.kv.num_free_blocks == 0
    assert core.running[0] is reqs[0]  # A was admitted first: it is not the newest
    complete(core, plan, 0.02)
    plan = core.step(0.02)
    assert sorted(plan.request_ids()) == ["A", "B", "C"] and not plan.preempted_request_ids
    complete(core, plan, 0.04)
    assert all(r.num_tokens == 33 for r in reqs)
    return core, core.step(0.04), reqs


@pytest.mark.unit
def test_slo_victim_is_the_running_request_with_most_slack() -> None:
    core, plan, (a, b, c) = _victim_scenario("slo")
    assert plan.preempted_request_ids == ["A"]
    assert "A" in plan.freed_request_ids
    assert sorted(plan.request_ids()) == ["B", "C"]
    assert a.status is RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    assert core.kv.num_blocks_of("A") == 0
    core.kv.check_invariants()


@pytest.mark.unit
def test_vllm_victim_is_the_newest_running_request() -> None:
    core, plan, (a, b, c) = _victim_scenario("vllm")
    newest = "C" if core.requests["C"].status is RequestStatus.PREEMPTED else "B"
    assert plan.preempted_request_ids == [newest]
    assert newest != "A"
    assert "A" in plan.request_ids()
    core.kv.check_invariants()


@pytest.mark.unit
def test_config_validation() -> None:
    with pytest.raises(ValueError):
        AccelGenConfig(victim="random")
    with pytest.raises(ValueError):
        AccelGenConfig(era_cap=0)
    with pytest.raises(ValueError):
        AccelGenConfig(candidate_window=0)


@pytest.mark.unit
def test_measured_overhead_and_slow_device_shrink_the_budget() -> None:
    """The service refines the profile online: time outside the model and a device slower than
    predicted both leave the model less time, so fewer tokens fit the same SLO."""
    from accelgen.core.budget import TokenBudget
    from accelgen.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
    from accelgen.core.slo import SLOCatalog
    from accelgen.profiles import load_profile

    profile = load_profile()
    policy = AccelGenPolicy(profile, SLOCatalog(), AccelGenConfig())
    budget = TokenBudget(profile)
    assert policy._model_time(0.05) == 0.05
    policy.overhead_s = 0.010
    assert policy._model_time(0.05) == pytest.approx(0.040)
    policy.time_correction = 2.0  # the device runs twice as slow as profiled
    assert policy._model_time(0.05) == pytest.approx(0.020)
    # By hand: 0.95 * 20 ms = 19 ms of profile time holds (19 - 18.10) / 0.1019 = 8 tokens.
    assert budget.for_slo(policy._model_time(0.05)) == 8 < budget.for_slo(0.05)
