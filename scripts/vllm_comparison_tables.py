"""The markdown tables of docs/vllm_comparison.md, one function per table (lists of lines).

``fmt_table``: throughput and latency per system and rate; ``fmt_single``: one request at a time;
``fmt_failures``: failed starts and requests; ``fmt_probe``: the keep-alive probe; ``fmt_where``:
engine iterations and CPU seconds per process; ``fmt_profiles``: the py-spy breakdowns.
"""

from __future__ import annotations

from typing import Any

from scripts.vllm_comparison_stats import SINGLE, _rate_name, _samples, representative


def fmt_table(table: dict[str, dict[str, Any]], rates: list[float], names: list[str]) -> list[str]:
    lines = ["| system | rate (req/s) | output tok/s | ratio vs vllm serve | median TTFT (ms) | added median TTFT (ms) "
             "| p99 TTFT (ms) | median TPOT (ms) | ok / sent |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        by_rate = table[name]
        for rate in rates:
            r = by_rate[_rate_name(rate)]
            base = name == "vllm serve"
            spread = ""
            if r["runs"] > 1:
                spread = " (" + ", ".join(f"{x:.0f}" + ("*" if busy else "")
                                          for x, busy in zip(r["output_tok_s_all"], r["busy_flags"])) + ")"
            ratio = "1 (baseline)" if base else f"{r['ratio_vs_vllm']:.2f}x"
            added = "--" if base else f"{r['added_median_ttft_ms']:+.1f}"
            lines.append(
                f"| {name} | {_rate_name(rate)} | {r['output_tok_s']:.0f}{spread} | {ratio} | "
                f"{r['median_ttft_ms']:.1f} | {added} | {r['p99_ttft_ms']:.1f} | "
                f"{r['median_tpot_ms']:.2f} | {r['completed']:.0f} / {r['completed'] + r['failed']:.0f} |")
    return lines


def fmt_single(table: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    lines = ["| system | median TTFT (ms) | added (ms) | p10 TTFT (ms) | median TPOT (ms) | added (ms) | median ITL (ms) "
             "| output tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        r = table[name].get(SINGLE)
        if r is None:
            continue
        base = name == "vllm serve"
        added_ttft = "--" if base else f"{r['added_median_ttft_ms']:+.1f}"
        added_tpot = "--" if base else f"{r['added_median_tpot_ms']:+.2f}"
        lines.append(f"| {name} | {r['median_ttft_ms']:.1f} | {added_ttft} | {r['p10_ttft_ms']:.1f} | "
                     f"{r['median_tpot_ms']:.2f} | {added_tpot} | {r['median_itl_ms']:.2f} | {r['output_tok_s']:.0f} |")
    return lines


def fmt_failures(data: dict[str, Any], results: dict[str, list[dict[str, Any]]], rates: list[float]) -> list[str]:
    """Server starts that failed (and were retried) and runs with failed requests, with their errors."""
    lines = [f"- {f['system']}, round {f['round']}, attempt {f['attempt']}: {f['error']}" for f in data.get("failures", [])]
    for name, rounds in results.items():
        for k, r in enumerate(rounds):
            runs = [x for i in range(len(rates)) for x in _samples(r, i)] + [x for x in (r.get("single"),) if x]
            for x in runs:
                if x.get("failed"):
                    lines.append(f"- {name}, round {k + 1}, rate {x['rate']}: {x['failed']} of "
                                 f"{x['completed'] + x['failed']} requests failed: {x.get('errors_sample')}")
    return (["Failures in this run:", "", *lines, ""]) if lines else []


def fmt_probe(table: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    rows = [(n, table[n]["probe"]) for n in names if table[n].get("probe")]
    if not rows:
        return []
    mt = rows[0][1]["max_tokens"]
    lines = ["| system | response headers (ms) | first event, fresh connection (ms) | first event, reused connection "
             f"(ms) | socket reads per {mt}-token answer |", "|---|---:|---:|---:|---:|"]
    for n, p in rows:
        lines.append(f"| {n} | {p['headers_ms_median']:.1f} | {p['first_event_ms_fresh']:.1f} | "
                     f"{p['first_event_ms_median']:.1f} | {p['reads_median']:.0f} |")
    return lines


def fmt_where(results: dict[str, list[dict[str, Any]]], rates: list[float], names: list[str]) -> list[str]:
    """Engine iterations and CPU seconds per service of one representative run per rate (the clean
    run with the median throughput) and of the first one-at-a-time run."""
    lines = ["| system | run | wall s | engine iterations | ms / iteration | scheduler overhead / iteration (ms, EWMA) "
             "| decision p50 / p99 (ms) | CPU s by process during the run |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in names:
        runs = [(_rate_name(rate), representative(results[name], i)) for i, rate in enumerate(rates)]
        singles = [r["single"] for r in results[name] if r.get("single")]
        if singles:
            runs.append((SINGLE, singles[0]))
        for label, r in runs:
            eng = r.get("scheduler") or r.get("engine") or {}
            sch = r.get("scheduler") or {}
            cpu = {k: v for k, v in r["cpu_s"].items() if k != "wall_s" and v >= 0.05}
            cpu_text = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
            overhead = f"{sch['overhead_ms']:.2f}" if sch else "--"
            decision = f"{sch['sched_ms_p50']:.2f} / {sch['sched_ms_p99']:.2f}" if sch else "--"
            lines.append(
                f"| {name} | {label} | {r['cpu_s']['wall_s']:.1f} | {eng.get('iterations', '?')} | "
                f"{eng.get('ms_per_iteration', float('nan')):.1f} | {overhead} | {decision} | {cpu_text} |")
    return lines


def fmt_profiles(profiles: dict[str, dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for name, prof in profiles.items():
        run = prof["run"]
        lines.append(f"**{name}** -- saturation, {run['completed']} requests, {run['output_tok_s']:.0f} output tok/s "
                     f"under py-spy ({prof['rate_hz']} Hz), run wall {run['cpu_s']['wall_s']:.1f} s. "
                     "Seconds a thread of the service was on-CPU, by what it was doing:")
        lines.append("")
        lines.append("| service | on-CPU s | breakdown (s) |")
        lines.append("|---|---:|---|")
        for svc, s in prof["services"].items():
            if s["active_s"] < 0.05:
                continue
            cats = "; ".join(f"{k} {v:.2f}" for k, v in s["categories"].items() if v >= 0.05)
            lines.append(f"| {svc} | {s['active_s']:.2f} | {cats} |")
        lines.append("")
    return lines
