"""The pieces issue 8 added to the core, on hand-worked cases: policy specs and the vLLM
priority baseline, EDF's KV reserve, SLO-aware admission, output-length estimates, the adaptive
safety margin and best-effort demotion of requests that already missed their SLO.

Profile (as in test_core_accelgen.py): T(S) = 10 + 0.1*S ms, block size 16, S_pf = 656,
T_pf = 75.6 ms; a 50.3 ms class has a 377-token budget.
"""

from __future__ import annotations

import pytest

from accelgen.core.admission import AdmissionConfig, AdmissionControl, AdmissionRefused
from accelgen.core.length_estimate import LengthEstimateConfig, OutputLengthEstimator
from accelgen.core.plan import BatchPlan, IterationResult, ScheduledChunk
from accelgen.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
from accelgen.core.policies.edf import EDFConfig, EDFPolicy
from accelgen.core.policies.registry import PolicySpec, make_policy
from accelgen.core.policies.vllm_fcfs import VLLMPolicy, VLLMPriorityPolicy
from accelgen.core.request import RequestStatus
from accelgen.core.scheduler import CoreConfig, SchedulerCore
from accelgen.core.timing_margin import AdaptiveMargin
from tests.unit.test_core_accelgen import CATALOG, LOOSE, T_TIGHT, TIGHT, areq, make, profile

pytestmark = pytest.mark.unit


# -- policy specs ------------------------------------------------------------------------------


def test_policy_spec_parses_budget_and_admission() -> None:
    assert PolicySpec.parse("vllm") == PolicySpec("vllm")
    assert PolicySpec.parse("vllm@512") == PolicySpec("vllm", 512)
    assert PolicySpec.parse("vllm-priority@256+admission") == PolicySpec("vllm-priority", 256, True)
    assert PolicySpec.parse("accelgen+admission") == PolicySpec("accelgen", None, True)


@pytest.mark.parametrize("bad, words", [
    ("fifo", "unknown policy"), ("accelgen@512", "static budget"), ("vllm@abc", "whole number"),
    ("vllm@0", ">= 1"), ("vllm+eager", r"\+admission"),
])
def test_policy_spec_errors_say_what_is_wrong(bad: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        PolicySpec.parse(bad)


def test_make_policy_applies_the_spec() -> None:
    p = profile()
    vllm = make_policy("vllm@512", p, CATALOG)
    assert isinstance(vllm, VLLMPolicy) and vllm.config.max_num_batched_tokens == 512 and vllm.admission is None
    assert make_policy("sarathi@384", p, CATALOG).token_budget == 384
    assert make_policy("edf@100", p, CATALOG).token_budget == 100
    assert make_policy("vllm+admission", p, CATALOG).admission is not None
    assert make_policy("edf@100+admission", p, CATALOG).admission is not None
    acc = make_policy("accelgen+admission", p, CATALOG)
    assert isinstance(acc, AccelGenPolicy) and acc.config.admission and acc.admission is not None


# -- vLLM's priority policy --------------------------------------------------------------------


def test_vllm_priority_admits_the_tighter_class_first_and_preempts_the_loosest() -> None:
    p = profile()
    policy = VLLMPriorityPolicy(p, CATALOG)
    core = SchedulerCore(policy, p, config=CoreConfig(max_num_seqs=1))
    core.add_request(areq("loose", prompt=10, tbt=LOOSE, ttft=5.0, arrival=0.0))
    core.add_request(areq("tight", prompt=10, tbt=TIGHT, ttft=1.0, arrival=1.0))
    plan = core.step(1.0)
    assert plan.request_ids() == ["tight"]  # FCFS would have admitted "loose"
    fcfs = SchedulerCore(VLLMPolicy(p, CATALOG), p, config=CoreConfig(max_num_seqs=1))
    fcfs.add_request(areq("loose", prompt=10, tbt=LOOSE, ttft=5.0, arrival=0.0))
    fcfs.add_request(areq("tight", prompt=10, tbt=TIGHT, ttft=1.0, arrival=1.0))
    assert fcfs.step(1.0).request_ids() == ["loose"]
    # Victim: the largest (priority, arrival), whatever the admission order.
    core2 = SchedulerCore(VLLMPriorityPolicy(p, CATALOG), p)
    a, b, c = (areq("a", 10, LOOSE, arrival=0.0), areq("b", 10, TIGHT, arrival=2.0), areq("c", 10, LOOSE, arrival=1.0))
    for r in (a, b, c):
        core2.add_request(r)
    core2.step(2.0)
    assert core2.policy.victim(None, a) is c


# -- EDF's KV reserve --------------------------------------------------------------------------


def test_edf_keeps_room_for_running_requests_to_grow() -> None:
    # 10 blocks of 16 tokens. "run" holds 3 blocks (40 prompt tokens); with a 64-token headroom
    # it is expected to reach 104 tokens = 7 blocks: 4 more reserved. "new" (40 tokens + 64 =
    # 7 blocks) would need 7 + 4 = 11 > 10 free... so EDF with the reserve leaves it waiting.
    p = profile(kv_blocks=10)
    for headroom, admitted in ((64, False), (0, True)):
        core = SchedulerCore(EDFPolicy(p, CATALOG, EDFConfig(token_budget=100, kv_headroom_tokens=headroom)), p)
        core.add_request(areq("run", prompt=40, tbt=TIGHT, ttft=1.0, arrival=0.0))
        core.step(0.0)
        core.add_request(areq("new", prompt=40, tbt=LOOSE, ttft=5.0, arrival=0.1))
        plan = core.step(0.1)
        assert ("new" in plan.request_ids()) is admitted, headroom


# -- SLO-aware admission -----------------------------------------------------------------------


def test_admission_refuses_what_cannot_make_its_first_token_deadline() -> None:
    p = profile()
    policy = VLLMPolicy(p, CATALOG)
    policy.admission = AdmissionControl(initial_rate_tok_s=1000.0)
    core = SchedulerCore(policy, p)
    for i in range(3):  # 3 x 300 = 900 prompt tokens queued ahead
        core.submit(areq(f"w{i}", prompt=300, tbt=LOOSE, ttft=5.0, arrival=0.0), now=0.0)
    # A tight request (TTFT 1.0 s) with 200 tokens: (900 + 200) / 1000 = 1.1 s > 1.0 s: refused.
    with pytest.raises(AdmissionRefused) as err:
        core.submit(areq("t", prompt=200, tbt=TIGHT, ttft=1.0, arrival=0.0), now=0.0)
    assert err.value.retry_after_s == pytest.approx(0.1)
    assert "cannot be met" in str(err.value) and "t" not in core.requests
    # 50 tokens: 0.95 s <= 1.0 s: accepted.
    core.submit(areq("s", prompt=50, tbt=TIGHT, ttft=1.0, arrival=0.0), now=0.0)
    assert "s" in core.waiting
    # With slack 2, the 200-token one fits (1.1 s <= 2 x 1.0 s).
    policy.admission = AdmissionControl(1000.0, AdmissionConfig(slack=2.0))
    core.submit(areq("t", prompt=200, tbt=TIGHT, ttft=1.0, arrival=0.0), now=0.0)


def test_admission_learns_the_prefill_rate_only_while_backlogged() -> None:
    import math

    ctl = AdmissionControl(1000.0, AdmissionConfig(horizon_s=1.0))
    plan = BatchPlan(1, [ScheduledChunk("a", 0, 200, (), (), True, True), ScheduledChunk("b", 9, 1, (), (), False, True)])
    ctl.observe(plan, elapsed_s=0.1, backlogged=False)
    assert ctl.rate_tok_s == 1000.0
    # A time average: 1 s at 1000 tok/s (decayed by e^-0.1), then 200 prefill tokens in 0.1 s
    # (the decode does not count).
    ctl.observe(plan, elapsed_s=0.1, backlogged=True)
    keep = math.exp(-0.1)
    assert ctl.rate_tok_s == pytest.approx((1000 * keep + 200) / (keep + 0.1))
    # Decode-only iterations lower it in proportion to their time, not their number.
    only_decode = BatchPlan(2, [ScheduledChunk("b", 10, 1, (), (), False, True)])
    for _ in range(10):
        ctl.observe(only_decode, elapsed_s=0.01, backlogged=True)
    assert 900 < ctl.rate_tok_s < 1100


# -- output-length estimates -------------------------------------------------------------------


def test_length_estimate_is_the_mean_of_longer_finished_requests() -> None:
    est = OutputLengthEstimator(LengthEstimateConfig(min_samples=4, prior_tokens=50, bucket_tokens=1))
    assert est.expected_output("chat", 100, 0) == 50  # nothing finished: the prior
    for n in (10, 20, 30, 100):
        est.observe("chat", 100, n)
    assert est.expected_output("chat", 100, 0) == 40  # mean of all four
    assert est.expected_output("chat", 100, 15) == 50  # mean of 20, 30, 100
    assert est.expected_output("chat", 100, 30) == 100  # only 100 ran longer
    assert est.expected_output("chat", 100, 150) == 151  # past everything seen: at least one more
    # Another prompt bin with too few samples falls back to the class.
    assert est.expected_output("chat", 2000, 0) == 40
    assert est.expected_output("code", 100, 0) == 50


def test_accelgen_with_estimates_reserves_what_it_learned() -> None:
    p = profile()
    policy = AccelGenPolicy(p, CATALOG, AccelGenConfig(length_estimates=True,
                                                      length_config=LengthEstimateConfig(min_samples=1)))
    SchedulerCore(policy, p)
    r = areq("x", prompt=100, tbt=TIGHT)
    assert policy.expected_final_tokens(r) == 100 + 128  # the prior, before anything finished
    done = areq("d", prompt=100, tbt=TIGHT)
    done.app_class = r.app_class
    done.output_token_ids = [1] * 300
    done.status = RequestStatus.FINISHED
    policy.on_finish(done)
    assert policy.expected_final_tokens(r) == 400
    assert policy.remaining_output_tokens(r) == 300


# -- adaptive margin ---------------------------------------------------------------------------


def test_adaptive_margin_covers_the_slow_tail_and_never_drops_below_the_floor() -> None:
    m = AdaptiveMargin(floor=0.05, quantile=0.99, every=10, min_samples=10)
    for _ in range(20):
        m.observe(0.1, 0.1)  # exact
    assert m.margin == 0.05
    m2 = AdaptiveMargin(floor=0.05, quantile=0.5, every=10, min_samples=10)
    for _ in range(20):
        m2.observe(0.1, 0.125)  # 25% slow: priced at (1 - m) x SLO it must land within the SLO
    assert m2.margin == pytest.approx(1 - 1 / 1.25)


# -- best-effort demotion ----------------------------------------------------------------------


def test_a_request_whose_first_token_was_late_no_longer_sets_the_budget() -> None:
    p = profile()
    for demote, budget in ((True, 1735), (False, 377)):
        policy = AccelGenPolicy(p, CATALOG, AccelGenConfig(time_guard=False, kv_headroom_tokens=0, demote_late=demote))
        core = SchedulerCore(policy, p)
        late = areq("late", prompt=10, tbt=TIGHT, ttft=1.0, arrival=0.0)
        core.add_request(late)
        plan = core.step(1.5)  # already past its 1.0 s first-token deadline
        core.complete(plan, IterationResult(plan.iteration, {"late": 5}, 0.01), now=1.6)
        assert late.first_token_s == 1.6 and policy.is_late(late)  # triaged while it waited
        core.add_request(areq("loose", prompt=300, tbt=LOOSE, ttft=5.0, arrival=1.6))
        plan = core.step(1.6)
        assert plan.token_budget == budget, demote  # the loose request's budget, or the late tight one's
        assert sorted(plan.request_ids()) == ["late", "loose"]  # still served (as best effort when demoted)


# -- T_e at the batch's pace (the estimate before the fix, for its ablation) ---------------------


def test_remaining_time_before_the_batch_pace_fix() -> None:
    """te_batch_pace=False: chunks of the request's own budget, each at most T_max long."""
    _, policy = make(te_batch_pace=False)
    r = areq("a", prompt=1000, tbt=TIGHT, ttft=2.0)
    # In a batch whose iterations last at most 10 ms: 3 x 0.01 s.
    assert policy.remaining_time_s(r, now=0.5, t_max_s=0.01) == pytest.approx(2.0 - 0.5 - 0.03)
    # A cap above the request's own iteration time changes nothing.
    assert policy.remaining_time_s(r, now=0.5, t_max_s=1.0) == pytest.approx(1.3569)
    loose = areq("b", prompt=2000, tbt=LOOSE, ttft=10.0, arrival=1.0)
    # Own budget (2 chunks of 1735) at the tight cap: 2 x 47.7 ms, an underestimate of 3x.
    assert policy.remaining_time_s(loose, now=2.0, pace_slo_s=TIGHT, t_max_s=T_TIGHT) == pytest.approx(
        11.0 - 2.0 - 2 * T_TIGHT)
