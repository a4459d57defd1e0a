"""Policies by name: the one place that knows them all.

A policy can be named with settings a comparison varies, in one string the CLI and the
benchmarks share: ``NAME[@BUDGET][+admission]``. ``vllm@512`` is vLLM with a 512-token budget
(``max_num_batched_tokens``), ``sarathi@384`` Sarathi-Serve with a 384-token chunk budget,
``vllm+admission`` vLLM behind the same SLO-aware admission AccelGen uses by default (any
policy can take it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from accelgen.core.admission import AdmissionControl
from accelgen.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
from accelgen.core.policies.base import Policy
from accelgen.core.policies.edf import EDFConfig, EDFPolicy
from accelgen.core.policies.oracle import OraclePolicy
from accelgen.core.policies.sarathi import SarathiConfig, SarathiPolicy
from accelgen.core.policies.vllm_fcfs import VLLMConfig, VLLMPolicy, VLLMPriorityPolicy
from accelgen.core.profile import DeviceProfile
from accelgen.core.slo import SLOCatalog

POLICY_NAMES: tuple[str, ...] = ("accelgen", "vllm", "vllm-priority", "sarathi", "edf", "oracle")
_BUDGETED = ("vllm", "vllm-priority", "sarathi", "edf")  # static-budget policies: NAME@BUDGET


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A policy name with the settings a comparison varies (parsed from ``NAME[@B][+admission]``)."""

    name: str
    token_budget: int | None = None
    admission: bool = False

    @classmethod
    def parse(cls, text: str) -> "PolicySpec":
        raw = text.strip()
        body, plus, extra = raw.partition("+")
        if plus and extra != "admission":
            raise ValueError(f"policy {raw!r}: the only suffix is '+admission', got '+{extra}'")
        name, at, budget_s = body.partition("@")
        if name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
        budget = None
        if at:
            if name not in _BUDGETED:
                raise ValueError(f"policy {raw!r}: only {', '.join(_BUDGETED)} take a static budget (NAME@TOKENS)")
            try:
                budget = int(budget_s)
            except ValueError:
                raise ValueError(f"policy {raw!r}: the budget after '@' must be a whole number of tokens") from None
            if budget < 1:
                raise ValueError(f"policy {raw!r}: the budget must be >= 1 token")
        return cls(name, budget, bool(plus))


def make_policy(
    name: str,
    profile: DeviceProfile,
    catalog: SLOCatalog,
    *,
    config: Any = None,
    output_lengths: Mapping[str, int] | None = None,
) -> Policy:
    """Build a policy by name or spec string (``NAME[@BUDGET][+admission]``). ``oracle`` needs
    ``output_lengths`` (simulator only). ``config`` is the policy's own config object."""
    spec = PolicySpec.parse(name)
    config = _with_spec(spec, config)
    factories: dict[str, Callable[[], Policy]] = {
        "accelgen": lambda: AccelGenPolicy(profile, catalog, config),
        "vllm": lambda: VLLMPolicy(profile, catalog, config),
        "vllm-priority": lambda: VLLMPriorityPolicy(profile, catalog, config),
        "sarathi": lambda: SarathiPolicy(profile, catalog, config),
        "edf": lambda: EDFPolicy(profile, catalog, config),
        "oracle": lambda: _oracle(profile, catalog, config, output_lengths),
    }
    policy = factories[spec.name]()
    if spec.admission and policy.admission is None:
        # The baselines get the same admission control AccelGen builds for itself.
        policy.admission = AdmissionControl(profile.s_pf / profile.t_pf_s, AccelGenConfig().admission_config)
    return policy


def _with_spec(spec: PolicySpec, config: Any) -> Any:
    """The policy config with the spec's settings applied."""
    if spec.name in ("accelgen", "oracle"):
        if spec.admission:
            return dataclasses.replace(config or AccelGenConfig(), admission=True)
        return config
    if spec.token_budget is None:
        return config
    if spec.name in ("vllm", "vllm-priority"):
        return dataclasses.replace(config or VLLMConfig(), max_num_batched_tokens=spec.token_budget)
    if spec.name == "sarathi":
        return dataclasses.replace(config or SarathiConfig(), token_budget=spec.token_budget)
    return dataclasses.replace(config or EDFConfig(), token_budget=spec.token_budget)


def _oracle(
    profile: DeviceProfile, catalog: SLOCatalog, config: AccelGenConfig | None, lengths: Mapping[str, int] | None
) -> Policy:
    if lengths is None:
        raise ValueError("the oracle policy needs every request's output length; only the simulator can run it")
    return OraclePolicy(profile, catalog, lengths, config)
