"""The ``accelgen`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from bench.compare import (RunSpec, WorkloadSpec, format_table, headline, plot_policies, plot_sweep,
                           run_many)
from bench.workloads import WORKLOAD_NAMES, parse_slo_mix
from scheduler_service.core.policies.registry import POLICY_NAMES
from scheduler_service.profiles import DEFAULT_PROFILE


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown policy {unknown}; choose from {','.join(POLICY_NAMES)}")
    return names


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep-rate takes comma-separated numbers, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("--sweep-rate needs positive rates")
    return rates


def _slo_mix(text: str) -> dict[str, float]:
    try:
        return parse_slo_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="paper-mix",
                   help="paper-mix: 35%% long (BWB/arXiv) + 65%% ShareGPT prompts, Poisson arrivals; "
                        "azure-conv/azure-code: the Azure 2023 traces; trace: any Azure-format CSV (--trace)")
    p.add_argument("--rate", type=float, default=4.0, help="paper-mix arrival rate (requests/s)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals to generate/replay")
    p.add_argument("--seed", type=int, default=0, help="seed for arrivals, lengths and SLO classes")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace replay speed-up (2 = twice as fast)")
    p.add_argument("--trace", type=str, default=None, help="Azure-format CSV for --workload trace")
    p.add_argument("--slo-mix", type=_slo_mix, default=None,
                   help="class weights, e.g. chat=1,code=1,summarization=1 (default: equal)")
    p.add_argument("--long-fraction", type=float, default=0.35, help="paper-mix share of long prompts")


def cmd_sim(args: argparse.Namespace) -> int:
    base = WorkloadSpec(name=args.workload, rate=args.rate, duration_s=args.duration, seed=args.seed,
                        time_scale=args.time_scale, trace=args.trace, slo_mix=args.slo_mix,
                        long_fraction=args.long_fraction)
    rates = args.sweep_rate or [args.rate]
    if args.sweep_rate and args.workload != "paper-mix":
        print("--sweep-rate needs --workload paper-mix (traces have their own arrival times)", file=sys.stderr)
        return 2
    specs = [RunSpec(workload=WorkloadSpec(**{**base.__dict__, "rate": r}), policy=p, profile=args.profile,
                     time_noise=args.time_noise) for r in rates for p in args.policies]
    results = _run_with_progress(specs, args.jobs)
    config: dict[str, Any] = {"workload": args.workload, "duration_s": args.duration, "seed": args.seed,
                              "profile": args.profile, "policies": args.policies, "time_noise": args.time_noise,
                              "slo_mix": args.slo_mix, "time_scale": args.time_scale, "trace": args.trace}
    by_rate = {r: {p: results[i * len(args.policies) + j] for j, p in enumerate(args.policies)}
               for i, r in enumerate(rates)}
    if args.sweep_rate:
        config["rates"] = rates
        out: dict[str, Any] = {"config": config, "sweep": {
            "rates": rates, "policies": {p: [headline(by_rate[r][p]) for r in rates] for p in args.policies}}}
        for r in rates:
            print(f"\nrate {r} req/s")
            print(format_table({p: by_rate[r][p] for p in args.policies}))
        if args.plot:
            plot_sweep(rates, out["sweep"]["policies"], Path(args.plot), f"{args.workload}: goodput and SLO attainment vs load")
    else:
        config["rate"] = args.rate
        rows = {p: headline(by_rate[args.rate][p]) for p in args.policies}
        out = {"config": config, "policies": rows}
        print(format_table(by_rate[args.rate]))
        if args.plot:
            plot_policies(rows, Path(args.plot), f"{args.workload} at {args.rate} req/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _run_with_progress(specs: list[RunSpec], jobs: int | None) -> list[dict[str, Any]]:
    from tqdm import tqdm

    # delay: runs that finish within a couple of seconds print no bar at all.
    with tqdm(total=len(specs), desc="simulating", unit="run", delay=2.0, file=sys.stderr) as bar:
        return run_many(specs, jobs=jobs, on_done=bar.update)


def cmd_demo(args: argparse.Namespace) -> int:
    """The simulator comparison on a mixed-SLO workload (the service demo replaces this)."""
    print("AccelGen demo: mixed-SLO paper-mix workload on the OPT-13B / A100 profile, all policies\n")
    ns = argparse.Namespace(workload="paper-mix", rate=args.rate, duration=args.duration, seed=0, time_scale=1.0,
                            trace=None, slo_mix=None, long_fraction=0.35, policies=list(POLICY_NAMES),
                            profile=DEFAULT_PROFILE, time_noise=0.0, sweep_rate=None, jobs=None,
                            json=args.json, plot=None)
    rc = cmd_sim(ns)
    print("\nThe load sweep, the ablation and the overhead benchmark: docs/results.md (make results).")
    return rc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="accelgen", description="Heterogeneous-SLO LLM serving (AccelGen)")
    sub = ap.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("sim", help="simulate policies on a workload with a device profile")
    add_workload_args(sim)
    sim.add_argument("--policies", type=_policies, default=list(POLICY_NAMES),
                     help=f"comma-separated, from {','.join(POLICY_NAMES)}")
    sim.add_argument("--profile", default=DEFAULT_PROFILE, help="shipped profile name or a profile JSON path")
    sim.add_argument("--time-noise", type=float, default=0.0,
                     help="log-normal sigma of actual/predicted iteration time (0 = exact cost model)")
    sim.add_argument("--sweep-rate", type=_rates, default=None, help="comma-separated rates, e.g. 1,2,4,8")
    sim.add_argument("--jobs", type=int, default=None, help="parallel simulations (default: CPU count)")
    sim.add_argument("--json", default=None, help="write results JSON here")
    sim.add_argument("--plot", default=None, help="write a PNG figure here")
    sim.set_defaults(func=cmd_sim)

    demo = sub.add_parser("demo", help="run the mixed-SLO comparison and print the report")
    demo.add_argument("--rate", type=float, default=2.0)
    demo.add_argument("--duration", type=float, default=300.0)
    demo.add_argument("--json", default=None)
    demo.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
