"""Sarathi-Serve: stall-free batching with one static token budget.

Every iteration: all running decodes first (they never stall behind a prefill), then running
partial prefills, then new requests first-come-first-served, all within one static token budget.
To serve several SLOs with one budget, the budget must be sized for the tightest SLO class:
that is what a Sarathi-Serve operator would configure, and what the paper compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelgen.core.batch_builder import BatchBuilder
from accelgen.core.budget import BudgetConfig, TokenBudget
from accelgen.core.policies.base import Policy
from accelgen.core.policies.vllm_fcfs import admit_fcfs
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import RequestStatus
from accelgen.core.slo import SLOCatalog


@dataclass(frozen=True, slots=True)
class SarathiConfig:
    token_budget: int | None = None
    """Static budget; None = the profiled budget of the tightest iteration SLO in the catalog."""
    budget: BudgetConfig = BudgetConfig()


def static_budget_for_tightest(profile: DeviceProfile, catalog: SLOCatalog, budget: BudgetConfig) -> int:
    return TokenBudget(profile, budget).for_slo(catalog.tightest_iteration_s())


class SarathiPolicy(Policy):
    name = "sarathi"

    def __init__(self, profile: DeviceProfile, catalog: SLOCatalog, config: SarathiConfig | None = None) -> None:
        super().__init__(profile, catalog)
        self.config = config or SarathiConfig()
        self.token_budget = self.config.token_budget or static_budget_for_tightest(profile, catalog, self.config.budget)

    def fill(self, batch: BatchBuilder, now: float) -> None:
        batch.set_budget(self.token_budget)
        core = self.bound
        decodes = [r for r in core.running if not r.is_prefilling]
        prefills = [r for r in core.running if r.is_prefilling]
        preempted_any = False
        for request in decodes + prefills:
            if batch.tokens_left <= 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            _, preempted = self.schedule_running_or_preempt(batch, request)
            preempted_any |= preempted
        if not preempted_any:
            admit_fcfs(batch)
