"""The policy interface: one small contract, every policy one module behind it.

A policy supplies the order of the waiting queue (``queue_key``) and the choice of each batch
(``fill``); the shared mechanics (admission, blocks, budget, cost, preemption) live in
``BatchBuilder`` and ``SchedulerCore``. Policies receive ``now``; they never read a clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from accelgen.core.admission import AdmissionControl
from accelgen.core.batch_builder import BatchBuilder
from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request
from accelgen.core.request_queue import fcfs_key
from accelgen.core.slo import SLOCatalog

if TYPE_CHECKING:
    from accelgen.core.scheduler import SchedulerCore

VictimRule = Callable[[BatchBuilder, Request], Request | None]


class Policy(ABC):
    name: ClassVar[str] = ""

    def __init__(self, profile: DeviceProfile, catalog: SLOCatalog) -> None:
        self.profile = profile
        self.catalog = catalog
        self.core: "SchedulerCore | None" = None
        # Time each iteration spends outside the model (decision, RPC, state write). The service
        # measures it and sets it here; the simulator's clock has none. SLO-aware policies
        # subtract it from the time they give the model.
        self.overhead_s = 0.0
        # Measured / predicted model time of recent iterations: the profile refined online (the
        # paper names a stale profile as a failure mode). 1 in the simulator.
        self.time_correction = 1.0
        # SLO-aware admission (None: accept everything the core accepts). Policies that offer
        # it create one from their config; it is per lane, like the policy.
        self.admission: AdmissionControl | None = None

    def bind(self, core: "SchedulerCore") -> None:
        self.core = core

    @property
    def bound(self) -> "SchedulerCore":
        if self.core is None:
            raise RuntimeError(f"policy {self.name!r} is not bound to a SchedulerCore")
        return self.core

    def queue_key(self, request: Request, preempted: bool) -> Any:
        """Order of the waiting queue; FCFS unless a policy says otherwise."""
        return fcfs_key(request, preempted)

    @abstractmethod
    def fill(self, batch: BatchBuilder, now: float) -> None:
        """Choose this iteration's batch through ``batch.schedule`` / ``batch.preempt``."""

    def after_iteration(self, plan: BatchPlan, result: IterationResult, now: float) -> None:
        """Hook for policies that learn from measured iterations (default: the admission
        control's prefill rate, when admission is on)."""
        if self.admission is not None:
            self.admission.observe(plan, result.elapsed_s, len(self.bound.waiting) > 0)

    def check_admission(self, request: Request, now: float) -> None:
        """Raise ``AdmissionRefused`` if the request should not be accepted (default: accept)."""
        if self.admission is not None:
            self.admission.check(self.bound, request, now)

    def on_finish(self, request: Request) -> None:
        """Hook called once for every request that ends (finished or cancelled)."""

    # -- shared helpers --------------------------------------------------------------------
    def newest_running_victim(self, batch: BatchBuilder, needy: Request) -> Request | None:
        """vLLM's rule: preempt the most recently admitted running request."""
        running = self.bound.running
        return running[-1] if running else None

    def schedule_running_or_preempt(
        self, batch: BatchBuilder, request: Request, victim_rule: VictimRule | None = None
    ) -> tuple[int, bool]:
        """Schedule a running request, preempting victims until its blocks fit.

        Returns (tokens scheduled, whether anything was preempted). Stops when the request
        itself is the victim, as vLLM does.
        """
        rule = victim_rule or self.newest_running_victim
        preempted = False
        while True:
            if batch.tokens_left <= 0:
                return 0, preempted
            n = batch.schedule(request)
            if n > 0:
                return n, preempted
            if batch.last_failure != "kv":
                return 0, preempted
            victim = rule(batch, request)
            if victim is None:
                return 0, preempted
            batch.preempt(victim)
            preempted = True
            if victim is request:
                return 0, preempted
