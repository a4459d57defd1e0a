"""Policy comparisons over one workload: single rate, rate sweeps and ablations.

Runs are independent, so they are spread over processes; each run is seeded, so a comparison
is reproducible run for run.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bench.simulator import SimConfig, simulate
from bench.workloads import load_workload
from accelgen.core.policies.accelgen import AccelGenConfig
from accelgen.profiles import load_profile

# The fields every policy row carries, in the order tables print them.
HEADLINE = ("throughput_tok_s", "goodput_tok_s", "slo_attainment", "p99_tbt_ms", "mean_jct_s",
            "compute_util", "kv_util", "sched_ms_p99")

@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "paper-mix"
    rate: float | None = 4.0
    duration_s: float = 300.0
    seed: int = 0
    time_scale: float = 1.0
    trace: str | None = None
    slo_mix: Mapping[str, float] | None = None
    long_fraction: float = 0.35
    short_data: str = "alpaca"  # paper-mix only: "alpaca" or "sharegpt" (first turns)
    classes: str = "uniform"  # "uniform" or "by-app" (bench.workloads docstring)

    def build(self, max_model_len: int) -> list:
        paper = self.name == "paper-mix"
        return load_workload(self.name, rate=self.rate if paper else None, duration_s=self.duration_s,
                             seed=self.seed, time_scale=self.time_scale,
                             trace=Path(self.trace) if self.trace else None, slo_mix=self.slo_mix,
                             max_model_len=max_model_len, long_fraction=self.long_fraction,
                             short_data=self.short_data if paper else None, classes=self.classes)


DEFAULT_TIME_NOISE = 0.05
"""Comparisons run with timing noise: each iteration's real time is the cost model's times a
log-normal factor of this sigma (about +-5%), so no policy predicts time perfectly."""


@dataclass(frozen=True)
class RunSpec:
    workload: WorkloadSpec
    policy: str
    """A policy spec, ``NAME[@BUDGET][+admission]`` (``registry.PolicySpec``)."""
    profile: str = "opt-13b_a100-80g"
    policy_overrides: Mapping[str, Any] = field(default_factory=dict)
    """AccelGenConfig fields to change (accelgen and oracle only)."""
    time_noise: float = DEFAULT_TIME_NOISE
    label: str = ""
    workers: int = 1
    routing: str = "least-work"


def run_one(spec: RunSpec) -> dict[str, Any]:
    """One simulation; returns its metrics summary (plain JSON-able data)."""
    profile = load_profile(spec.profile)
    workload = spec.workload.build(profile.max_model_len)
    config = None
    if spec.policy_overrides:
        config = dataclasses.replace(AccelGenConfig(), **spec.policy_overrides)
    sim = SimConfig(policy=spec.policy, policy_config=config, time_noise=spec.time_noise, seed=spec.workload.seed)
    if spec.workers != 1 or spec.routing != "least-work":
        sim = dataclasses.replace(sim, workers=spec.workers, routing=spec.routing)
    result = simulate(workload, profile, sim)
    summary = result.summary
    summary["wall_s"] = result.wall_s
    return summary


def run_many(specs: Sequence[RunSpec], jobs: int | None = None,
             on_done: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Run specs in parallel (order of results = order of specs)."""
    jobs = jobs or min(len(specs), os.cpu_count() or 1)
    if jobs <= 1 or len(specs) <= 1:
        out = []
        for s in specs:
            out.append(run_one(s))
            if on_done:
                on_done()
        return out
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, s) for s in specs]
        results = []
        for f in futures:
            results.append(f.result())
            if on_done:
                on_done()
        return results


EXTRA = ("slo_attainment_by_class", "request_goodput_tok_s", "request_goodput_rps", "p50_ttft_ms",
         "p99_ttft_ms", "preemptions", "kv_unallocated", "num_requests", "num_refused", "p99_tbt_ms_by_class",
         "p50_ttft_ms_by_class", "p99_ttft_ms_by_class", "num_requests_by_class", "request_goodput_rps_by_class",
         "refused_by_class")


def headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary's keys every table and JSON row carries."""
    return {k: summary[k] for k in HEADLINE + EXTRA if k in summary}


def format_table(rows: Mapping[str, Mapping[str, Any]], title: str = "policy") -> str:
    """A fixed-width text table of the headline metrics, one row per entry."""
    cols = [("throughput_tok_s", "thr tok/s", "{:.1f}"), ("goodput_tok_s", "goodput tok/s", "{:.1f}"),
            ("slo_attainment", "SLO att.", "{:.1%}"), ("p99_tbt_ms", "p99 TBT ms", "{:.0f}"),
            ("p50_ttft_ms", "p50 TTFT ms", "{:.0f}"), ("mean_jct_s", "mean JCT s", "{:.1f}"),
            ("compute_util", "compute", "{:.2f}"), ("kv_util", "KV", "{:.2f}"),
            ("preemptions", "preempt", "{:d}"), ("sched_ms_p99", "sched p99 ms", "{:.3f}")]
    width = max([len(title)] + [len(k) for k in rows]) + 2
    head = title.ljust(width) + " ".join(h.rjust(max(len(h), 9)) for _, h, _ in cols)
    lines = [head, "-" * len(head)]
    for name, row in rows.items():  # None: not measured by whoever produced the row
        cells = [("-" if row[key] is None else fmt.format(row[key])).rjust(max(len(h), 9)) for key, h, fmt in cols]
        lines.append(name.ljust(width) + " ".join(cells))
    return "\n".join(lines)


def plot_policies(rows: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [rows[n]["goodput_tok_s"] for n in names], color="tab:blue")
    axes[0].set_ylabel("goodput (tokens/s)")
    axes[1].bar(names, [100 * rows[n]["slo_attainment"] for n in names], color="tab:green")
    axes[1].set_ylabel("SLO attainment (%)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rates: Sequence[float], sweep: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in sweep.items():
        axes[0].plot(rates, [r["goodput_tok_s"] for r in rows], marker="o", label=name)
        axes[1].plot(rates, [100 * r["slo_attainment"] for r in rows], marker="o", label=name)
    axes[0].set_ylabel("goodput (tokens/s)")
    axes[1].set_ylabel("SLO attainment (%)")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
