"""The per-iteration token budget (paper, mechanism 1).

``S_b = S_pf * SLO_min / T_pf``: the pivot forward size scaled by how much time the tightest
request in the batch allows. Above the pivot the device is saturated and time grows linearly
with the forward size, so the budget is the largest batch that still finishes within SLO_min.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from accelgen.core.profile import DeviceProfile


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    safety_margin: float = 0.05
    """Fraction of SLO_min kept free when the profile table decides the budget."""
    max_forward_tokens: int = 8192
    """Hard cap on one iteration's forward size (also the budget of JCT-only batches)."""
    knee_fraction: float | None = None
    """Knee criterion for ``S_pf``: the smallest forward size reaching this fraction of the peak
    tokens/s (None: the profile's own, 0.95). A lower value moves the pivot down, so the paper's
    linear formula (used above ``T_pf``) gives smaller budgets."""
    guard_with_profile: bool = True
    """Also cap the paper's linear formula by the profiled T(S_f) <= SLO_min * (1 - margin).

    The formula assumes T grows proportionally above the pivot; attention makes large
    forwards grow faster, so without the guard a loose SLO can be overshot.
    """

    def __post_init__(self) -> None:
        if not 0 <= self.safety_margin < 1:
            raise ValueError("safety_margin must be in [0, 1)")
        if self.max_forward_tokens < 1:
            raise ValueError("max_forward_tokens must be >= 1")
        if self.knee_fraction is not None and not 0 < self.knee_fraction <= 1:
            raise ValueError("knee_fraction must be in (0, 1]")


class TokenBudget:
    """Maps an iteration SLO to the number of tokens one iteration may carry."""

    def __init__(self, profile: DeviceProfile, config: BudgetConfig | None = None) -> None:
        self.profile = profile
        self.config = config or BudgetConfig()
        self._cache: dict[float | None, int] = {}
        self.s_pf, self.t_pf_s = profile.pivot(self.config.knee_fraction)

    def paper_formula(self, slo_min_s: float) -> int:
        """The paper's ``S_pf * SLO_min / T_pf``, floored."""
        return int(math.floor(self.s_pf * slo_min_s / self.t_pf_s))

    def for_slo(self, slo_min_s: float | None) -> int:
        """Token budget of an iteration whose tightest iteration SLO is ``slo_min_s``.

        Below ``T_pf`` the linear model is optimistic, so the profile table decides: the largest
        forward size that runs within SLO_min less the safety margin. Never below one token: a
        decode must always be able to run, even if its SLO is unattainable on this device.
        """
        cached = self._cache.get(slo_min_s)
        if cached is not None:
            return cached
        cfg = self.config
        if slo_min_s is None:
            tokens = cfg.max_forward_tokens
        else:
            within = self.profile.max_tokens_within(slo_min_s * (1.0 - cfg.safety_margin))
            if slo_min_s >= self.t_pf_s:
                tokens = self.paper_formula(slo_min_s)
                if cfg.guard_with_profile:
                    tokens = min(tokens, within)
            else:
                tokens = within
        tokens = max(1, min(tokens, cfg.max_forward_tokens))
        self._cache[slo_min_s] = tokens
        return tokens

    def iteration_time_s(self, slo_min_s: float | None) -> float:
        """Predicted time of a full iteration at the budget for ``slo_min_s``."""
        return self.profile.forward_time_s(self.for_slo(slo_min_s))
