"""`accelgen profile`'s measurement, on the sim executor whose true cost model is known."""

from __future__ import annotations

import pytest

from accelgen.core.budget import TokenBudget
from accelgen.core.profile import CostCoefficients, DeviceProfile
from worker_service.executors.sim import SimExecutor
from worker_service.profiler import Profiler

# A device slow enough that sleep granularity is negligible: T(S) = 20 ms + 0.05 ms * S.
TRUE = DeviceProfile(name="true", coefficients=CostCoefficients(base_ms=20.0, per_token_ms=0.05, decode_ctx_ms=0.002),
                     kv_capacity_tokens=128 * 400, block_size=128, max_model_len=2048, knee_search_max_tokens=1024)


@pytest.mark.unit
def test_profile_recovers_the_cost_model_and_the_pivot() -> None:
    executor = SimExecutor(profile=TRUE, time_scale=1.0)
    measured = Profiler(executor, repeats=1).run("measured", grid=(16, 128, 512, 1024), decode_batch=4)
    assert measured.coefficients.base_ms == pytest.approx(20.0, rel=0.25)
    assert measured.coefficients.per_token_ms == pytest.approx(0.05, rel=0.25)
    assert measured.coefficients.decode_ctx_ms == pytest.approx(0.002, rel=0.6)
    # The knee of the measured table lies where the true model's does: by hand, S/(20 + 0.05 S)
    # peaks at S = 1024 (14.38 tok/ms); 95% of that is first reached near S = 862.
    assert 848 <= TRUE.s_pf <= 880
    assert abs(measured.s_pf - TRUE.s_pf) <= 48
    assert measured.num_blocks == TRUE.num_blocks == 401  # 400 usable + the reserved null block
    # Round trip: the scheduler loads what the profiler wrote and budgets with it.
    loaded = DeviceProfile.from_dict(measured.to_dict())
    assert TokenBudget(loaded).for_slo(0.045) == TokenBudget(measured).for_slo(0.045) > 0
