"""``accelgen top``: a live terminal view of a running stack, from the scheduler's ``/metrics``.

Every ``--interval`` seconds (1 by default) it scrapes the scheduler's Prometheus endpoint
(``metrics_port``; ``accelgen up`` prints its address), parses it with prometheus_client's
parser and redraws one screen: per class the SLO attainment, the queue, TTFT/TBT and goodput;
per worker the KV blocks in use, the iteration, decision and overhead times and preemptions.
Rates and latencies are over the last interval (the first frame, and ``--once``, show them since
the scheduler started). ``--once`` prints a single frame and exits (scripts, tests).

It reads only what a Prometheus server would read: anything it shows can be graphed from the
same metrics (deploy/grafana/accelgen.json).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

DEFAULT_SCHEDULER_METRICS_PORT = 9400  # `accelgen up --metrics-port`; a scheduler's metrics_port
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_SCHEDULER_METRICS_PORT}/metrics"
P = "accelgen_scheduler_"
CLEAR = "\x1b[H\x1b[2J"


@dataclass
class Snapshot:
    """One scrape: every sample by (name, labels), and when it was taken."""

    at: float
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def by(self, name: str, label: str) -> dict[str, float]:
        """``name``'s samples summed per value of ``label``."""
        out: dict[str, float] = defaultdict(float)
        for (n, labels), value in self.samples.items():
            if n == name:
                out[dict(labels).get(label, "")] += value
        return dict(out)

    def buckets(self, name: str, label: str) -> dict[str, list[tuple[float, float]]]:
        """Per value of ``label``: the histogram's cumulative (le, count) pairs, sorted by le."""
        out: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (n, labels), value in self.samples.items():
            if n == name + "_bucket":
                d = dict(labels)
                out[d.get(label, "")].append((float(d["le"]), value))
        return {k: sorted(v) for k, v in out.items()}


def parse(text: str, at: float) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    snap = Snapshot(at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            snap.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return snap


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot:
    """One scrape; ``OSError`` (connection refused, timeout, HTTP error) when it fails."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - an operator's URL
        text = reply.read().decode("utf-8")
    return parse(text, time.time())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` as Prometheus computes it (linear within a bucket); None without samples."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _minus(now: dict[str, list[tuple[float, float]]], before: dict[str, list[tuple[float, float]]]
           ) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for key, pairs in now.items():
        old = dict(before.get(key, []))
        out[key] = [(le, count - old.get(le, 0.0)) for le, count in pairs]
    return out


def _delta(now: dict[str, float], before: dict[str, float] | None) -> dict[str, float]:
    return {k: v - (before or {}).get(k, 0.0) for k, v in now.items()}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def frame(now: Snapshot, before: Snapshot | None, url: str) -> str:
    """One screen: the classes, then the workers. With ``before``, rates and latencies are over
    the interval between the two scrapes; without, since the scheduler started."""
    interval = now.at - before.at if before is not None else None
    prev = before if before is not None else Snapshot(0.0)
    finished = _delta(now.by(P + "requests_finished_total", "app_class"), prev.by(P + "requests_finished_total",
                                                                                    "app_class"))
    met = _delta(now.by(P + "requests_slo_met_total", "app_class"), prev.by(P + "requests_slo_met_total",
                                                                           "app_class"))
    goodput = _delta(now.by(P + "goodput_tokens_total", "app_class"), prev.by(P + "goodput_tokens_total",
                                                                             "app_class"))
    window = now.by(P + "slo_attainment_ratio", "app_class")
    waiting = now.by(P + "requests_waiting", "app_class")
    running = now.by(P + "requests_running", "app_class")
    ttft = _minus(now.buckets(P + "time_to_first_token_seconds", "app_class"),
                  prev.buckets(P + "time_to_first_token_seconds", "app_class"))
    tbt = _minus(now.buckets(P + "inter_token_latency_seconds", "app_class"),
                 prev.buckets(P + "inter_token_latency_seconds", "app_class"))
    classes = sorted(set(waiting) | set(running) | set(finished) | set(window))
    since = f"last {interval:.1f} s" if interval else "since start"
    rows = []
    for c in classes:
        n = finished.get(c, 0.0)
        rows.append([c, f"{n:.0f}", _pct(met.get(c, 0.0) / n if n else None), _pct(window.get(c)),
                     f"{waiting.get(c, 0):.0f}", f"{running.get(c, 0):.0f}",
                     _ms(quantile(0.5, ttft.get(c, []))), _ms(quantile(0.99, ttft.get(c, []))),
                     _ms(quantile(0.5, tbt.get(c, []))), _ms(quantile(0.99, tbt.get(c, []))),
                     f"{goodput.get(c, 0.0) / interval:.1f}" if interval else f"{goodput.get(c, 0.0):.0f} tok"])
    out = [f"accelgen top - {url} - {time.strftime('%H:%M:%S', time.localtime(now.at))} - "
           f"{now.get(P + 'workers_registered') or 0:.0f} worker(s) registered; rates and latencies {since}", "",
           *_table(["class", "finished", "SLO met", "met 60s", "waiting", "running", "TTFT p50", "TTFT p99",
                    "TBT p50", "TBT p99", "goodput tok/s" if interval else "goodput"], rows)]
    out += ["", *_workers(now, prev)]
    return "\n".join(out) + "\n"


def _workers(now: Snapshot, prev: Snapshot) -> list[str]:
    def mean(name: str, worker: str) -> float | None:
        n = (now.get(name + "_count", worker=worker) or 0.0) - (prev.get(name + "_count", worker=worker) or 0.0)
        s = (now.get(name + "_sum", worker=worker) or 0.0) - (prev.get(name + "_sum", worker=worker) or 0.0)
        return s / n if n > 0 else None

    total = now.by(P + "kv_blocks_total", "worker")
    used = now.by(P + "kv_blocks_used", "worker")
    up = now.by(P + "worker_up", "worker")
    draining = now.by(P + "worker_draining", "worker")
    pre = _delta(now.by(P + "preemptions_total", "worker"), prev.by(P + "preemptions_total", "worker"))
    its = _delta(now.by(P + "iterations_total", "worker"), prev.by(P + "iterations_total", "worker"))
    rows = []
    for w in sorted(total):
        kv = f"{used.get(w, 0):.0f}/{total[w]:.0f} ({_pct(used.get(w, 0) / total[w] if total[w] else None)})"
        state = "draining" if draining.get(w) else "up" if up.get(w) else "down"
        rows.append([w, state, kv, f"{its.get(w, 0):.0f}",
                     _ms(mean(P + "iteration_seconds", w)), _ms(mean(P + "decision_seconds", w)),
                     _ms(mean(P + "overhead_seconds", w)), f"{pre.get(w, 0):.0f}"])
    if not rows:
        return ["no worker registered"]
    return _table(["worker", "state", "KV blocks used", "iterations", "iteration ms", "decision ms",
                   "overhead ms", "preemptions"], rows)


def run(args: argparse.Namespace) -> int:
    url = args.scheduler_metrics
    try:
        first = scrape(url)
    except (OSError, ValueError) as exc:
        print(f"accelgen top: cannot read {url}: {_reason(exc)}; start the scheduler with --metrics-port "
              "(accelgen up prints its metrics address) or pass --scheduler-metrics URL", file=sys.stderr)
        return 1
    if args.once:
        sys.stdout.write(frame(first, None, url))
        return 0
    before, now, error = None, first, ""
    try:
        while True:
            sys.stdout.write(CLEAR + frame(now, before, url) + error)
            sys.stdout.flush()
            time.sleep(args.interval)
            try:
                before, now, error = now, scrape(url), ""
            except (OSError, ValueError) as exc:  # a scheduler restarting: the last frame, the error, retry
                error = f"\ncannot read {url}: {_reason(exc)} (retrying every {args.interval:g} s)\n"
    except KeyboardInterrupt:
        return 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def add_command(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser("top", help="live view of a running stack: per-class attainment, queue, KV use, "
                                     "iteration time (from the scheduler's /metrics)", description=__doc__)
    top.add_argument("--scheduler-metrics", default=DEFAULT_URL, metavar="URL",
                     help=f"the scheduler's metrics endpoint (default {DEFAULT_URL}, what accelgen up serves)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=run)
