"""Device profile (cost model, knee S_pf, T_pf) and the paper's token budget S_b.

The hand-made profile has T(S) = 10 + 0.1*S ms (no attention, no KV reads). Worked numbers:

* Knee on the 16-token grid up to 1024: tokens/ms r(S) = S / (10 + 0.1 S) grows with S, so the
  peak is at the last grid point, r(1024) = 1024 / 112.4 = 9.11032. 95% of it is 8.65480.
  r(640) = 640 / 74 = 8.64865 < 8.65480, r(656) = 656 / 75.6 = 8.67725 >= 8.65480,
  so S_pf = 656 and T_pf = T(656) = 10 + 65.6 = 75.6 ms.
* S_b = S_pf * SLO / T_pf = 656 * SLO / 0.0756 = 8677.25 * SLO.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from accelgen.core.budget import BudgetConfig, TokenBudget
from accelgen.core.kv_blocks import KVBlockManager
from accelgen.core.profile import BatchCost, CostCoefficients, DeviceProfile
from accelgen.profiles import DEFAULT_PROFILE, available_profiles, load_profile

pytestmark = pytest.mark.unit


def linear_profile(**kw) -> DeviceProfile:
    args = dict(
        name="linear-test",
        coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1),
        kv_capacity_tokens=128 * 100,
        block_size=128,
        knee_search_max_tokens=1024,
    )
    args.update(kw)
    return DeviceProfile(**args)


# -- cost model --------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("tokens", "seconds"), [(1, 0.0101), (100, 0.020), (656, 0.0756), (1000, 0.110)])
def test_forward_time_is_base_plus_per_token(tokens: int, seconds: float) -> None:
    assert linear_profile().forward_time_s(tokens) == pytest.approx(seconds)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("time_s", "tokens"),
    [
        (0.05005, 400),  # 10 + 0.1 S <= 50.05  ->  S <= 400.5
        (0.0105, 5),  # S <= 5
        (0.0101, 1),  # exactly one token fits (T(1) = 10.1 ms); T(2) = 10.2 ms does not
        (0.0100, 0),  # T(1) = 10.1 ms > 10 ms: nothing fits
        (0.2, 1900),  # S <= 1900 (just inside, T(1900) = 200 ms exactly - see tolerance)
    ],
)
def test_max_tokens_within(time_s: float, tokens: int) -> None:
    p = linear_profile()
    got = p.max_tokens_within(time_s)
    if time_s == 0.2:  # exact boundary: float rounding may put 1900 just over 200 ms
        assert got in (1899, 1900)
    else:
        assert got == tokens
    if got:
        assert p.forward_time_s(got) <= time_s
    assert p.forward_time_s(got + 1) > time_s


@pytest.mark.unit
def test_knee_and_t_pf_on_linear_profile() -> None:
    p = linear_profile()
    assert p.s_pf == 656
    assert p.t_pf_s == pytest.approx(0.0756)


@pytest.mark.unit
def test_knee_moves_with_knee_fraction_and_search_range() -> None:
    # knee_fraction = 1: only the peak itself qualifies, which is the last grid point (1024).
    assert linear_profile(knee_fraction=1.0).s_pf == 1024
    # Search up to 512: peak r(512) = 512 / 61.2 = 8.36601, 95% = 7.94771.
    # r(384) = 384 / 48.4 = 7.93388 < 7.94771;  r(400) = 400 / 50 = 8.0 >= 7.94771  ->  400.
    assert linear_profile(knee_search_max_tokens=512).s_pf == 400


@pytest.mark.unit
def test_knee_with_attention_is_before_the_rate_peak() -> None:
    # T(S) = 10 + 0.1 S + 1e-4 S^2 ms: tokens/ms peaks near sqrt(10 / 1e-4) = 316; on the grid the
    # peak is r(320) = 320 / 52.24 = 6.12557, 95% = 5.81929.
    # r(176) = 176 / 30.6976 = 5.73335 < 5.81929;  r(192) = 192 / 32.8864 = 5.83828 >= 5.81929.
    p = linear_profile(coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1, attn_ms=1e-4))
    assert p.s_pf == 192
    assert p.t_pf_s == pytest.approx(0.0328864)


@pytest.mark.unit
def test_batch_time_hand_computed() -> None:
    p = linear_profile(coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1, attn_ms=0.001, decode_ctx_ms=0.01))
    # (100 new, 0 computed): attention 100*100 = 10000 units -> 10 ms
    # (1 new, 49 computed): a decode reading 50 entries -> 0.5 ms
    # (50 new, 100 computed): attention 50*(50 + 200) = 12500 units -> 12.5 ms
    # linear part: 10 + 0.1 * 151 = 25.1 ms.  Total 48.1 ms.
    assert p.batch_time_s([(100, 0), (1, 49), (50, 100)]) == pytest.approx(0.0481)
    # A whole prompt of 100 tokens: 10 + 10 + 10 = 30 ms.
    assert p.forward_time_s(100) == pytest.approx(0.030)
    assert p.batch_time_s([]) == 0.0


@pytest.mark.unit
def test_batch_cost_add_remove_symmetry() -> None:
    p = linear_profile(coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1, attn_ms=0.001, decode_ctx_ms=0.01))
    cost = p.batch_cost()
    assert isinstance(cost, BatchCost)
    assert cost.time_s() == 0.0
    chunks = [(100, 0), (1, 49), (50, 100), (1, 0), (7, 3)]
    predicted = []
    for q, k in chunks:
        predicted.append(cost.time_if_added_s(q, k))
        cost.add(q, k)
        assert cost.time_s() == pytest.approx(predicted[-1])
    assert cost.time_s() == pytest.approx(p.batch_time_s(chunks))
    # Remove in a different order: each removal gives back the time of the remaining batch.
    for q, k in [(50, 100), (100, 0)]:
        cost.remove(q, k)
    assert cost.time_s() == pytest.approx(p.batch_time_s([(1, 49), (1, 0), (7, 3)]))
    for q, k in [(7, 3), (1, 0), (1, 49)]:
        cost.remove(q, k)
    assert (cost.tokens, cost.attn_units, cost.decode_ctx) == (0, 0, 0)
    assert cost.time_s() == 0.0


@pytest.mark.unit
def test_max_chunk_within_hand_computed() -> None:
    p = linear_profile()  # T = 10 + 0.1 S ms
    cost = p.batch_cost()
    cost.add(100, 0)  # 20 ms so far
    # Within 30.05 ms: 10 + 0.1 (100 + q) <= 30.05  ->  q <= 100.5  ->  100.
    assert cost.max_chunk_within(k=0, limit_tokens=500, time_s=0.03005) == 100
    assert cost.max_chunk_within(k=0, limit_tokens=40, time_s=0.03005) == 40  # the limit binds
    assert cost.max_chunk_within(k=0, limit_tokens=0, time_s=1.0) == 0
    assert cost.max_chunk_within(k=0, limit_tokens=10, time_s=0.0200) == 0  # 20.1 ms > 20 ms


@pytest.mark.unit
def test_max_chunk_within_never_overshoots_the_time() -> None:
    p = linear_profile(
        coefficients=CostCoefficients(base_ms=10.0, per_token_ms=0.1, attn_ms=0.01, decode_ctx_ms=0.01)
    )
    cost = p.batch_cost()
    # One token with no context: 10 + 0.1 + 0.01 * 1 = 10.11 ms, fits 10.5 ms. Over k = 1000
    # computed tokens nothing fits: one token is priced as a decode reading 1001 entries,
    # 10.1 + 10.01 = 20.11 ms; two tokens cost 10.2 + attention 2 * (2 + 2000) * 0.01 = 50.24 ms.
    assert cost.time_if_added_s(1, 1000) == pytest.approx(0.02011)
    assert cost.time_if_added_s(2, 1000) == pytest.approx(0.05024)
    n = cost.max_chunk_within(k=1000, limit_tokens=100, time_s=0.0105)
    assert n == 0 or cost.time_if_added_s(n, 1000) <= 0.0105


# -- measured table ----------------------------------------------------------------------------


@pytest.mark.unit
def test_measured_table_interpolates_and_extrapolates() -> None:
    # Points given out of order: the profile sorts them.
    p = linear_profile(measured_forward_ms=((400, 70.0), (100, 20.0), (200, 30.0)))
    assert p.measured_forward_ms == ((100, 20.0), (200, 30.0), (400, 70.0))
    assert p.linear_ms(100) == 20.0  # exact points
    assert p.linear_ms(400) == 70.0
    assert p.linear_ms(150) == pytest.approx(25.0)  # halfway between 20 and 30
    assert p.linear_ms(300) == pytest.approx(50.0)  # halfway between 30 and 70
    assert p.linear_ms(500) == pytest.approx(90.0)  # slope 40/200 beyond 400
    assert p.linear_ms(50) == pytest.approx(15.0)  # slope 10/100 below 100
    # The table replaces base + per_token (base 10, per_token 0.1 would give 25 ms at 150).
    assert p.forward_time_s(150) == pytest.approx(0.025)


@pytest.mark.unit
def test_measured_table_single_point_scales_proportionally_above_it() -> None:
    p = linear_profile(measured_forward_ms=((100, 20.0),))
    assert p.linear_ms(50) == pytest.approx(20.0)  # below the point: not faster than it
    assert p.linear_ms(200) == pytest.approx(40.0)
    assert p.linear_ms(100) == 20.0


@pytest.mark.unit
@pytest.mark.parametrize("points", [((0, 10.0),), ((100, 0.0),), ((100, -1.0),)])
def test_measured_table_rejects_nonpositive_points(points) -> None:
    with pytest.raises(ValueError):
        linear_profile(measured_forward_ms=points)


@pytest.mark.unit
def test_profile_validation() -> None:
    with pytest.raises(ValueError):
        linear_profile(kv_capacity_tokens=64)  # less than one 128-token block
    with pytest.raises(ValueError):
        linear_profile(knee_fraction=0.0)
    with pytest.raises(ValueError):
        CostCoefficients(base_ms=-1.0, per_token_ms=0.1)


@pytest.mark.unit
def test_num_blocks_counts_the_null_block() -> None:
    p = linear_profile(kv_capacity_tokens=128 * 100 + 127)  # a partial block does not count
    assert p.num_blocks == 101
    assert KVBlockManager(p.num_blocks, p.block_size).total_usable_blocks == 100


# -- persistence -------------------------------------------------------------------------------


@pytest.mark.unit
def test_to_dict_from_dict_round_trip(tmp_path: Path) -> None:
    p = linear_profile(
        coefficients=CostCoefficients(base_ms=12.5, per_token_ms=0.08, attn_ms=2e-6, decode_ctx_ms=3e-4),
        measured_forward_ms=((64, 15.0), (512, 52.0)),
        max_model_len=4096,
        knee_fraction=0.9,
        source="unit test",
    )
    d = p.to_dict()
    assert d["derived"]["s_pf"] == p.s_pf
    q = DeviceProfile.from_dict(d)
    assert q == p
    assert (q.s_pf, q.t_pf_s, q.max_model_len, q.knee_fraction, q.source) == (
        p.s_pf, p.t_pf_s, 4096, 0.9, "unit test")  # fmt: skip
    path = tmp_path / "p.json"
    p.save(path)
    assert DeviceProfile.load(path) == p
    assert load_profile(path) == p


@pytest.mark.unit
@pytest.mark.parametrize(
    "data",
    [
        {"name": "x", "kv_capacity_tokens": 1024},  # no coefficients
        {"name": "x", "kv_capacity_tokens": 1024, "coefficients": {"base_ms": 1.0}},  # per_token missing
        {"name": "x", "kv_capacity_tokens": 1024, "coefficients": {"base_ms": 1.0, "per_token_ms": 0.1, "bogus": 1}},
        {"coefficients": {"base_ms": 1.0, "per_token_ms": 0.1}, "kv_capacity_tokens": 1024},  # no name
    ],
)
def test_from_dict_malformed_raises_value_error(data) -> None:
    with pytest.raises(ValueError):
        DeviceProfile.from_dict(data)


@pytest.mark.unit
def test_shipped_profile_is_the_papers_opt13b_pivot() -> None:
    assert DEFAULT_PROFILE in available_profiles()
    p = load_profile()
    assert p.s_pf == 768  # the paper's S_pf for OPT-13B on an A100
    assert p.block_size == 128
    # 66144 tokens / 128 = 516.75 -> 516 usable blocks (+ the reserved null block).
    assert p.num_blocks - 1 == 516
    assert KVBlockManager(p.num_blocks, p.block_size).total_usable_blocks == 516
    assert load_profile(DEFAULT_PROFILE) == p


@pytest.mark.unit
def test_unknown_profile_name() -> None:
    with pytest.raises(FileNotFoundError):
        load_profile("no-such-profile")


# -- the token budget --------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("slo_s", "tokens"),
    [
        (0.2, 1735),  # 656 * 0.2 / 0.0756 = 1735.45
        (0.081, 702),  # 656 * 0.081 / 0.0756 = 702.86
        (0.0756, 656),  # SLO = T_pf gives S_pf (656 * 0.0756 / 0.0756, up to rounding)
        (0.5, 4338),  # 656 * 0.5 / 0.0756 = 4338.62
    ],
)
def test_paper_formula(slo_s: float, tokens: int) -> None:
    got = TokenBudget(linear_profile()).paper_formula(slo_s)
    if slo_s == 0.0756:
        assert got in (655, 656)
    else:
        assert got == tokens


@pytest.mark.unit
def test_budget_above_t_pf_without_guard_is_the_floored_formula() -> None:
    b = TokenBudget(linear_profile(), BudgetConfig(guard_with_profile=False))
    assert b.for_slo(0.2) == 1735
    assert b.for_slo(0.081) == 702
    assert b.for_slo(0.5) == 4338


@pytest.mark.unit
def test_budget_above_t_pf_with_guard_is_min_of_formula_and_table() -> None:
    b = TokenBudget(linear_profile())  # guard on, 5% margin
    # SLO 0.2 s: formula 1735; table: 10 + 0.1 S <= 190 ms -> S <= 1800. min = 1735 (formula).
    assert b.for_slo(0.2) == 1735
    # SLO 0.081 s: formula 702; table: 10 + 0.1 S <= 76.95 ms -> S <= 669.5 -> 669. min = 669 (table).
    assert b.for_slo(0.081) == 669
    assert b.iteration_time_s(0.081) == pytest.approx(0.0769)


@pytest.mark.unit
def test_budget_below_t_pf_uses_the_table_with_margin() -> None:
    for guard in (True, False):
        b = TokenBudget(linear_profile(), BudgetConfig(guard_with_profile=guard))
        # SLO 50.3 ms < T_pf 75.6 ms: 10 + 0.1 S <= 50.3 * 0.95 = 47.785 ms -> S <= 377.85 -> 377
        # (the formula would say 436, and the table without the margin 403).
        assert b.for_slo(0.0503) == 377
    # A 10% margin: 10 + 0.1 S <= 45.27 ms -> S <= 352.7 -> 352.
    assert TokenBudget(linear_profile(), BudgetConfig(safety_margin=0.10)).for_slo(0.0503) == 352
    # No margin, SLO 50.35 ms: S <= 403.5 -> 403.
    assert TokenBudget(linear_profile(), BudgetConfig(safety_margin=0.0)).for_slo(0.05035) == 403


@pytest.mark.unit
def test_budget_none_and_tiny_and_cap() -> None:
    b = TokenBudget(linear_profile())
    assert b.for_slo(None) == 8192  # JCT-only batch: the hard cap
    assert b.for_slo(0.001) == 1  # even one token (10.1 ms) misses 1 ms: a decode must still run
    assert b.for_slo(10.0) == 8192  # formula 86772, capped
    c = TokenBudget(linear_profile(), BudgetConfig(max_forward_tokens=3000))
    assert c.for_slo(None) == 3000
    assert c.for_slo(0.2) == 1735
    assert c.for_slo(1.0) == 3000  # formula 8677, capped
    assert c.iteration_time_s(None) == pytest.approx(0.310)  # T(3000) = 10 + 300 ms


@pytest.mark.unit
def test_budget_is_monotone_in_the_slo() -> None:
    b = TokenBudget(linear_profile())
    slos = [0.005, 0.011, 0.02, 0.0503, 0.07, 0.0756, 0.081, 0.1, 0.2, 0.5, 1.0]
    tokens = [b.for_slo(s) for s in slos]
    assert tokens == sorted(tokens)
    for s, n in zip(slos, tokens):  # the budgeted iteration fits the SLO (when a token fits at all)
        if n > 1:
            assert linear_profile().forward_time_s(n) <= s


@pytest.mark.unit
@pytest.mark.parametrize("bad", [dict(safety_margin=-0.1), dict(safety_margin=1.0), dict(max_forward_tokens=0)])
def test_budget_config_validation(bad) -> None:
    with pytest.raises(ValueError):
        BudgetConfig(**bad)


@pytest.mark.unit
def test_shipped_profile_budgets() -> None:
    p = load_profile()
    b = TokenBudget(p)
    # Paper formula with S_pf = 768 and T_pf = 100.572 ms: 768 * 0.5 / 0.100572 = 3818.16.
    assert b.paper_formula(0.5) == 3818
    # Attention makes large forwards slower than linear: the guard must cut the formula, and the
    # guarded budget is the largest forward within 0.5 s less 5%.
    g = b.for_slo(0.5)
    assert g < 3818
    assert p.forward_time_s(g) <= 0.475 < p.forward_time_s(g + 1)
    # The paper's tightest class (50 ms) is below T_pf: table rule.
    t = b.for_slo(0.05)
    assert p.forward_time_s(t) <= 0.0475 < p.forward_time_s(t + 1)
    assert math.isclose(p.t_pf_s, p.forward_time_s(768))
