"""vLLM V1's schedulers, the baselines users run today: the default FCFS policy and the
``priority`` policy.

FCFS (the default): running requests first, in admission order, each taking what it needs of a
static token budget (``max_num_batched_tokens``; chunked prefill splits a prompt that does not
fit); then waiting requests first-come-first-served until the budget, the sequence limit or the
KV cache runs out. When a running request cannot get a block, the most recently admitted one is
preempted by recompute; no new request is admitted in an iteration that preempted. Defaults are
vLLM 0.32's for an A100 behind the OpenAI server (2048 tokens, 256 sequences).

Priority (``--scheduling-policy priority``): the same loop, but the waiting queue is ordered by
(priority, arrival) and the victim of a preemption is the running request with the largest
(priority, arrival). SLO-tiered gateways feed vLLM exactly this today (a tier mapped to a
priority), so it is the strongest thing a user could pick instead of an SLO-aware scheduler.
Here a request's priority is its SLO group (the log2 band of its TBT): tighter runs first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accelgen.core.batch_builder import BatchBuilder
from accelgen.core.policies.base import Policy
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request, RequestStatus
from accelgen.core.slo import SLOCatalog

VLLM_DEFAULT_BUDGET = 2048


@dataclass(frozen=True, slots=True)
class VLLMConfig:
    max_num_batched_tokens: int = VLLM_DEFAULT_BUDGET

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


class VLLMPolicy(Policy):
    name = "vllm"

    def __init__(self, profile: DeviceProfile, catalog: SLOCatalog, config: VLLMConfig | None = None) -> None:
        super().__init__(profile, catalog)
        self.config = config or VLLMConfig()

    def fill(self, batch: BatchBuilder, now: float) -> None:
        batch.set_budget(self.config.max_num_batched_tokens)
        core = self.bound
        preempted_any = False
        for request in list(core.running):
            if batch.tokens_left <= 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            _, preempted = self.schedule_running_or_preempt(batch, request, self.victim)
            preempted_any |= preempted
        if preempted_any:
            return
        admit_fcfs(batch)

    def victim(self, batch: BatchBuilder, needy: Request) -> Request | None:
        return self.newest_running_victim(batch, needy)


class VLLMPriorityPolicy(VLLMPolicy):
    name = "vllm-priority"

    def queue_key(self, request: Request, preempted: bool) -> Any:
        return (request.group, request.arrival_s)

    def victim(self, batch: BatchBuilder, needy: Request) -> Request | None:
        running = self.bound.running
        return max(running, key=lambda r: (r.group, r.arrival_s)) if running else None


def admit_fcfs(batch: BatchBuilder) -> None:
    """Admit waiting requests in queue order; the first that does not fit blocks the rest."""
    core = batch.core
    slots = core.config.max_num_seqs - len(core.running)
    for request in core.waiting.head(max(0, slots)):
        if batch.tokens_left <= 0 or not batch.can_admit_more():
            return
        if batch.schedule(request) == 0:
            return
