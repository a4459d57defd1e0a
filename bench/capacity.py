"""Capacity: the highest load a policy serves at a target SLO attainment (DistServe's measure).

Attainment falls as load rises, so the capacity at, say, 90% is found by bracketing (doubling
or halving from a start load until one probe passes and one fails) and then bisecting in
geometric steps until the bracket is narrower than ``rel_tol``. The load knob is the Poisson
rate for ``paper-mix`` and the replay speed (``time_scale``) for a trace; either way the result
is reported in requests per second of the workload that was run. Each probe is one seeded
simulation, so a capacity is reproducible; policies are searched in parallel processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from bench.compare import RunSpec, run_one


@dataclass(frozen=True)
class Probe:
    load: float
    """The knob: req/s for paper-mix, time_scale for a trace."""
    rate_rps: float
    """Requests per second at that load: the Poisson rate (paper-mix) or the replayed trace's
    arrivals per second of its window (a trace)."""
    attainment: float


@dataclass(frozen=True)
class CapacityResult:
    capacity_rps: float
    """Requests/s at the highest passing probe (0 if even the lowest load failed)."""
    load: float
    """The knob's value there."""
    probes: list[Probe] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"capacity_rps": self.capacity_rps, "load": self.load,
                "probes": [dataclasses.asdict(p) for p in self.probes]}


def find_capacity(probe: Callable[[float], Probe], target: float = 0.9, start: float = 1.0,
                  rel_tol: float = 0.04, max_probes: int = 14, min_load: float = 1 / 64,
                  max_load: float = 256.0) -> CapacityResult:
    """Bracket then bisect ``probe(load).attainment >= target``; returns the last passing load."""
    if not 0 < target <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    if start <= 0 or rel_tol <= 0:
        raise ValueError("start load and rel_tol must be > 0")
    probes: list[Probe] = []

    def passes(load: float) -> bool:
        p = probe(load)
        probes.append(p)
        return p.attainment >= target

    lo: float | None = None
    hi: float | None = None
    if passes(start):
        lo = start
        while len(probes) < max_probes and lo * 2 <= max_load:
            if passes(lo * 2):
                lo *= 2
            else:
                hi = lo * 2
                break
    else:
        hi = start
        while len(probes) < max_probes and hi / 2 >= min_load:
            if passes(hi / 2):
                lo = hi / 2
                break
            hi /= 2
    if lo is None:
        return CapacityResult(0.0, 0.0, probes)
    while hi is not None and hi / lo - 1 > rel_tol and len(probes) < max_probes:
        mid = math.sqrt(lo * hi)
        if passes(mid):
            lo = mid
        else:
            hi = mid
    best = next(p for p in reversed(probes) if p.load == lo)
    return CapacityResult(best.rate_rps, lo, probes)


def _probe_spec(spec: RunSpec, load: float) -> RunSpec:
    wl = spec.workload
    knob = {"rate": load} if wl.name == "paper-mix" else {"time_scale": load}
    return dataclasses.replace(spec, workload=dataclasses.replace(wl, **knob))


def _start_load(spec: RunSpec) -> float:
    return spec.workload.rate or 1.0 if spec.workload.name == "paper-mix" else spec.workload.time_scale


def capacity_of(spec: RunSpec, target: float = 0.9, rel_tol: float = 0.04) -> CapacityResult:
    """Capacity of one policy (the spec's policy and settings) on the spec's workload."""
    def probe(load: float) -> Probe:
        s = run_one(_probe_spec(spec, load))
        # paper-mix: the Poisson rate itself; a trace: the replayed arrivals per second.
        rate = load if spec.workload.name == "paper-mix" else s["num_requests"] / spec.workload.duration_s
        return Probe(load, rate, s["slo_attainment"])

    return find_capacity(probe, target=target, start=_start_load(spec), rel_tol=rel_tol)


def capacities(specs: Sequence[RunSpec], target: float = 0.9, rel_tol: float = 0.04,
               jobs: int | None = None) -> list[CapacityResult]:
    """``capacity_of`` for each spec, in parallel processes (order kept)."""
    jobs = jobs or min(len(specs), os.cpu_count() or 1)
    if jobs <= 1 or len(specs) <= 1:
        return [capacity_of(s, target, rel_tol) for s in specs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(capacity_of, s, target, rel_tol) for s in specs]
        return [f.result() for f in futures]
