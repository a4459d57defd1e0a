"""Capacity search (bench.capacity): bracketing and bisection on functions whose answer is known."""

from __future__ import annotations

import pytest

from bench.capacity import Probe, find_capacity

pytestmark = pytest.mark.unit


def step(threshold: float, calls: list[float]):
    """Attainment 1.0 up to ``threshold`` req/s, then 0.5: the capacity is ``threshold``."""
    def probe(load: float) -> Probe:
        calls.append(load)
        return Probe(load, load, 1.0 if load <= threshold else 0.5)
    return probe


@pytest.mark.parametrize("threshold", [0.3, 1.0, 2.7, 13.0])
def test_capacity_is_within_tolerance_below_the_true_threshold(threshold: float) -> None:
    calls: list[float] = []
    r = find_capacity(step(threshold, calls), target=0.9, start=1.0, rel_tol=0.02)
    assert threshold / 1.02 <= r.capacity_rps <= threshold
    assert r.load == r.capacity_rps
    assert [p.load for p in r.probes] == calls and len(calls) <= 14
    # The answer is a probe that passed, and a probe above it within the tolerance failed.
    assert any(p.load == r.load and p.attainment >= 0.9 for p in r.probes)
    assert any(r.load < p.load <= r.load * 1.02 + 1e-12 and p.attainment < 0.9 for p in r.probes)


def test_linear_attainment_meets_the_target_exactly() -> None:
    # Attainment falls linearly, 1.0 at 0 to 0 at 10 req/s: 90% at exactly 1.0 req/s.
    r = find_capacity(lambda x: Probe(x, x, 1 - x / 10), target=0.9, start=3.0, rel_tol=0.01)
    assert 1.0 / 1.01 <= r.capacity_rps <= 1.0


def test_no_load_passes_gives_zero_and_a_bad_target_is_refused() -> None:
    r = find_capacity(lambda x: Probe(x, x, 0.0), target=0.9, start=1.0, min_load=0.1)
    assert r.capacity_rps == 0.0 and r.probes
    with pytest.raises(ValueError, match="target"):
        find_capacity(lambda x: Probe(x, x, 1.0), target=1.5)


def test_the_reported_rate_is_the_probes_not_the_knob() -> None:
    # A trace's knob is its time scale; capacity is reported in its requests per second.
    r = find_capacity(lambda s: Probe(s, 4.0 * s, 1.0 if s <= 0.5 else 0.0), start=1.0, rel_tol=0.01)
    assert 0.5 / 1.01 <= r.load <= 0.5 and r.capacity_rps == pytest.approx(4.0 * r.load)
