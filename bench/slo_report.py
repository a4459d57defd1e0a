"""Per-class latency against the SLOs of one run: a table and a figure (``accelgen demo``).

The headline table (``bench.compare.format_table``) pools every class; classes whose SLOs are an
order of magnitude apart need their own view, or a strict class missing its bound hides behind a
lax one. This module turns the per-request records of a run (``accelgen.core.metrics.
RequestRecord``, as ``bench.loadgen`` collects them) into one row per class -- requests, the
class's TTFT/TBT bounds, p50/p99 of TTFT and TBT, attainment -- and a PNG that shows each class's
TTFT and TBT distributions next to its bounds.

Percentiles are numpy's default (linear), as ``MetricsCollector.summary`` computes its per-class
ones, and attainment is ``RequestRecord.attained``: the numbers here and there agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from accelgen.core.metrics import RequestRecord


@dataclass(frozen=True, slots=True)
class ClassLatency:
    """One application class's latencies in a run (milliseconds; None where there were no samples)."""

    app_class: str
    requests: int
    slo_ttft_ms: float | None  # None for a JCT-only class
    slo_tbt_ms: float | None
    slo_jct_s: float | None
    ttft_ms: tuple[float, ...]  # one per request that produced a token
    tbt_ms: tuple[float, ...]   # every gap between consecutive tokens
    attained: int

    @property
    def attainment(self) -> float:
        return self.attained / self.requests if self.requests else 0.0

    def percentile(self, which: str, q: float) -> float | None:
        values = self.ttft_ms if which == "ttft" else self.tbt_ms
        return float(np.percentile(values, q)) if values else None


def class_latencies(records: Iterable[RequestRecord], tbt_tolerance: float = 0.05) -> list[ClassLatency]:
    """One ``ClassLatency`` per class that had a request, sorted by class name.

    A class's bounds are those of its first request (a class's requests share its default SLO
    unless a client sent its own; the demo's do not)."""
    by_class: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_class.setdefault(r.app_class, []).append(r)
    out = []
    for name in sorted(by_class):
        recs = by_class[name]
        slo = recs[0].slo
        ttft = tuple(1000.0 * (r.token_times[0] - r.arrival_s) for r in recs if r.token_times)
        tbt = tuple(1000.0 * (b - a) for r in recs for a, b in zip(r.token_times, r.token_times[1:]))
        out.append(ClassLatency(
            app_class=name, requests=len(recs),
            slo_ttft_ms=None if slo.ttft_s is None else 1000.0 * slo.ttft_s,
            slo_tbt_ms=None if slo.tbt_s is None else 1000.0 * slo.tbt_s,
            slo_jct_s=slo.jct_s, ttft_ms=ttft, tbt_ms=tbt,
            attained=sum(1 for r in recs if r.attained(tbt_tolerance))))
    return out


COLUMNS = ("class", "requests", "SLO TTFT ms", "SLO TBT ms", "p50 TTFT ms", "p99 TTFT ms", "p50 TBT ms",
           "p99 TBT ms", "attainment")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def table_rows(classes: Sequence[ClassLatency]) -> list[list[str]]:
    """The table's cells, one list per class in ``COLUMNS`` order ("-" where nothing was measured)."""
    rows = []
    for c in classes:
        slo_ttft = _ms(c.slo_ttft_ms) if c.slo_jct_s is None else f"JCT {c.slo_jct_s:g} s"
        rows.append([c.app_class, str(c.requests), slo_ttft, _ms(c.slo_tbt_ms),
                     _ms(c.percentile("ttft", 50)), _ms(c.percentile("ttft", 99)),
                     _ms(c.percentile("tbt", 50)), _ms(c.percentile("tbt", 99)), f"{c.attainment:.1%}"])
    return rows


def format_class_table(classes: Sequence[ClassLatency]) -> str:
    """A fixed-width text table, one line per class, under a header and a rule."""
    rows = table_rows(classes)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(COLUMNS)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    head = fmt(COLUMNS)
    return "\n".join([head, "-" * len(head), *(fmt(r) for r in rows)])


def plot_class_latencies(classes: Sequence[ClassLatency], path: Path, title: str) -> Path:
    """Two panels, TTFT and TBT: per class a box of its samples (whiskers at min/max, a diamond at
    p99) and a red bar at the class's bound, attainment under each class name; log scale, since
    the bounds span 50 ms to 10 s. Writes ``path`` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    labels = [f"{c.app_class}\n{c.attainment:.0%} attained\n({c.requests} req)" for c in classes]
    panels = (("ttft", "TTFT", "time to first token (ms)", "slo_ttft_ms"),
              ("tbt", "TBT", "time between tokens (ms)", "slo_tbt_ms"))
    for ax, (which, name, ylabel, bound_attr) in zip(axes, panels):
        data = [list(c.ttft_ms if which == "ttft" else c.tbt_ms) for c in classes]
        positions = np.arange(1, len(classes) + 1)
        ax.boxplot(data, positions=positions, whis=(0, 100), showfliers=False, widths=0.5)
        p99 = [c.percentile(which, 99) for c in classes]
        ax.scatter([p for p, v in zip(positions, p99) if v is not None], [v for v in p99 if v is not None],
                   marker="D", color="tab:blue", zorder=3, label=f"p99 {name}")
        labelled = False
        for pos, c in zip(positions, classes):
            bound = getattr(c, bound_attr)
            if bound is not None:
                ax.hlines(bound, pos - 0.35, pos + 0.35, colors="tab:red", linewidth=2.5, zorder=4,
                          label=None if labelled else f"SLO {name}")
                labelled = True
        ax.set_yscale("log")
        ax.set_xticks(positions, labels)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name} per class against its SLO")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.suptitle(title)
    fig.text(0.5, 0.005, "box: p25-p75 with the median; whiskers: min-max; diamond: p99; red: the class's SLO bound",
             ha="center", va="bottom", fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_class_report(records: Iterable[RequestRecord], out_dir: Path, title: str,
                       tbt_tolerance: float = 0.05) -> str:
    """The per-class table and ``out_dir/slo_by_class.png``; returns the text to print (the table,
    then the figure's path)."""
    classes = class_latencies(records, tbt_tolerance)
    path = plot_class_latencies(classes, out_dir / "slo_by_class.png", title)
    return f"per class, against each class's SLO (client clock):\n{format_class_table(classes)}\n\nfigure: {path}"
