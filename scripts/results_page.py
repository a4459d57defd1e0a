"""Render docs/results.md and its figures from docs/results.json (made by scripts/make_results.py).

Kept apart from the runs so the page can be re-rendered without re-running an hour of
simulations: `python scripts/results_page.py` reads the JSON and writes the page.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelgen.core.budget import TokenBudget  # noqa: E402
from accelgen.core.slo import SLOCatalog  # noqa: E402
from accelgen.profiles import load_profile  # noqa: E402
from scripts.results_analysis import analysis  # noqa: E402

WORKLOAD_TITLES = {
    "paper-mix": "paper-mix, classes uniform",
    "paper-mix by-app": "paper-mix, classes by application",
    "azure-conv": "azure-conv, time scale 0.5",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def table(rows: dict[str, dict[str, Any]], first: str = "policy") -> str:
    cols = [("slo_attainment", "SLO attainment", _pct), ("request_goodput_rps", "request goodput (req/s)", "{:.3f}".format),
            ("goodput_tok_s", "token goodput (tok/s)", "{:.0f}".format),
            ("throughput_tok_s", "throughput (tok/s)", "{:.0f}".format),
            ("p50_ttft_ms", "p50 TTFT (ms)", "{:.0f}".format), ("p99_tbt_ms", "p99 TBT (ms)", "{:.0f}".format),
            ("compute_util", "compute util", "{:.2f}".format), ("kv_util", "KV util", "{:.2f}".format),
            ("preemptions", "preempt.", "{:d}".format), ("num_refused", "refused", "{:d}".format),
            ("sched_ms_p99", "sched p99 (ms)", "{:.2f}".format)]
    out = [f"| {first} | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        out.append(f"| {name} | " + " | ".join(fmt(row.get(k, 0)) for k, _, fmt in cols) + " |")
    return "\n".join(out)


def class_table(rows: dict[str, dict[str, Any]]) -> str:
    classes = sorted({c for r in rows.values() for c in r["slo_attainment_by_class"]})
    head = "| policy | " + " | ".join(f"{c}: attained / p50 TTFT / p99 TTFT / p99 TBT" for c in classes) + " |"
    out = [head, "|---" * (len(classes) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{_pct(r['slo_attainment_by_class'].get(c, 0))} / {r['p50_ttft_ms_by_class'].get(c, 0):.0f} / "
                 f"{r['p99_ttft_ms_by_class'].get(c, 0):.0f} / {r['p99_tbt_ms_by_class'].get(c, 0):.0f} ms"
                 for c in classes]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def lengths_table(lengths: dict[str, Any]) -> str:
    out = ["| workload | source | requests | prompt mean / p50 / p90 / max | output mean / p50 / p90 / max |",
           "|---|---|---|---|---|"]
    for wl, per in lengths.items():
        for src, s in per.items():
            p, o = s["prompt"], s["output"]
            out.append(f"| {wl} | {src} | {s['count']} | {p['mean']:.0f} / {p['p50']:.0f} / {p['p90']:.0f} / {p['max']} "
                       f"| {o['mean']:.0f} / {o['p50']:.0f} / {o['p90']:.0f} / {o['max']} |")
    return "\n".join(out)


def capacity_table(cap: dict[str, dict[str, Any]]) -> str:
    names = list(WORKLOAD_TITLES)
    labels: list[str] = []
    for n in names:  # labels differ per workload only in the tuned budgets they name
        labels += [lab for lab in cap[n] if lab not in labels]
    out = ["| policy | " + " | ".join(WORKLOAD_TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    vllm = {n: cap[n]["vllm (default 2048)"]["capacity_rps"] for n in names}
    for lab in labels:
        cells = []
        for n in names:
            c = cap[n].get(lab)
            cells.append("" if c is None else f"{c['capacity_rps']:.2f} ({_ratio(c['capacity_rps'], vllm[n]):.2f}x)")
        out.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def best_baseline(cap: dict[str, Any]) -> tuple[str, float]:
    """The strongest policy a user could pick instead of AccelGen (oracle and our own excluded)."""
    others = {k: v["capacity_rps"] for k, v in cap.items() if not k.startswith(("accelgen", "oracle"))}  # ours
    name = max(others, key=others.get)
    return name, others[name]


def goals(data: dict[str, Any]) -> str:
    out = ["| workload | goal | measured | |", "|---|---|---|---|"]
    for n in WORKLOAD_TITLES:
        cap = data["capacity"][n]
        acc, vllm = cap["accelgen"]["capacity_rps"], cap["vllm (default 2048)"]["capacity_rps"]
        bname, bcap = best_baseline(cap)
        est, orc = cap["accelgen + estimates"]["capacity_rps"], cap["oracle"]["capacity_rps"]
        t = WORKLOAD_TITLES[n]
        out += [f"| {t} | capacity >= 1.5x vLLM default | {acc:.2f} vs {vllm:.2f} req/s = {_ratio(acc, vllm):.2f}x | {_check(acc >= 1.5 * vllm)} |",
                f"| {t} | capacity >= 1.3x best tuned baseline ({bname}) | {acc:.2f} vs {bcap:.2f} = {_ratio(acc, bcap):.2f}x | {_check(acc >= 1.3 * bcap)} |",
                f"| {t} | with length estimates >= 95% of the oracle's capacity | {est:.2f} vs {orc:.2f} = {_ratio(est, orc):.2f}x | {_check(est >= 0.95 * orc)} |"]
    for n in ("paper-mix", "paper-mix by-app"):
        rates = data["sweep"]["rates"]
        sw = data["sweep"][n]
        vrows = sw["vllm (default 2048)"]
        i = next((j for j, r in enumerate(vrows) if r["slo_attainment"] < 0.5), None)
        t = WORKLOAD_TITLES[n]
        if i is None:
            out.append(f"| {t} | goals at the lowest load with vLLM < 50% | vLLM stays >= 50% on the whole sweep | n/a |")
            continue
        a, v = sw["accelgen"][i], vrows[i]
        s = next(sw[k][i] for k in sw if k.startswith("sarathi"))
        out += [f"| {t} @ {rates[i]:g} req/s | attainment >= 2x vLLM | {_pct(a['slo_attainment'])} vs {_pct(v['slo_attainment'])} = {_ratio(a['slo_attainment'], v['slo_attainment']):.2f}x | {_check(a['slo_attainment'] >= 2 * v['slo_attainment'])} |",
                f"| {t} @ {rates[i]:g} req/s | attainment >= 1.5x tuned Sarathi | {_pct(a['slo_attainment'])} vs {_pct(s['slo_attainment'])} = {_ratio(a['slo_attainment'], s['slo_attainment']):.2f}x | {_check(a['slo_attainment'] >= 1.5 * s['slo_attainment'])} |",
                f"| {t} @ {rates[i]:g} req/s | request goodput >= 2x vLLM | {a['request_goodput_rps']:.3f} vs {v['request_goodput_rps']:.3f} = {_ratio(a['request_goodput_rps'], v['request_goodput_rps']):.2f}x | {_check(a['request_goodput_rps'] >= 2 * v['request_goodput_rps'])} |",
                f"| {t} @ {rates[i]:g} req/s | token goodput >= 1.3x vLLM and tuned Sarathi | {a['goodput_tok_s']:.0f} vs {v['goodput_tok_s']:.0f} / {s['goodput_tok_s']:.0f} = {_ratio(a['goodput_tok_s'], v['goodput_tok_s']):.2f}x / {_ratio(a['goodput_tok_s'], s['goodput_tok_s']):.2f}x | {_check(a['goodput_tok_s'] >= 1.3 * max(v['goodput_tok_s'], s['goodput_tok_s']))} |"]
    az = data["azure"]
    a = az["accelgen"]["slo_attainment"]
    worst = max((k for k in az if not k.startswith(("accelgen", "oracle"))), key=lambda k: az[k]["slo_attainment"])
    out.append(f"| azure-conv, time scale 0.5 | attainment not below any baseline | {_pct(a)} vs best baseline {worst} "
               f"{_pct(az[worst]['slo_attainment'])} | {_check(a >= az[worst]['slo_attainment'])} |")
    d8 = data["decision_at_8"]["sched_ms_p99"]
    out.append(f"| paper-mix @ 8 req/s | simulator sched_ms_p99 < 1 ms | {d8:.3f} ms | {_check(d8 < 1.0)} |")
    return "\n".join(out)


def sweep_table(rates: list[float], sweep: dict[str, list[dict[str, Any]]]) -> str:
    out = ["| policy | " + " | ".join(f"{r:g} req/s" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for name, rows in sweep.items():
        out.append(f"| {name} | " + " | ".join(f"{_pct(r['slo_attainment'])} / {r['goodput_tok_s']:.0f}" for r in rows) + " |")
    return "\n".join(out)


def tuning_section(tuning: dict[str, Any]) -> str:
    parts = []
    for n, t in tuning.items():
        vc = " / ".join(f"@{b}: {t['vllm_capacity'][str(b)]['capacity_rps']:.2f}" for b in (256, 512, 1024, 2048))
        sw = t["sarathi_sweep"]
        ss = " / ".join(f"@{b}: {sw[b]['p99_tbt_ms_by_class'].get('chat', 0):.0f} ms ({_pct(sw[b]['slo_attainment'])})"
                        for b in sw)
        held = sw[str(t["sarathi_best"])]["p99_tbt_ms_by_class"].get("chat", 0) <= 50.0
        why = "the largest holding 50 ms" if held else "none holds 50 ms, so the smallest"
        parts.append(f"- **{WORKLOAD_TITLES[n]}**: vLLM capacity by budget {vc} req/s -> tuned budget "
                     f"**{t['vllm_best']}**. Sarathi-Serve at vLLM's capacity load, chat p99 TBT (attainment) by "
                     f"budget: {ss} -> **{t['sarathi_best']}** ({why}).")
    return "\n".join(parts)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = data["sweep"]["rates"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, n in zip(axes, ("paper-mix", "paper-mix by-app")):
        for name, rows in data["sweep"][n].items():
            ax.plot(rates, [100 * r["slo_attainment"] for r in rows], marker="o", label=name)
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        ax.set_title(WORKLOAD_TITLES[n])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROFILE_OUT = ROOT / "docs" / "profiles" / "tiny-opt_cpu.json"


def measured_test_model_profile():
    """The test model's profile that `make results` measured just before (`accelgen profile`,
    run by make in a process of its own: timings taken inside a process that has loaded torch
    were wrecked by its idle OpenMP threads on this 2-core machine)."""
    from accelgen.core.profile import DeviceProfile

    if not PROFILE_OUT.exists():
        raise SystemExit(f"{PROFILE_OUT} is missing: run `make results`, which measures it first")
    return DeviceProfile.load(PROFILE_OUT)


def profile_section(p) -> str:
    c = p.coefficients
    rows = "\n".join(f"| {s} | {ms:.2f} | {s / ms:.0f} |" for s, ms in p.measured_forward_ms)
    pts = p.measured_forward_ms
    disturbed = [s for (s, ms), (_, nxt) in zip(pts, pts[1:]) if ms > nxt]
    caveat = ""
    if disturbed:
        caveat = (f"\n**Disturbed points:** {', '.join(map(str, disturbed))} tokens took longer than a larger forward; "
                  "even the fastest of 10 runs stalled there (this 2-core VM shares its host), so S_pf / T_pf "
                  "from this run are not trustworthy. Rerun `make results` on a quiet machine.\n")
    return f"""
## `accelgen profile` of the test model on this CPU

`accelgen profile --executor vllm --model .cache/test-model --dtype float32 --out {PROFILE_OUT.relative_to(ROOT)}`
(run by `make results` before this script): the seeded tiny OPT (2 layers, hidden 128) on vLLM's CPU model runner.

- **S_pf = {p.s_pf} tokens, T_pf = {p.t_pf_s * 1000:.2f} ms** (knee at {p.knee_fraction:.0%} of peak tokens/s).
- Fitted: {c.base_ms:.2f} ms + {c.per_token_ms * 1000:.2f} us per token; decode context {c.decode_ctx_ms * 1e6:.1f} ns per
  context token; {p.num_blocks - 1} KV blocks of {p.block_size} tokens.

| forward size (tokens) | time (ms) | tokens/ms |
|---|---|---|
{rows}
{caveat}
A worker started with `--profile {PROFILE_OUT.relative_to(ROOT)}` reports this profile and the scheduler budgets with
it (tested in `tests/integration/test_vllm_executor.py`).
"""


def write(data: dict[str, Any], docs: Path) -> None:
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    plot(data, docs / "figures" / "sweep.png")
    docs.joinpath("results.md").write_text(render(data) + profile_section(measured_test_model_profile()))
    print(f"wrote {docs / 'results.md'}")


def render(data: dict[str, Any]) -> str:
    from bench import overhead

    profile = load_profile(data["config"]["profile"])
    budget = TokenBudget(profile)
    classes = ", ".join(f"{c.name} (TTFT {c.slo.ttft_s:g} s, TBT {c.slo.tbt_s * 1000:g} ms, S_b = "
                        f"{budget.for_slo(c.slo.tbt_s)} tokens)" for c in SLOCatalog().classes if c.slo.tbt_s)
    rate = data["main_rate"]
    rates = data["sweep"]["rates"]
    i = rates.index(rate)
    main = {k: v[i] for k, v in data["sweep"]["paper-mix"].items()}
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    route = data["routing"]
    return f"""# Results

Regenerate everything on this page (tables, figure, `docs/results.json`) with one command:

    make results        # accelgen profile of the test model, then scripts/make_results.py (~{data['wall_s'] / 60:.0f} min here)

Last generated {when} on `{platform.node()}` (Python {platform.python_version()}). Every simulation is
seeded, timing noise included, so the simulated numbers repeat exactly; only decision times move.

## Setup

- **Device profile** `{profile.name}` (DistServe's A100-80GB fit for OPT-13B): `S_pf` = {profile.s_pf},
  `T_pf` = {profile.t_pf_s * 1000:.1f} ms, {profile.num_blocks - 1} KV blocks of {profile.block_size} tokens, context {profile.max_model_len}.
- **Timing noise**: every iteration's real time is the cost model's times a log-normal factor with
  sigma {data['config']['time_noise']:g} (about +-5%), so no policy predicts time exactly.
- **Classes**: {classes}. A request attains its SLO when its first token is within TTFT and at most
  5% of its gaps exceed TBT; refused requests count as misses.
- **Workloads** ({data['config']['duration_s']:g} s of arrivals each): `paper-mix` is the paper's mix, 35% long
  (BWB + arXiv lengths, the long-document stand-in) and 65% short (Alpaca, OPT tokenizer), Poisson
  arrivals; a request that does not fit the 2,048-token context keeps an output of up to 1,024 tokens
  and a clipped prompt. Classes are drawn uniformly (`--classes uniform`) or by application
  (`--classes by-app`: short -> chat or code, long -> summarization). `azure-conv` replays the Azure 2023
  conversation trace at time scale 0.5 (`accelgen sim --workload azure-conv --time-scale 0.5`), classes uniform.
  Lengths as used:

{lengths_table(data['lengths'])}

- **Policies** (all under the same simulator, scheduling core and KV accounting):
  `accelgen` (all mechanisms and the extensions on by default, SLO-aware admission included);
  `accelgen + estimates` (output lengths learned online); `accelgen - admission` (the same without
  SLO-aware admission); `oracle` (= AccelGen with every true output
  length in place of the estimates: exact KV reserve, exact `T_e`, victim with most output left; only
  the simulator can run it); `vllm` = vLLM V1's default scheduler (FCFS, 2,048-token budget, 256 sequences);
  `vllm tuned` = the same with the budget of 256/512/1024/2048 that gives the highest capacity;
  `vllm-priority` = vLLM's `priority` scheduling policy with each request's priority from its SLO class
  (what SLO-tiered gateways feed vLLM today), at the default and the tuned budget; `vllm + admission`
  = vLLM behind the same admission AccelGen can use; `sarathi tuned` = Sarathi-Serve with the largest
  budget whose p99 TBT of the tightest class holds 50 ms on the workload's real batches; `edf` =
  earliest deadline first with tuned Sarathi's budget and the same KV growth reserve and admission as AccelGen.

## Tuning the baselines

{tuning_section(data['tuning'])}

## Capacity: highest load at >= {100 * data['config']['target']:.0f}% SLO attainment

Bisection to 4% (`accelgen capacity --workload W --policies ... --target 0.9`), in req/s and as a
multiple of vLLM default's. For `azure-conv` the knob is the replay speed; the rate is the replayed
arrivals per second.

{capacity_table(data['capacity'])}

## Goals of the issue, measured in this run

{goals(data)}

## Comparison at {rate:g} req/s (paper-mix, classes uniform)

The lowest swept load at which vLLM default's attainment is under 50%.

{table(main)}

Per class (attained / p50 TTFT / p99 TTFT / p99 TBT, ms):

{class_table(main)}

## azure-conv at time scale 0.5

{table(data['azure'])}

{class_table(data['azure'])}

## Load sweep (attainment / token goodput in tok/s)

![sweep](figures/sweep.png)

**paper-mix, classes uniform**

{sweep_table(rates, data['sweep']['paper-mix'])}

**paper-mix, classes by application**

{sweep_table(rates, data['sweep']['paper-mix by-app'])}

## Ablation: each mechanism and extension changed on its own

**paper-mix at {rate:g} req/s**

{table(data['ablation']['paper-mix'], 'variant')}

**azure-conv at time scale 0.5**

{table(data['ablation']['azure-conv'], 'variant')}

## Two workers: SLO-aware routing against least-work routing

paper-mix (uniform) at {route['rate']:g} req/s over two workers (lanes) under one scheduler, as the service runs them:

{table(route['rows'], 'routing')}

Capacity over two workers: least-work {route['capacity']['least-work']['capacity_rps']:.2f} req/s,
SLO-aware {route['capacity']['slo-aware']['capacity_rps']:.2f} req/s.

## Scheduling overhead

Decision time in the simulator at 8 req/s on paper-mix (AccelGen): p50
{data['decision_at_8']['sched_ms_p50']:.3f} ms, p99 {data['decision_at_8']['sched_ms_p99']:.3f} ms over
{data['decision_at_8']['iterations']} iterations. One decision with a held waiting queue
(`python -m bench.overhead`), beside vLLM V1's own `Scheduler.schedule()` on the same queue shape:

```
{overhead.format_results(data['overhead'])}
```

{analysis(data)}
"""


if __name__ == "__main__":
    write(json.loads((ROOT / "docs" / "results.json").read_text()), ROOT / "docs")
