"""Service-level objectives: what a request was promised, and the classes operators name.

A request carries either an *iteration-level* SLO (time to first token and time between
tokens, for streaming applications) or a *job-completion-time* SLO (for batch jobs and
summarisation). The paper's budget formula needs the iteration SLO; a JCT-only request places
no bound on any single iteration, so it never tightens a batch's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency objective of one request, in seconds.

    Either ``ttft_s`` and ``tbt_s`` (iteration-level) or ``jct_s`` (whole job) must be set.
    """

    ttft_s: float | None = None
    tbt_s: float | None = None
    jct_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tbt_s", "jct_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO.{name} must be a positive finite number of seconds, got {value!r}")
        iteration = self.ttft_s is not None and self.tbt_s is not None
        if not iteration and self.jct_s is None:
            raise ValueError("an SLO needs both ttft_s and tbt_s, or jct_s")
        if (self.ttft_s is None) != (self.tbt_s is None):
            raise ValueError("ttft_s and tbt_s must be given together")

    @property
    def iteration_s(self) -> float | None:
        """The bound on every iteration this request takes part in (None for JCT-only)."""
        return self.tbt_s


@dataclass(frozen=True, slots=True)
class SLOClass:
    """An application class an operator names, with its default SLO."""

    name: str
    slo: SLO


def _tbt_class(name: str, tbt_s: float, ttft_s: float) -> SLOClass:
    return SLOClass(name=name, slo=SLO(ttft_s=ttft_s, tbt_s=tbt_s))


# The paper's three TBT classes (0.05 s, 0.1875 s, 0.5 s). The paper gives no TTFT bound;
# [decision] TTFT = 20 x TBT, so an interactive request may queue about a second before its
# first token, a summarisation request ten seconds.
DEFAULT_CLASSES: tuple[SLOClass, ...] = (
    _tbt_class("chat", tbt_s=0.050, ttft_s=1.0),
    _tbt_class("code", tbt_s=0.1875, ttft_s=3.75),
    _tbt_class("summarization", tbt_s=0.500, ttft_s=10.0),
    SLOClass(name="batch", slo=SLO(jct_s=600.0)),
)


@dataclass(frozen=True)
class SLOCatalog:
    """Named classes plus the rule that groups free-form SLOs into bands.

    Requests with similar SLOs are batched together (paper, mechanism 2). A request of a named
    class belongs to that class's group; a free-form SLO falls into a log2 band of its TBT, so
    0.05 s and 0.06 s share a group but 0.05 s and 0.2 s do not.
    """

    classes: tuple[SLOClass, ...] = DEFAULT_CLASSES
    _by_name: dict[str, SLOClass] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {c.name: c for c in self.classes}
        if len(by_name) != len(self.classes):
            raise ValueError("SLO class names must be unique")
        object.__setattr__(self, "_by_name", by_name)

    def get(self, name: str) -> SLOClass:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name))
            raise KeyError(f"unknown application class {name!r}; known classes: {known}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def tightest_iteration_s(self) -> float | None:
        bounds = [c.slo.iteration_s for c in self.classes if c.slo.iteration_s is not None]
        return min(bounds) if bounds else None


def slo_group(slo: SLO) -> int:
    """Group key of an SLO: log2 band of its TBT in milliseconds; JCT-only SLOs form the loosest group.

    Smaller keys are tighter. Grouping by band (not by class name) lets free-form SLOs and
    named classes share one rule.
    """
    if slo.tbt_s is None:
        return 1 << 20
    return int(math.floor(math.log2(max(slo.tbt_s * 1000.0, 1.0))))
