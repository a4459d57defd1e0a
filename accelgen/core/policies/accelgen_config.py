"""AccelGen's settings: every threshold and every mechanism switch is a named field here, so
the simulator's ablations, the service's configuration and the docs name the same things."""

from __future__ import annotations

from dataclasses import dataclass, field

from accelgen.core.admission import AdmissionConfig
from accelgen.core.budget import BudgetConfig
from accelgen.core.length_estimate import LengthEstimateConfig

VICTIM_RULES = ("vllm", "slo")


@dataclass(frozen=True, slots=True)
class AccelGenConfig:
    prioritise: bool = True
    """Mechanism 2: order by T_r and always batch urgent requests (off: FCFS, running first)."""
    slo_grouping: bool = True
    """Mechanism 2: keep tighter-SLO requests out of a batch formed for a looser SLO."""
    dynamic_chunking: bool = True
    """Mechanism 1: budget from SLO_min each iteration (off: static budget of the tightest class)."""
    time_guard: bool = True
    """Price the exact batch (attention and KV reads included) with the cost model and keep it
    within SLO_min less the margin. The paper's S_b counts tokens only, which on a real profile
    lets a batch of long-context decodes overrun SLO_min; the guard is what makes the chunking
    SLO-*guaranteed*."""
    era: bool = True
    """Mechanism 1: exclusive request allocation, at most ``era_cap`` long prefills at once."""
    era_cap: int = 1
    multi_resource: bool = True
    """Mechanism 3: Euclidean (compute, KV) pick after the urgent requests (off: T_r order)."""
    victim: str = "vllm"
    """Preemption victim: "vllm" (newest running, the paper's default) or "slo" (most slack)."""
    candidate_window: int = 32
    """How many waiting requests (in queue order) are considered each iteration. 32, not 64:
    the same attainment on paper-mix at 2.5 and 8 req/s, and the Euclidean pick, quadratic in
    the candidates it prices, costs about a third less of the decision (p99 1.5 -> 1.1 ms at 8 req/s)."""
    kv_headroom_tokens: int = 128
    """Expected output tokens reserved in KV per request at admission: a new request is admitted
    only if its prompt plus this headroom, and the headroom of every running request, fit."""
    triage: bool = True
    """Extension (the paper's open question on overload): a waiting request whose first-token
    deadline has already passed is served after those that can still make theirs, in arrival
    order, instead of first — least-T_r-first under overload otherwise serves only the late."""
    demote_late: bool = True
    """Extension (overload): a request whose first token came late (or that is triaged late
    while waiting) has missed its SLO whatever happens next, so it becomes best-effort: it is
    never urgent and no longer sets SLO_min, the budget or the pace of the batch. Without
    this one late chat request holds every iteration to 50 ms for the rest of its output, and
    under overload the device serves every class equally badly."""
    eager_decodes: bool = False
    """Run non-urgent decodes before new prefills (they free KV sooner); off: prefills first,
    non-urgent decodes take what is left and otherwise wait until they become urgent."""
    jct_expected_output_tokens: int = 128
    """Estimated output length of a JCT request, for T_e (the length is unknown in advance)."""
    adaptive_margin: bool = True
    """Widen the time guard's safety margin to cover the scatter of measured around predicted
    iteration time (``timing_margin``): the 99th percentile of recent iterations lands within
    the SLO. Off: the fixed ``budget.safety_margin``, which real timing noise overruns."""
    te_batch_pace: bool = True
    """``T_e`` counts the remaining prompt chunks at the pace of the batch the request will run
    in (chunks of the budget, and iterations of the time, of the tightest running SLO), not at
    its own SLO's: a summarisation prompt beside chat decodes is cut into chat-sized chunks,
    so it needs many more iterations than its own budget suggests (off: its own budget's chunks,
    at most ``T_max`` each; the estimate before this fix)."""
    admission: bool = True
    """Beyond the paper: refuse at submit a request whose first token cannot be on time given
    the prefill work ahead of it in this policy's order (``core.admission``)."""
    admission_config: AdmissionConfig = field(default_factory=AdmissionConfig)
    length_estimates: bool = False
    """Beyond the paper (its first open question): learn output lengths per class (and prompt
    bin) from finished requests and use the estimate where the oracle uses the truth: the KV
    reserve (instead of ``kv_headroom_tokens``), ``T_e`` of JCT requests, and the preemption
    victim (the request expected to run longest, never one about to finish)."""
    length_config: LengthEstimateConfig = field(default_factory=LengthEstimateConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if self.victim not in VICTIM_RULES:
            raise ValueError(f"victim must be one of {', '.join(VICTIM_RULES)}, got {self.victim!r}")
        for name, low in (("era_cap", 1), ("candidate_window", 1), ("kv_headroom_tokens", 0),
                          ("jct_expected_output_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        for name, kind in (("admission_config", AdmissionConfig), ("length_config", LengthEstimateConfig),
                           ("budget", BudgetConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
