"""The numbers behind docs/vllm_comparison.md: medians over a ``make_vllm_comparison.py`` run's runs.

``build_table`` turns every system's rounds into ``{system: {rate: medians + ratio / added
latency vs vllm serve}}``, leaving out runs during which other jobs took the machine
(``_clean``); ``representative`` picks the run the "where the time goes" table shows;
``_vllm_collapsed`` says whether vllm serve's streaming broke down in this run. Pure functions of
the JSON, shared by the tables (``vllm_comparison_tables``), the analysis
(``vllm_comparison_analysis``) and the report (``vllm_comparison_report``).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

SINGLE = "1 at a time"  # the table key of the one-at-a-time runs


def _rate_name(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


def _clean(row: dict[str, Any]) -> bool:
    """A run during which the rest of the machine (other users' jobs) took no more than 10% of the
    cores is clean; a busy neighbour otherwise decides the result."""
    cpu = row.get("cpu_s", {})
    return cpu.get("rest of machine", 0.0) <= 0.1 * (os.cpu_count() or 1) * cpu.get("wall_s", 0.0)


def _samples(result: dict[str, Any], i: int) -> list[dict[str, Any]]:
    return list(result["rates"][i]["samples"])


def _usable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    clean = [r for r in rows if _clean(r)]
    return clean or rows


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the clean runs (all runs if none is clean), all runs' throughput kept."""
    use = _usable(rows)
    keys = ["output_tok_s", "median_ttft_ms", "p10_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
            "median_itl_ms", "completed", "failed"]
    out = {k: statistics.median(r[k] for r in use) for k in keys}
    out["runs"] = len(rows)
    out["excluded_busy"] = len(rows) - len(use)
    out["output_tok_s_all"] = [round(r["output_tok_s"], 1) for r in rows]
    out["busy_flags"] = [not _clean(r) for r in rows]
    out["median_ttft_ms_all"] = [round(r["median_ttft_ms"], 2) for r in rows]
    return out


def representative(rounds: list[dict[str, Any]], i: int) -> dict[str, Any]:
    """The clean run with the median throughput among all rounds' runs at rate index ``i``."""
    rows = sorted(_usable([s for r in rounds for s in _samples(r, i)]), key=lambda r: r["output_tok_s"])
    return rows[(len(rows) - 1) // 2]


def build_table(results: dict[str, list[dict[str, Any]]], rates: list[float]) -> dict[str, dict[str, Any]]:
    """{system: {rate: medians over every round's runs + ratio / added TTFT vs vllm serve}}; the
    one-at-a-time runs are under the key "1 at a time"."""
    table: dict[str, dict[str, Any]] = {}
    for name, rounds in results.items():
        table[name] = {}
        for i, rate in enumerate(rates):
            table[name][_rate_name(rate)] = _median_row([s for r in rounds for s in _samples(r, i)])
        singles = [r["single"] for r in rounds if r.get("single")]
        if singles:
            table[name][SINGLE] = _median_row(singles)
        probes = [r["probe"] for r in rounds if r.get("probe")]
        if probes:
            later = [x for p in probes for x in p["first_event_ms"][1:] if x is not None]
            table[name]["probe"] = {
                "first_event_ms_median": statistics.median(later) if later else None,
                "first_event_ms_fresh": statistics.median(p["first_event_ms"][0] for p in probes),
                "headers_ms_median": statistics.median(x for p in probes for x in p["headers_ms"][1:]),
                "reads_median": statistics.median(x for p in probes for x in p["reads"][1:]),
                "max_tokens": probes[0]["max_tokens"], "first_event_ms_all": [p["first_event_ms"] for p in probes]}
    base = table["vllm serve"]
    for name, by_rate in table.items():
        for rate, row in by_rate.items():
            b = base.get(rate)
            if b is None or rate == "probe":
                continue
            row["ratio_vs_vllm"] = row["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None
            row["added_median_ttft_ms"] = row["median_ttft_ms"] - b["median_ttft_ms"]
            row["added_median_tpot_ms"] = row["median_tpot_ms"] - b["median_tpot_ms"]
    return table


def _vllm_collapsed(table: dict[str, dict[str, Any]]) -> bool:
    """vllm serve delivered tokens in bunches: a median TPOT below one decode step (~1 ms here) at the
    lowest rate, or fewer socket reads than half the tokens in the keep-alive probe."""
    v = table["vllm serve"]
    low = min((k for k in v if k not in ("probe", SINGLE, "inf")), key=float, default=None)
    probe = v.get("probe") or {}
    return bool((low is not None and v[low]["median_tpot_ms"] < 1.0)
                or (probe and probe["reads_median"] < probe["max_tokens"] / 2))
