"""Policies by name: the one place that knows them all."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from scheduler_service.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
from scheduler_service.core.policies.base import Policy
from scheduler_service.core.policies.edf import EDFPolicy
from scheduler_service.core.policies.oracle import OraclePolicy
from scheduler_service.core.policies.sarathi import SarathiPolicy
from scheduler_service.core.policies.vllm_fcfs import VLLMPolicy
from scheduler_service.core.profile import DeviceProfile
from scheduler_service.core.slo import SLOCatalog

POLICY_NAMES: tuple[str, ...] = ("accelgen", "vllm", "sarathi", "edf", "oracle")


def make_policy(
    name: str,
    profile: DeviceProfile,
    catalog: SLOCatalog,
    *,
    config: Any = None,
    output_lengths: Mapping[str, int] | None = None,
) -> Policy:
    """Build a policy by name. ``oracle`` needs ``output_lengths`` (simulator only)."""
    factories: dict[str, Callable[[], Policy]] = {
        "accelgen": lambda: AccelGenPolicy(profile, catalog, config),
        "vllm": lambda: VLLMPolicy(profile, catalog, config),
        "sarathi": lambda: SarathiPolicy(profile, catalog, config),
        "edf": lambda: EDFPolicy(profile, catalog, config),
        "oracle": lambda: _oracle(profile, catalog, config, output_lengths),
    }
    try:
        factory = factories[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
    return factory()


def _oracle(
    profile: DeviceProfile, catalog: SLOCatalog, config: AccelGenConfig | None, lengths: Mapping[str, int] | None
) -> Policy:
    if lengths is None:
        raise ValueError("the oracle policy needs every request's output length; only the simulator can run it")
    return OraclePolicy(profile, catalog, lengths, config)
