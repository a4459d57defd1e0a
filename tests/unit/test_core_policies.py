"""Every policy end to end in the simulator, on a small paper-mix workload from the in-repo
trace sample: all requests finish with exactly their true output length, no KV leaks, runs are
deterministic, and each baseline keeps to its own budget."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.simulator as simulator
from bench.simulator import CostModelExecutor, SimConfig, simulate
from bench.workloads import WorkloadRequest, paper_mix
from accelgen.core.plan import BatchPlan, ScheduledChunk
from accelgen.core.policies.registry import POLICY_NAMES, make_policy
from accelgen.core.policies.sarathi import SarathiPolicy
from accelgen.core.policies.vllm_fcfs import VLLMPolicy
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import RequestStatus
from accelgen.core.slo import SLOCatalog
from accelgen.profiles import load_profile

pytestmark = pytest.mark.unit

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "traces_sample"
NONDETERMINISTIC = {"sched_ms_p50", "sched_ms_p99"}  # wall-clock decision time


@pytest.fixture(scope="module")
def profile() -> DeviceProfile:
    return load_profile()


@pytest.fixture(scope="module")
def workload() -> list[WorkloadRequest]:
    w = paper_mix(rate=2.0, duration_s=20.0, seed=1, data_dir=SAMPLE)
    assert 20 <= len(w) <= 60 and any(r.is_long for r in w) and any(not r.is_long for r in w)
    return w


@pytest.fixture()
def captured_cores(monkeypatch: pytest.MonkeyPatch) -> list:
    """The SchedulerCore each simulate() call builds, so its final state can be inspected."""
    cores = []
    real = simulator.SchedulerCore

    def build(*args, **kwargs):
        core = real(*args, **kwargs)
        cores.append(core)
        return core

    monkeypatch.setattr(simulator, "SchedulerCore", build)
    return cores


def _check_run(result, workload: list[WorkloadRequest], core) -> None:
    s = result.summary
    assert s["num_requests"] == s["num_finished"] == len(workload)
    # SLO-aware admission (AccelGen's default) may refuse a request at its arrival: it then has
    # no token and never reached the core. Every other request runs to its exact length.
    refused = {rid for rid, rec in result.metrics.requests.items() if rec.finish_reason == "refused"}
    assert s["num_refused"] == len(refused)
    assert s["output_tokens"] == sum(w.output_len for w in workload if w.request_id not in refused)
    for w in workload:
        rec = result.metrics.requests[w.request_id]
        if w.request_id in refused:
            assert rec.token_times == [] and w.request_id not in core.requests
            continue
        assert len(rec.token_times) == w.output_len, w.request_id
        assert rec.finish_reason == "stop"  # EOS sampled at the true length
        assert rec.token_times[0] > w.arrival_s
        assert rec.token_times == sorted(rec.token_times)
        assert rec.finish_s == rec.token_times[-1]
        r = core.requests[w.request_id]
        assert r.status is RequestStatus.FINISHED and r.num_output_tokens == w.output_len
        assert rec.num_preemptions == r.num_preemptions
    # No KV leak: every block back in the pool, nothing left running or waiting.
    core.kv.check_invariants()
    assert core.kv.num_used_blocks == 0
    assert all(not t for t in core.kv.owners().values())
    assert not core.has_work() and core.running == [] and len(core.waiting) == 0
    assert core.on_worker == set()


@pytest.mark.unit
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_finishes_every_request_exactly(policy, profile, workload, captured_cores) -> None:
    result = simulate(workload, profile, SimConfig(policy=policy))
    assert result.policy == policy and result.summary["policy"] == policy
    [core] = captured_cores
    _check_run(result, workload, core)
    its = result.metrics.iterations
    assert its and all(i.duration_s > 0 and i.forward_tokens > 0 for i in its)
    # The virtual clock only moves forward, one iteration after another.
    for a, b in zip(its, its[1:]):
        assert b.start_s >= a.start_s + a.duration_s - 1e-12


@pytest.mark.unit
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_is_deterministic(policy, profile, workload) -> None:
    a = simulate(workload, profile, SimConfig(policy=policy))
    b = simulate(workload, profile, SimConfig(policy=policy))
    strip = lambda s: {k: v for k, v in s.items() if k not in NONDETERMINISTIC}  # noqa: E731
    assert strip(a.summary) == strip(b.summary)
    for rid, rec in a.metrics.requests.items():
        assert b.metrics.requests[rid].token_times == rec.token_times


@pytest.mark.unit
def test_vllm_never_exceeds_its_2048_token_budget(profile, workload, captured_cores) -> None:
    result = simulate(workload, profile, SimConfig(policy="vllm"))
    [core] = captured_cores
    assert isinstance(core.policy, VLLMPolicy) and core.policy.config.max_num_batched_tokens == 2048
    tokens = [i.forward_tokens for i in result.metrics.iterations]
    assert max(tokens) <= 2048
    # A tuned budget (vllm@512) is held and filled: long prompts are chunked to it.
    tuned = simulate(workload, profile, SimConfig(policy="vllm@512"))
    assert captured_cores[1].policy.config.max_num_batched_tokens == 512
    assert max(i.forward_tokens for i in tuned.metrics.iterations) == 512


@pytest.mark.unit
def test_sarathi_never_exceeds_its_static_budget(profile, workload, captured_cores) -> None:
    result = simulate(workload, profile, SimConfig(policy="sarathi"))
    [core] = captured_cores
    assert isinstance(core.policy, SarathiPolicy)
    # Sized for the tightest class (50 ms) on the shipped profile: the largest S with
    # 18.1025 + 0.101912 S + 7.1223e-6 S^2 <= 47.5 ms; the root is S = 282.9 -> 282.
    assert core.policy.token_budget == 282
    tokens = [i.forward_tokens for i in result.metrics.iterations]
    assert max(tokens) <= 282
    assert max(tokens) == 282


@pytest.mark.unit
def test_sarathi_explicit_budget(profile, workload) -> None:
    from accelgen.core.policies.sarathi import SarathiConfig

    result = simulate(workload, profile, SimConfig(policy="sarathi", policy_config=SarathiConfig(token_budget=500)))
    assert max(i.forward_tokens for i in result.metrics.iterations) <= 500
    assert result.summary["num_finished"] == len(workload)


@pytest.fixture(scope="module")
def small_kv_profile(profile: DeviceProfile) -> DeviceProfile:
    # The shipped cost model with only 24 KV blocks (3072 tokens): long prompts crowd the cache.
    return DeviceProfile.from_dict({**profile.to_dict(), "kv_capacity_tokens": 128 * 24})


@pytest.fixture(scope="module")
def crowded_workload() -> list[WorkloadRequest]:
    return paper_mix(rate=4.0, duration_s=6.0, seed=3, data_dir=SAMPLE)


@pytest.mark.unit
def test_oracle_never_preempts_where_vllm_must(small_kv_profile, crowded_workload, captured_cores) -> None:
    vllm = simulate(crowded_workload, small_kv_profile, SimConfig(policy="vllm"))
    assert vllm.summary["preemptions"] > 0  # the cache really is too small for FCFS admission
    oracle = simulate(crowded_workload, small_kv_profile, SimConfig(policy="oracle"))
    assert oracle.summary["preemptions"] == 0
    assert all(r.num_preemptions == 0 for r in captured_cores[1].requests.values())
    _check_run(vllm, crowded_workload, captured_cores[0])
    _check_run(oracle, crowded_workload, captured_cores[1])


@pytest.mark.unit
@pytest.mark.parametrize("policy", ["accelgen", "sarathi", "edf"])
def test_policies_under_kv_pressure_still_finish_without_leaks(policy, small_kv_profile, crowded_workload, captured_cores) -> None:
    result = simulate(crowded_workload, small_kv_profile, SimConfig(policy=policy))
    _check_run(result, crowded_workload, captured_cores[0])


@pytest.mark.unit
def test_make_policy_errors(profile) -> None:
    catalog = SLOCatalog()
    with pytest.raises(ValueError, match="output length"):
        make_policy("oracle", profile, catalog)
    with pytest.raises(ValueError) as err:
        make_policy("fifo", profile, catalog)
    msg = str(err.value)
    assert "fifo" in msg
    for name in POLICY_NAMES:
        assert name in msg
    assert make_policy("oracle", profile, catalog, output_lengths={}).name == "oracle"
    for name in POLICY_NAMES:
        kwargs = {"output_lengths": {}} if name == "oracle" else {}
        assert make_policy(name, profile, catalog, **kwargs).name == name


@pytest.mark.unit
def test_simulate_unknown_policy_raises(profile, workload) -> None:
    with pytest.raises(ValueError):
        simulate(workload, profile, SimConfig(policy="nope"))


@pytest.mark.unit
def test_cost_model_executor_emits_eos_at_the_true_length(profile) -> None:
    ex = CostModelExecutor(profile, output_lengths={"a": 3}, prompt_lengths={"a": 10})

    def chunk(k: int, q: int) -> ScheduledChunk:
        return ScheduledChunk("a", k, q, (), (), k == 0, True)

    # Output index = tokens computed after the chunk - prompt: 0, 1, 2; EOS (2) at index 2 = 3 - 1.
    toks = [ex.execute(BatchPlan(i, [chunk(k, q)])).sampled_token_ids["a"] for i, (k, q) in enumerate([(0, 10), (10, 1), (11, 1)])]
    assert toks[:2] != [simulator.EOS_TOKEN_ID] * 2 and simulator.EOS_TOKEN_ID not in toks[:2]
    assert toks[2] == simulator.EOS_TOKEN_ID
    r = ex.execute(BatchPlan(9, [chunk(0, 10)]))
    assert r.elapsed_s == pytest.approx(profile.forward_time_s(10))


@pytest.mark.unit
def test_empty_workload(profile) -> None:
    result = simulate([], profile, SimConfig(policy="accelgen"))
    assert result.summary["num_requests"] == 0 and result.summary["iterations"] == 0
