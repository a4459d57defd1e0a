"""Build the Grafana dashboard deploy/grafana/accelgen.json from AccelGen's Prometheus metrics.

    .venv/bin/python scripts/make_grafana_dashboard.py           # rewrite deploy/grafana/accelgen.json
    .venv/bin/python scripts/make_grafana_dashboard.py --check   # exit 1 if the committed JSON is stale
    .venv/bin/python scripts/make_grafana_dashboard.py --out /tmp/accelgen.json

The dashboard is 1000+ lines of JSON; this script is where it is edited. Each panel is written once,
in the section function of its row (``slo_section`` ... ``iterations_section``); ``Layout`` places
the panels on Grafana's 24-column grid left to right, one line after another, and numbers them.
Change a panel here, run the script, and commit both files (tests/unit/test_metrics_export.py checks
that they agree and that every queried metric is exported). deploy/README.md lists the metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "deploy" / "grafana" / "accelgen.json"

GRID_WIDTH = 24  # Grafana's grid columns
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}  # the dashboard's `datasource` variable
RATE = "[$__rate_interval]"
CLASS = 'app_class=~"$app_class"'  # the dashboard's `app_class` variable (multi-select, All = .*)

Json = dict[str, Any]


# -- PromQL ----------------------------------------------------------------------------------
def series(metric: str, matchers: str | None = None) -> str:
    """``metric{matchers}``, or the bare metric (every series) without matchers."""
    return metric if matchers is None else f"{metric}{{{matchers}}}"


def rate_sum(by: str, metric: str, matchers: str | None = None) -> str:
    """Per-second rate of a counter, summed by the labels ``by``."""
    return f"sum by ({by}) (rate({series(metric, matchers)}{RATE}))"


def quantile(q: float, by: str, histogram: str, matchers: str | None = None) -> str:
    """The ``q`` quantile of a histogram (``histogram`` without ``_bucket``) per value of ``by``."""
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({series(histogram + '_bucket', matchers)}{RATE})))"


def class_quantile(q: float, histogram: str) -> str:
    return quantile(q, "app_class", histogram, CLASS)


def worker_quantile(q: float, histogram: str) -> str:
    return quantile(q, "worker", histogram)


# -- panels and their placement ----------------------------------------------------------------
class Target(NamedTuple):
    expr: str
    legend: str


def p50_p99(quantile_of: Callable[[float, str], str], histogram: str, label: str) -> list[Target]:
    """p50 and p99 of ``histogram`` by ``quantile_of`` (class_quantile or worker_quantile)."""
    return [Target(quantile_of(0.5, histogram), f"{{{{{label}}}}} p50"),
            Target(quantile_of(0.99, histogram), f"{{{{{label}}}}} p99")]


class Panel(NamedTuple):
    """One graph (``timeseries``) or number (``stat``); ``w`` columns of the 24. Ratios (unit
    ``percentunit``) get a fixed 0..1 axis."""

    title: str
    targets: Sequence[Target]
    unit: str
    w: int
    description: str = ""
    kind: str = "timeseries"

    def to_json(self, panel_id: int, x: int, y: int, h: int) -> Json:
        bounds = {"min": 0, "max": 1} if self.unit == "percentunit" else {}
        if self.kind == "timeseries":
            options: Json = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "mean"]},
                             "tooltip": {"mode": "multi"}}
        else:
            options = {"reduceOptions": {"calcs": ["lastNotNull"]}}
        return {
            "type": self.kind, "title": self.title, "id": panel_id, "datasource": DATASOURCE,
            "description": self.description, "gridPos": {"x": x, "y": y, "w": self.w, "h": h},
            "fieldConfig": {"defaults": {"unit": self.unit, **bounds}, "overrides": []},
            "options": options,
            "targets": [{"datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend, "refId": chr(ord("A") + i)}
                        for i, t in enumerate(self.targets)],
        }


class Layout:
    """Places rows and lines of panels top to bottom; ids count up from 1 in that order."""

    def __init__(self) -> None:
        self.panels: list[Json] = []
        self._y = 0

    def row(self, title: str) -> None:
        self.panels.append({"type": "row", "title": title, "id": len(self.panels) + 1, "collapsed": False,
                            "gridPos": {"x": 0, "y": self._y, "w": GRID_WIDTH, "h": 1}, "panels": []})
        self._y += 1

    def line(self, *panels: Panel, h: int = 8) -> None:
        """``panels`` side by side from the left edge, each ``h`` high."""
        x = 0
        for panel in panels:
            self.panels.append(panel.to_json(len(self.panels) + 1, x, self._y, h))
            x += panel.w
        if x > GRID_WIDTH:
            raise ValueError(f"a line of {x} columns is wider than the grid ({GRID_WIDTH})")
        self._y += h


# -- the rows ----------------------------------------------------------------------------------
def slo_section(layout: Layout) -> None:
    met = rate_sum("app_class", "accelgen_scheduler_requests_slo_met_total", CLASS)
    finished = rate_sum("app_class", "accelgen_scheduler_requests_finished_total", CLASS)
    layout.row("SLO attainment and goodput per class (scheduler)")
    layout.line(
        Panel("SLO attainment per class", [Target(f"{met} / {finished}", "{{app_class}}")], "percentunit", 12,
              "Finished requests that met their SLO (rule of accelgen load) over all finished, per class. "
              "Refusals are counted separately (Requests refused)."),
        Panel("Goodput per class (tokens/s of SLO-met requests)",
              [Target(rate_sum("app_class", "accelgen_scheduler_goodput_tokens_total", CLASS), "{{app_class}} goodput"),
               Target(rate_sum("app_class", "accelgen_scheduler_output_tokens_total", CLASS), "{{app_class}} throughput")],
              "short", 12,
              "Output tokens/s of requests that met their SLO (request goodput, as vllm bench serve --goodput) "
              "against all output tokens/s."),
    )
    layout.line(
        Panel("Attainment, last 60 s", [Target(series("accelgen_scheduler_slo_attainment_ratio", CLASS), "{{app_class}}")],
              "percentunit", 8, kind="stat"),
        Panel("Requests met / finished per second",
              [Target(met, "{{app_class}} met"), Target(finished, "{{app_class}} finished")], "reqps", 8),
        Panel("Requests refused / cancelled per second",
              [Target(rate_sum("app_class, code", "accelgen_scheduler_requests_refused_total"), "refused {{app_class}} {{code}}"),
               Target(rate_sum("app_class", "accelgen_scheduler_requests_cancelled_total"), "cancelled {{app_class}}"),
               Target(rate_sum("outcome, code", "accelgen_gateway_requests_total", 'outcome!="finished"'),
                      "gateway {{outcome}} {{code}}")],
              "reqps", 8),
        h=6,
    )


def latency_section(layout: Layout) -> None:
    layout.row("Latency per class")
    layout.line(
        Panel("TTFT p50 / p99 per class",
              p50_p99(class_quantile, "accelgen_scheduler_time_to_first_token_seconds", "app_class"), "s", 12,
              "Arrival at the scheduler to the first token (vllm:time_to_first_token_seconds). "
              "Compare with each class's ttft_ms."),
        Panel("TBT p50 / p99 per class",
              p50_p99(class_quantile, "accelgen_scheduler_inter_token_latency_seconds", "app_class"), "s", 12,
              "Gap between consecutive tokens of a request (vllm:inter_token_latency_seconds). "
              "Compare with each class's tbt_ms."),
    )
    layout.line(
        Panel("TTFT p99 seen by the gateway",
              [Target(class_quantile(0.99, "accelgen_gateway_time_to_first_token_seconds"), "{{app_class}} p99")], "s", 12,
              "Arrival at the gateway to the first token received there: includes the Redis write and the hop."),
        Panel("End-to-end latency p50 / p99 per class",
              p50_p99(class_quantile, "accelgen_scheduler_e2e_request_latency_seconds", "app_class"), "s", 12),
    )


def queue_section(layout: Layout) -> None:
    layout.row("Queue and KV cache")
    layout.line(
        Panel("Waiting requests per class (queue depth)",
              [Target(f"sum by (app_class) ({series('accelgen_scheduler_requests_waiting', CLASS)})", "{{app_class}}")],
              "short", 8, "vllm:num_requests_waiting, per class."),
        Panel("Running requests per class",
              [Target(f"sum by (app_class) ({series('accelgen_scheduler_requests_running', CLASS)})", "{{app_class}}")],
              "short", 8),
        Panel("KV cache use per worker", [Target("accelgen_scheduler_kv_cache_usage_ratio", "{{worker}}")], "percentunit", 8,
              "Blocks in use / blocks on the worker, by the scheduler's accounting (vllm:kv_cache_usage_perc)."),
    )


def iterations_section(layout: Layout) -> None:
    layout.row("Iterations")
    layout.line(
        Panel("Iteration (model) time p50 / p99 per worker",
              p50_p99(worker_quantile, "accelgen_scheduler_iteration_seconds", "worker"), "s", 8),
        Panel("Decision time p50 / p99 per worker",
              p50_p99(worker_quantile, "accelgen_scheduler_decision_seconds", "worker"), "s", 8),
        Panel("Time outside the model per iteration",
              [*p50_p99(worker_quantile, "accelgen_scheduler_overhead_seconds", "worker"),
               Target("accelgen_scheduler_overhead_ewma_seconds", "{{worker}} EWMA (policy)")], "s", 8),
    )
    layout.line(
        Panel("Iterations per second per worker",
              [Target(rate_sum("worker", "accelgen_scheduler_iterations_total"), "{{worker}}")], "ops", 8),
        Panel("Preemptions per second per worker",
              [Target(rate_sum("worker", "accelgen_scheduler_preemptions_total"), "{{worker}}")], "ops", 8,
              "vllm:num_preemptions_total"),
        Panel("Workers",
              [Target("accelgen_scheduler_workers_registered", "registered"),
               Target("sum(accelgen_scheduler_worker_up)", "up (scheduler)"),
               Target("sum(accelgen_worker_registered)", "registered (workers' own)"),
               Target("sum(accelgen_scheduler_worker_draining)", "draining")], "short", 8),
    )
    layout.line(
        Panel("Hop latency after the model (p99, recent)",
              [Target(series("accelgen_scheduler_hop_latency_seconds", 'quantile="0.99"'), "{{hop}}")], "s", 12,
              "worker_to_scheduler: result ready -> applied; applied_to_durable: -> in Redis; "
              "applied_to_gateway: -> sent to the gateway."),
        Panel("Worker model time p99 (worker's own) vs scheduler's",
              [Target(quantile(0.99, "instance", "accelgen_worker_iteration_seconds"), "{{instance}} worker"),
               Target(quantile(0.99, "worker", "accelgen_scheduler_iteration_seconds"), "{{worker}} scheduler")], "s", 12),
    )


# -- the dashboard -----------------------------------------------------------------------------
def variables() -> list[Json]:
    """``datasource`` (pick the Prometheus) and ``app_class`` (the classes the scheduler reports)."""
    classes = "label_values(accelgen_scheduler_requests_waiting, app_class)"
    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {},
         "hide": 0, "refresh": 1},
        {"name": "app_class", "label": "class", "type": "query", "datasource": DATASOURCE,
         "query": {"query": classes, "refId": "classes"}, "definition": classes, "includeAll": True, "multi": True,
         "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2, "hide": 0},
    ]


def build() -> Json:
    """The dashboard as Grafana's JSON model."""
    layout = Layout()
    for section in (slo_section, latency_section, queue_section, iterations_section):
        section(layout)
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                      "pluginName": "Prometheus"}],
        "title": "AccelGen", "uid": "accelgen-overview", "tags": ["accelgen", "llm", "slo"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "description": "AccelGen serving: per-class SLO attainment and goodput, TTFT/TBT, queue per class, KV use per "
                       "worker, iteration/decision/overhead time (deploy/README.md lists every metric).",
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "panels": layout.panels,
    }


def render(dashboard: Json) -> str:
    """The file's text, exactly as committed."""
    return json.dumps(dashboard, indent=1) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="exit 1 if --out differs from what this script builds")
    args = ap.parse_args()
    dashboard = build()
    text = render(dashboard)
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} differs from what scripts/make_grafana_dashboard.py builds; "
                  "run .venv/bin/python scripts/make_grafana_dashboard.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(dashboard['panels'])} panels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
