"""The research subcommands: ``sim``, ``capacity``, ``load`` and ``demo``.

They drive ``bench/`` (workloads, the simulator, the load generator), which is run from the
source checkout and never installed, so this module is imported only when one of them is asked
for (see ``launcher.checkout``); the service commands work without a checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from launcher.checkout import ROOT, require_checkout
from launcher.errors import CliError

require_checkout()

from accelgen.core.policies.registry import POLICY_NAMES, PolicySpec  # noqa: E402
from accelgen.core.routing import ROUTER_NAMES  # noqa: E402
from accelgen.profiles import DEFAULT_PROFILE  # noqa: E402
from bench.compare import (DEFAULT_TIME_NOISE, RunSpec, WorkloadSpec, format_table, headline,  # noqa: E402
                           plot_policies, plot_sweep, run_many)
from bench.workloads import CLASS_MODES, SHORT_DATA, WORKLOAD_NAMES, parse_slo_mix  # noqa: E402
from launcher.test_model import default_model  # noqa: E402
from scheduler_service.state.redis_conn import redact_url  # noqa: E402

def _policies(text: str) -> list[str]:
    """Comma-separated policy specs, ``NAME[@BUDGET][+admission]``, each checked here."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no policy given; choose from {','.join(POLICY_NAMES)}")
    for name in names:
        try:
            PolicySpec.parse(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
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
                   help="paper-mix: 35%% long (BWB/arXiv) + 65%% short (--short-data) prompts, Poisson arrivals; "
                        "azure-conv/azure-code: the Azure 2023 traces; trace: any Azure-format CSV (--trace)")
    p.add_argument("--rate", type=float, default=4.0, help="paper-mix arrival rate (requests/s)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals to generate/replay")
    p.add_argument("--seed", type=int, default=0, help="seed for arrivals, lengths and SLO classes")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace replay speed-up (2 = twice as fast)")
    p.add_argument("--trace", type=str, default=None, help="Azure-format CSV for --workload trace")
    p.add_argument("--slo-mix", type=_slo_mix, default=None,
                   help="class weights, e.g. chat=1,code=1,summarization=1 (default: equal)")
    p.add_argument("--long-fraction", type=float, default=0.35, help="paper-mix share of long prompts")
    p.add_argument("--short-data", choices=tuple(SHORT_DATA), default="alpaca",
                   help="paper-mix short prompts: alpaca (Stanford Alpaca) or sharegpt (ShareGPT first turns)")
    p.add_argument("--classes", choices=CLASS_MODES, default="uniform",
                   help="SLO class per request: uniform (drawn from --slo-mix, independent of length) or by-app "
                        "(long -> summarization, short -> chat/code with the --slo-mix chat:code ratio)")


def cmd_sim(args: argparse.Namespace) -> int:
    base = workload_spec(args)
    rates = args.sweep_rate or [args.rate]
    if args.sweep_rate and args.workload != "paper-mix":
        print("--sweep-rate needs --workload paper-mix (traces have their own arrival times)", file=sys.stderr)
        return 2
    specs = [RunSpec(workload=WorkloadSpec(**{**base.__dict__, "rate": r}), policy=p, profile=args.profile,
                     time_noise=args.time_noise, workers=args.workers, routing=args.routing)
             for r in rates for p in args.policies]
    results = _run_with_progress(specs, args.jobs)
    config = sim_config(args)
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


def check_workload_args(args: argparse.Namespace) -> None:
    """The workload flags that go together, checked before any simulation process starts (a
    mistake found there would surface as a worker process's error)."""
    if args.trace and args.workload != "trace":
        raise CliError(f"--trace {args.trace} is replayed only with --workload trace (not {args.workload}): "
                       "add --workload trace, or drop --trace")
    if args.workload == "trace" and not args.trace:
        raise CliError("--workload trace needs --trace FILE, an Azure-format CSV of arrivals and token counts")
    if args.trace and not Path(args.trace).is_file():
        raise CliError(f"--trace {args.trace}: no such file")
    for flag, value in (("--rate", args.rate), ("--duration", args.duration), ("--time-scale", args.time_scale)):
        if not value > 0:
            raise CliError(f"{flag} must be > 0, got {value:g}")
    if not 0 <= args.long_fraction <= 1:
        raise CliError(f"--long-fraction must be in [0, 1], got {args.long_fraction:g}")
    for flag in ("workers", "jobs"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CliError(f"--{flag} must be >= 1, got {value}")


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    check_workload_args(args)
    return WorkloadSpec(name=args.workload, rate=args.rate, duration_s=args.duration, seed=args.seed,
                        time_scale=args.time_scale, trace=args.trace, slo_mix=args.slo_mix,
                        long_fraction=args.long_fraction, short_data=args.short_data, classes=args.classes)


def sim_config(args: argparse.Namespace) -> dict[str, Any]:
    """What a simulation JSON records of the command that made it."""
    return {"workload": args.workload, "duration_s": args.duration, "seed": args.seed, "profile": args.profile,
            "policies": args.policies, "time_noise": args.time_noise, "slo_mix": args.slo_mix,
            "time_scale": args.time_scale, "trace": args.trace, "short_data": args.short_data,
            "classes": args.classes, "workers": args.workers, "routing": args.routing}


def cmd_capacity(args: argparse.Namespace) -> int:
    """Highest load at which each policy keeps SLO attainment >= --target (bisection)."""
    from bench.capacity import capacities

    base = workload_spec(args)
    specs = [RunSpec(workload=base, policy=p, profile=args.profile, time_noise=args.time_noise,
                     workers=args.workers, routing=args.routing) for p in args.policies]
    results = capacities(specs, target=args.target, rel_tol=args.tolerance, jobs=args.jobs)
    knob = "rate (req/s)" if args.workload == "paper-mix" else "time scale"
    print(f"{'policy':<24} {'capacity (req/s)':>17} {knob:>14} {'probes':>7}")
    for p, r in zip(args.policies, results):
        print(f"{p:<24} {r.capacity_rps:>17.3f} {r.load:>14.3f} {len(r.probes):>7d}")
    out = {"config": {**sim_config(args), "target": args.target, "tolerance": args.tolerance},
           "capacity_rps": {p: r.capacity_rps for p, r in zip(args.policies, results)},
           "search": {p: r.to_json() for p, r in zip(args.policies, results)}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _run_with_progress(specs: list[RunSpec], jobs: int | None) -> list[dict[str, Any]]:
    from tqdm import tqdm

    # delay: runs that finish within a couple of seconds print no bar at all.
    with tqdm(total=len(specs), desc="simulating", unit="run", delay=2.0, file=sys.stderr) as bar:
        return run_many(specs, jobs=jobs, on_done=bar.update)


def cmd_demo(args: argparse.Namespace) -> int:
    """The local stack on its embedded defaults, a mixed-SLO workload through the gateway, the report.

    By default the worker is vLLM's CPU model runner serving the seeded test model. With
    ``--executor sim`` the worker follows the OPT-13B / A100 profile instead, and the report adds
    the simulator's prediction for the same workload (the same scheduling core, so they agree).
    """
    from bench.loadgen import run_load
    from bench.slo_report import write_class_report
    from launcher.stack import RunCertificates, start_stack
    from accelgen.core.slo import SLOCatalog
    from accelgen.profiles import load_profile

    profile = load_profile(DEFAULT_PROFILE)
    spec = WorkloadSpec(name="paper-mix", rate=args.rate, duration_s=args.duration, seed=0)
    workload = spec.build(profile.max_model_len)
    worker_args = ["--log-level", "WARNING"]
    what = "sim worker(s) timed by the OPT-13B / A100 profile"
    if args.executor == "vllm":
        model = default_model()
        worker_args += ["--model", model, "--dtype", "float32"]
        what = f"vLLM CPU worker(s) serving {model}"
    print(f"AccelGen demo: {len(workload)} mixed-SLO requests (paper-mix, {args.rate} req/s for {args.duration:g} s; "
          f"chat 50 ms / code 187.5 ms / summarization 500 ms TBT) through the gateway -> scheduler -> "
          f"{args.workers} {what}\n", flush=True)
    certs = RunCertificates()  # the services talk mutual TLS, as `accelgen up` and a deployment do
    try:
        stack = start_stack(workers=args.workers, executor=args.executor, scheduler_args=["--log-level", "WARNING"],
                            worker_args=worker_args, gateway_args=["--log-level", "WARNING"], worker_timeout_s=300,
                            tls_dir=certs.tls_dir)
    except BaseException:
        certs.remove()
        raise
    try:
        print(f"stack up: gateway {stack.gateway_address}, OpenAI HTTP :{stack.http_port}, scheduler "
              f"{stack.scheduler_address}, Redis {redact_url(stack.redis_url)}; mutual TLS between the services", flush=True)
        result = run_load(stack.gateway_address, workload, SLOCatalog(), profile.s_pf)
    finally:
        stack.stop()
        certs.remove()
    rows = _service_rows(result)
    if args.executor == "sim":
        rows["simulator (predicted)"] = run_many([RunSpec(spec, "accelgen", time_noise=0.0)])[0]  # as the sim worker
    print()
    print(format_table(rows, title="accelgen"))
    if result.errors:
        print(f"errors: {result.errors}")
    print("\n" + write_class_report(result.records, Path(args.out), f"accelgen demo: {len(workload)} requests, "
                                     f"paper-mix {args.rate:g} req/s for {args.duration:g} s, {args.executor} worker(s)"))
    print("\nstack stopped. Policy comparison, load sweep, ablation and overheads: docs/results.md (make results).")
    return 0 if not result.errors else 1


# Iteration-level metrics: a client replaying load through the gateway sees tokens and their
# times, not the batches that made them, so for service rows these are unknown, not zero.


_NOT_SEEN_BY_CLIENTS = ("compute_util", "kv_util", "preemptions", "sched_ms_p99")


def _service_rows(result: Any) -> dict[str, dict[str, Any]]:
    unknown = dict.fromkeys(_NOT_SEEN_BY_CLIENTS)
    return {"service (client clock)": {**result.summary, **unknown},
            "service (scheduler clock)": {**result.server_summary, **unknown}}


def cmd_load(args: argparse.Namespace) -> int:
    from bench.loadgen import run_load
    from accelgen.core.slo import SLOCatalog
    from accelgen.profiles import load_profile

    profile = load_profile(args.profile)
    workload = workload_spec(args).build(profile.max_model_len)
    _check_gateway(args.gateway)
    print(f"replaying {len(workload)} requests ({args.workload}) against {args.gateway} ...", flush=True)
    result = run_load(args.gateway, workload, SLOCatalog(), profile.s_pf)
    rows = _service_rows(result)
    row = headline(rows["service (client clock)"])
    print(format_table(rows))
    if result.errors:
        print(f"errors: {result.errors}")
    out = {"config": {"workload": args.workload, "rate": args.rate, "duration_s": args.duration, "seed": args.seed,
                      "gateway": args.gateway, "profile": args.profile, "source": "service (client-side timing)"},
           "policies": {args.policy_label: row,
                        f"{args.policy_label} (scheduler clock)": headline(rows["service (scheduler clock)"])},
           "errors": result.errors}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if not result.errors else 1


def _check_gateway(address: str, timeout_s: float = 5.0) -> None:
    """ConnectionError unless a gateway accepts connections at ``address`` (else every request of
    the replay would fail the same way)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"no gateway answers at {address} after {timeout_s:g} s: start one "
                                  "(accelgen up) or check --gateway") from None


def add_sim_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``sim`` and ``capacity``."""
    add_workload_args(p)
    p.add_argument("--policies", type=_policies, default=list(POLICY_NAMES),
                   help=f"comma-separated NAME[@BUDGET][+admission], NAME from {','.join(POLICY_NAMES)} "
                        "(e.g. vllm@512, sarathi@384, vllm+admission)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="shipped profile name or a profile JSON path")
    p.add_argument("--time-noise", type=float, default=DEFAULT_TIME_NOISE,
                   help="log-normal sigma of actual/predicted iteration time (0 = exact cost model)")
    p.add_argument("--workers", type=int, default=1, help="workers (lanes) under one scheduler")
    p.add_argument("--routing", default="least-work", choices=ROUTER_NAMES,
                   help="how requests are spread over workers: least-work or slo-aware")
    p.add_argument("--jobs", type=int, default=None, help="parallel simulations (default: CPU count)")
    p.add_argument("--json", default=None, help="write results JSON here")


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register sim, capacity, load and demo on the ``accelgen`` parser."""
    sim = sub.add_parser("sim", help="simulate policies on a workload with a device profile")
    add_sim_args(sim)
    sim.add_argument("--sweep-rate", type=_rates, default=None, help="comma-separated rates, e.g. 1,2,4,8")
    sim.add_argument("--plot", default=None, help="write a PNG figure here")
    sim.set_defaults(func=cmd_sim)

    cap = sub.add_parser("capacity", help="highest load each policy serves at a target SLO attainment (bisection)")
    add_sim_args(cap)
    cap.add_argument("--target", type=float, default=0.9, help="SLO attainment to hold (fraction of requests)")
    cap.add_argument("--tolerance", type=float, default=0.04, help="stop when the bracket is this narrow (relative)")
    cap.set_defaults(func=cmd_capacity, rate=1.0)

    load = sub.add_parser("load", help="replay a workload against a gateway; prints the same table as sim")
    add_workload_args(load)
    load.add_argument("--gateway", default="127.0.0.1:50050")
    load.add_argument("--profile", default=DEFAULT_PROFILE, help="profile for S_pf (compute utilisation)")
    load.add_argument("--policy-label", default="service", help="row name in the JSON")
    load.add_argument("--json", default=None)
    load.set_defaults(func=cmd_load)

    demo = sub.add_parser("demo", help="start the local stack, run a mixed-SLO workload through it, print the report")
    demo.add_argument("--rate", type=float, default=1.5)
    demo.add_argument("--duration", type=float, default=60.0)
    demo.add_argument("--workers", type=int, default=1)
    demo.add_argument("--executor", default="vllm", help="vllm (the test model on vLLM's CPU runner) or sim")
    demo.add_argument("--out", default=str(ROOT / "bench" / "out" / "demo"),
                      help="directory for the per-class figure (slo_by_class.png)")
    demo.set_defaults(func=cmd_demo)
