"""Regenerate docs/results.md and its figures: `make results` (or `python scripts/make_results.py`).

Everything in the document comes from runs this script makes: the policy comparison at one
load, the load sweep (figure), the AccelGen ablation and the scheduling-overhead benchmark.
The simulations are seeded and deterministic; only the overhead timings vary between runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import overhead  # noqa: E402
from bench.compare import (ABLATIONS, RunSpec, WorkloadSpec, headline, markdown_table, plot_policies,  # noqa: E402
                           plot_sweep, run_many)
from scheduler_service.core.budget import TokenBudget  # noqa: E402
from scheduler_service.core.policies.registry import POLICY_NAMES  # noqa: E402
from scheduler_service.core.slo import SLOCatalog  # noqa: E402
from scheduler_service.profiles import DEFAULT_PROFILE, load_profile  # noqa: E402

DOCS = ROOT / "docs"
FIG = DOCS / "figures"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 2.5 req/s: the middle of the overloaded range (vLLM's attainment about 20%), and of the loads
    # where AccelGen's attainment leads, the one with its *smallest* goodput ratio over vLLM.
    ap.add_argument("--rate", type=float, default=2.5, help="load of the main comparison (req/s)")
    ap.add_argument("--sweep", default="1,1.5,1.75,2,2.25,2.5,3,4")
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--overhead-repeats", type=int, default=300)
    args = ap.parse_args()
    FIG.mkdir(parents=True, exist_ok=True)
    measured = measured_test_model_profile()
    rates = [float(r) for r in args.sweep.split(",")]
    wl = WorkloadSpec(name="paper-mix", rate=args.rate, duration_s=args.duration, seed=0)

    main_specs = [RunSpec(wl, p) for p in POLICY_NAMES]
    sweep_specs = [RunSpec(WorkloadSpec(name="paper-mix", rate=r, duration_s=args.duration, seed=0), p)
                   for r in rates for p in POLICY_NAMES]
    abl_specs = [RunSpec(wl, "accelgen", policy_overrides=o, label=n) for n, o in ABLATIONS.items()]
    results = run_many(main_specs + sweep_specs + abl_specs)
    main_rows = {p: headline(results[i]) for i, p in enumerate(POLICY_NAMES)}
    off = len(main_specs)
    sweep = {p: [headline(results[off + i * len(POLICY_NAMES) + j]) for i in range(len(rates))]
             for j, p in enumerate(POLICY_NAMES)}
    off += len(sweep_specs)
    abl_rows = {n: headline(results[off + i]) for i, n in enumerate(ABLATIONS)}

    plot_policies(main_rows, FIG / "comparison.png", f"paper-mix at {args.rate} req/s, OPT-13B / A100 profile")
    plot_sweep(rates, sweep, FIG / "sweep.png", "paper-mix: goodput and SLO attainment vs load")
    ov = overhead.run([100, 1000, 10000], args.overhead_repeats)
    (DOCS / "results.json").write_text(json.dumps(
        {"comparison": main_rows, "sweep": {"rates": rates, "policies": sweep}, "ablation": abl_rows,
         "overhead": ov}, indent=2) + "\n")
    DOCS.joinpath("results.md").write_text(render(args, rates, main_rows, sweep, abl_rows, ov) + profile_section(measured))
    print(f"wrote {DOCS / 'results.md'}")
    return 0


def render(args, rates, main_rows, sweep, abl_rows, ov) -> str:
    profile = load_profile(DEFAULT_PROFILE)
    budget = TokenBudget(profile)
    catalog = SLOCatalog()
    a, v, s, o = (main_rows[k] for k in ("accelgen", "vllm", "sarathi", "oracle"))
    classes = ", ".join(f"{c.name} (TTFT {c.slo.ttft_s:g} s, TBT {c.slo.tbt_s * 1000:g} ms, "
                        f"S_b = {budget.for_slo(c.slo.tbt_s)} tokens)"
                        for c in catalog.classes if c.slo.tbt_s is not None)
    sweep_lines = ["| rate (req/s) | " + " | ".join(f"{p} goodput / attainment" for p in POLICY_NAMES) + " |",
                   "|" + "---|" * (len(POLICY_NAMES) + 1)]
    for i, r in enumerate(rates):
        sweep_lines.append(f"| {r:g} | " + " | ".join(
            f"{sweep[p][i]['goodput_tok_s']:.0f} / {sweep[p][i]['slo_attainment']:.0%}" for p in POLICY_NAMES) + " |")
    ov_text = overhead.format_results(ov)
    acc_1000 = ov["policies"]["accelgen"]["1000"]["p99_ms"]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# Results

Regenerate everything on this page (tables, figures, `docs/results.json`) with one command:

    make results        # = accelgen profile of the test model, then .venv/bin/python scripts/make_results.py

Last generated {when} on `{platform.node()}` ({platform.processor() or platform.machine()}, Python
{platform.python_version()}). Simulations are seeded and deterministic; the overhead timings are
wall-clock measurements on this 2-core machine and vary from run to run.

## Setup

- **Device profile**: `{profile.name}`, from DistServe's A100-80GB fits for OPT-13B
  (`scripts/convert_distserve_profile.py`): `S_pf` = **{profile.s_pf}** tokens (the paper reports 768
  for OPT-13B), `T_pf` = {profile.t_pf_s * 1000:.1f} ms, {profile.num_blocks - 1} KV blocks of
  {profile.block_size} tokens ({profile.kv_capacity_tokens} tokens), context {profile.max_model_len}.
- **Workload**: `paper-mix`, {args.duration:g} s of Poisson arrivals, seed 0: 35% long prompts (BWB / arXiv
  lengths), 65% ShareGPT lengths, truncated to the 2,048-token context; each request draws one class
  uniformly: {classes}.
- **Simulator**: the scheduling core of the service under a virtual clock; each iteration costs the
  profile's time for the exact batch (chunk sizes, decodes, context lengths).
- **Policies**: `vllm` = vLLM V1 default (FCFS, 2,048-token budget, 256 sequences, A100 defaults);
  `sarathi` = stall-free batching with a static budget for the tightest class; `edf` = earliest deadline
  first with the same static budget; `accelgen` = all mechanisms; `oracle` = AccelGen knowing output lengths.

## Comparison at {args.rate:g} req/s

{args.rate:g} req/s is the middle of the overloaded range. Among the loads where AccelGen's attainment
leads, it is the one where AccelGen's goodput ratio over vLLM is smallest; every other load is in the
sweep below.

![comparison](figures/comparison.png)

{markdown_table(main_rows)}

Acceptance targets of the scheduling-core issue, measured on this run (vLLM's overall SLO attainment
here is {v['slo_attainment']:.1%}):

| target | measured | |
|---|---|---|
| accelgen goodput >= 1.4x vllm | {_ratio(a['goodput_tok_s'], v['goodput_tok_s'])} | {_check(a['goodput_tok_s'] >= 1.4 * v['goodput_tok_s'])} |
| accelgen goodput >= 1.1x sarathi | {_ratio(a['goodput_tok_s'], s['goodput_tok_s'])} | {_check(a['goodput_tok_s'] >= 1.1 * s['goodput_tok_s'])} |
| accelgen attainment above vllm and sarathi | {a['slo_attainment']:.1%} vs {v['slo_attainment']:.1%} / {s['slo_attainment']:.1%} | {_check(a['slo_attainment'] > max(v['slo_attainment'], s['slo_attainment']))} |
| accelgen goodput >= 85% of oracle | {_ratio(a['goodput_tok_s'], o['goodput_tok_s'])} | {_check(a['goodput_tok_s'] >= 0.85 * o['goodput_tok_s'])} |
| accelgen p99 decision < 1 ms at 1,000 waiting | {acc_1000:.3f} ms | {_check(acc_1000 < 1.0)} |

## Load sweep

![sweep](figures/sweep.png)

{chr(10).join(sweep_lines)}

The same targets at every swept load where vLLM's attainment is under 50%:

{acceptance_by_rate(rates, sweep)}

## Ablation: each AccelGen mechanism off in turn ({args.rate:g} req/s)

{markdown_table(abl_rows, title="variant")}

## Scheduling overhead

One scheduling decision, 256-token prompts, 128 output tokens, 4,096 KV blocks, up to 256 running,
waiting queue held at the given size (`python -m bench.overhead`); vLLM's own V1
`Scheduler.schedule()` on the same queue shape (CPU build, the tiny test model's config, no model
execution; `bench/vllm_sched_overhead.py`).

```
{ov_text}
```

{ANALYSIS}
"""


PROFILE_OUT = DOCS / "profiles" / "tiny-opt_cpu.json"


def measured_test_model_profile():
    """The test model's profile that `make results` measured just before (`accelgen profile`,
    run by make in a process of its own: timings taken inside a process that has loaded torch
    were wrecked by its idle OpenMP threads on this 2-core machine)."""
    from scheduler_service.core.profile import DeviceProfile

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


def acceptance_by_rate(rates, sweep) -> str:
    lines = ["| rate (req/s) | vllm att. | accelgen / vllm goodput | accelgen / sarathi goodput | "
             "accelgen att. vs vllm / sarathi | accelgen / oracle goodput |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rates):
        a, v, s, o = (sweep[k][i] for k in ("accelgen", "vllm", "sarathi", "oracle"))
        if v["slo_attainment"] >= 0.5:
            continue
        above = a["slo_attainment"] > max(v["slo_attainment"], s["slo_attainment"])
        lines.append(
            f"| {r:g} | {v['slo_attainment']:.1%} | {_ratio(a['goodput_tok_s'], v['goodput_tok_s'])} "
            f"({_check(a['goodput_tok_s'] >= 1.4 * v['goodput_tok_s'])}) | "
            f"{_ratio(a['goodput_tok_s'], s['goodput_tok_s'])} ({_check(a['goodput_tok_s'] >= 1.1 * s['goodput_tok_s'])}) | "
            f"{a['slo_attainment']:.1%} vs {v['slo_attainment']:.1%} / {s['slo_attainment']:.1%} ({_check(above)}) | "
            f"{_ratio(a['goodput_tok_s'], o['goodput_tok_s'])} ({_check(a['goodput_tok_s'] >= 0.85 * o['goodput_tok_s'])}) |")
    return "\n".join(lines)


ANALYSIS = """## What the numbers say

Written after reading the runs above. The simulations are deterministic, so regenerating the page
gives the same simulated numbers; only the overhead timings move.

- **Goodput.** From 2 req/s up, AccelGen gives the highest goodput of the online policies: about
  1.15-1.3x vLLM and 1.15-1.25x Sarathi-Serve (1.08x vLLM at 1.75 req/s; equal at light load). Almost every token it
  delivers is on time (goodput is close to throughput), because every batch is priced with the
  cost model, attention and KV reads included, and kept within its tightest SLO. vLLM gets more
  raw throughput from larger, more efficient iterations, but a quarter to a third of its tokens are late.
- **1.4x vLLM is not reached at any load.** On this profile small iterations cost real throughput.
  DistServe's A100 fit is `18.1 ms + 0.102 ms` per token, plus `0.63 us` per context token of
  every decode, with no flat region below `S_pf`. So the 50 ms class caps an iteration at about
  282 tokens, at 6 tokens/ms against about 8 tokens/ms at 2,048. About 40 requests at 1,500
  context tokens spend roughly 38 ms of every iteration on KV reads alone. Serving the tight class
  on time therefore lowers the ceiling on throughput. The paper's premise is that tokens below the
  pivot are nearly free; that would remove this cost. The fit does not reflect it. At 2.5 req/s,
  1.4x would mean about 520 on-time tokens/s: nearly all of vLLM's *total* output (531 tokens/s,
  late ones included), from iterations capped at 50 ms. The oracle, with every output length
  known, reaches 449.
- **SLO attainment (requests).** It is mostly decided by TTFT. AccelGen's lower throughput means
  longer queues, so at 2 req/s it only ties vLLM and trails Sarathi-Serve. From 2.25 req/s up it is
  above both, because triage serves requests that can still make their deadline before those that
  cannot. At 1.75 req/s, where vLLM still meets 70%, AccelGen's goodput is higher but its
  attainment is lower.
- **Mechanisms (ablation at the main load).** In overload each mechanism trades a little
  throughput for attainment or for on-time tokens; none raises goodput much on its own.
  - The exact-batch guard matters most: without it about a third of the tokens are late, and
    goodput falls below vLLM's.
  - Triage and T_r prioritisation decide who is served on time. Without triage, attainment falls
    from 23% to 17%. Without T_r ordering (FCFS, running first) it falls to 20%, and p99 TBT
    exceeds the loosest class.
  - The KV growth reserve cuts preemptions by about 8x (698 to 87). Without it goodput drops by
    about 11%, though attainment is a point higher.
  - ERA helps attainment a little (21.4% to 22.9%) and costs about 2% of goodput.
  - SLO grouping and dynamic chunking change little here: a 50 ms request is nearly always
    running, so SLO_min is nearly always the tight class.
  - The Euclidean multi-resource pick lowers attainment slightly on this workload. It prefers long
    prompts while KV is free, and those delay short requests' first tokens. We keep it on by default
    because it is the paper's mechanism, and report the cost.
  - A 0% safety margin looks better here, because the simulator's cost model is exact. The service
    keeps 5% for real timing noise.
- **Oracle.** The oracle never preempts and orders work by what truly remains. It is within a few
  percent of AccelGen, because AccelGen's KV growth reserve already removes almost all preemption,
  the one waste the oracle's knowledge avoids. It is not a proven optimum; its docstring says
  exactly what it optimises.
- **Overhead.** Cost grows with the number of *running* requests, not with queue length: the waiting
  queue is a sorted structure of which only a window is read (64 requests). The slowest decisions
  are those with about 185 running requests, many of them urgent prefills that no longer fit the
  iteration's time limit. Each costs about 2 us: its T_r, its sort key, and one priced refusal or
  one decode slot. vLLM's own scheduler is measured on the same shape in the same run.
"""


if __name__ == "__main__":
    raise SystemExit(main())
