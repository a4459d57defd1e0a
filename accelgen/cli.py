"""The ``accelgen`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from bench.compare import (DEFAULT_TIME_NOISE, RunSpec, WorkloadSpec, format_table, headline, plot_policies,
                           plot_sweep, run_many)
from bench.workloads import CLASS_MODES, SHORT_DATA, WORKLOAD_NAMES, parse_slo_mix
from scheduler_service.core.policies.registry import POLICY_NAMES, PolicySpec
from scheduler_service.profiles import DEFAULT_PROFILE


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


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
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


def default_model() -> str:
    """The seeded test model, built on first use (no downloads): what `up` and `demo` serve by default."""
    import os

    from scripts.make_test_model import make_test_model

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU workers: a small KV cache; ignored on GPUs
    return str(make_test_model(Path(".cache") / "test-model"))


def cmd_demo(args: argparse.Namespace) -> int:
    """The local stack on its embedded defaults, a mixed-SLO workload through the gateway, the report.

    By default the worker is vLLM's CPU model runner serving the seeded test model. With
    ``--executor sim`` the worker follows the OPT-13B / A100 profile instead, and the report adds
    the simulator's prediction for the same workload (the same scheduling core, so they agree).
    """
    from bench.loadgen import run_load
    from accelgen.stack import start_stack
    from scheduler_service.core.slo import SLOCatalog
    from scheduler_service.profiles import load_profile

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
    stack = start_stack(workers=args.workers, executor=args.executor, scheduler_args=["--log-level", "WARNING"],
                        worker_args=worker_args, gateway_args=["--log-level", "WARNING"], worker_timeout_s=300)
    try:
        print(f"stack up: gateway {stack.gateway_address}, OpenAI HTTP :{stack.http_port}, scheduler "
              f"{stack.scheduler_address}, Redis {stack.redis_url}", flush=True)
        result = run_load(stack.gateway_address, workload, SLOCatalog(), profile.s_pf)
    finally:
        stack.stop()
    rows = _service_rows(result)
    if args.executor == "sim":
        rows["simulator (predicted)"] = run_many([RunSpec(spec, "accelgen", time_noise=0.0)])[0]  # as the sim worker
    print()
    print(format_table(rows, title="accelgen"))
    if result.errors:
        print(f"errors: {result.errors}")
    print("\nstack stopped. Policy comparison, load sweep, ablation and overheads: docs/results.md (make results).")
    return 0 if not result.errors else 1


def cmd_up(args: argparse.Namespace) -> int:
    """The whole stack in one process tree, on embedded defaults; Ctrl-C stops it all."""
    import signal
    import threading

    from accelgen.stack import start_stack

    worker_args = ["--time-scale", str(args.time_scale)]
    if args.executor == "vllm" and not args.model:
        args.model = default_model()
        print(f"no --model given: serving the seeded test model {args.model}", flush=True)
    if args.model:
        worker_args += ["--model", args.model]
    stack = start_stack(workers=args.workers, executor=args.executor, worker_args=worker_args,
                        gateway_args=(["--model", args.model] if args.model else []),
                        scheduler_args=["--policy", args.policy], http_port=args.http_port or None,
                        grpc_port=args.grpc_port or None, log_dir=Path(args.log_dir) if args.log_dir else None)
    print(f"AccelGen is up: gateway gRPC {stack.gateway_address}, OpenAI HTTP http://127.0.0.1:{stack.http_port}/v1, "
          f"scheduler {stack.scheduler_address}, Redis {stack.redis_url}, {args.workers} {args.executor} worker(s). "
          "Ctrl-C stops everything.", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            dead = [p.name for p in stack.procs if not p.alive()]
            if dead:
                print(f"{', '.join(dead)} exited; stopping", file=sys.stderr)
                break
    finally:
        stack.stop()
        print("stopped", flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    sp = common_pb2.SamplingParams(temperature=args.temperature, max_new_tokens=args.max_tokens)
    req = gateway_pb2.GenerateRequest(text=args.prompt, sampling_params=sp, app_class=args.app_class, stream=True)
    if args.tbt_ms:
        req.slo.CopyFrom(common_pb2.SLOSpec(ttft_ms=args.ttft_ms, tbt_ms=args.tbt_ms))
    with grpc.insecure_channel(args.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            for resp in stub.Generate(req, timeout=args.timeout):
                if resp.HasField("chunk"):
                    print(resp.chunk.text or "".join(f"{t} " for t in resp.chunk.token_ids), end="", flush=True)
                else:
                    c = resp.complete
                    print(f"\n[{resp.request_id}: {c.completion_tokens} tokens, finish={c.finish_reason}, "
                          f"TTFT {c.ttft_ms:.1f} ms, mean TBT {c.mean_tbt_ms:.1f} ms, SLO met: {c.slo_met}]")
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


# Iteration-level metrics: a client replaying load through the gateway sees tokens and their
# times, not the batches that made them, so for service rows these are unknown, not zero.
_NOT_SEEN_BY_CLIENTS = ("compute_util", "kv_util", "preemptions", "sched_ms_p99")


def _service_rows(result: Any) -> dict[str, dict[str, Any]]:
    unknown = dict.fromkeys(_NOT_SEEN_BY_CLIENTS)
    return {"service (client clock)": {**result.summary, **unknown},
            "service (scheduler clock)": {**result.server_summary, **unknown}}


def cmd_load(args: argparse.Namespace) -> int:
    from bench.loadgen import run_load
    from scheduler_service.core.slo import SLOCatalog
    from scheduler_service.profiles import load_profile

    profile = load_profile(args.profile)
    workload = workload_spec(args).build(profile.max_model_len)
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


def cmd_profile(argv: list[str]) -> int:
    """Measure T(S_f) on a worker's executor and write the device profile the scheduler loads."""
    from worker_service.config import WorkerConfig
    from worker_service.executors.registry import executor_from_config
    from worker_service.profiler import DEFAULT_GRID, Profiler

    ap = argparse.ArgumentParser(prog="accelgen profile", description=cmd_profile.__doc__,
                                 epilog="Any other flag is a worker flag (accelgen worker --help), e.g. --executor "
                                        "vllm --model PATH.")
    ap.add_argument("--out", required=True, help="where to write the profile JSON")
    ap.add_argument("--name", default=None, help="profile name (default: derived from the model)")
    ap.add_argument("--grid", default=",".join(map(str, DEFAULT_GRID)), help="forward sizes to measure")
    ap.add_argument("--repeats", type=int, default=5, help="runs per point; the fastest counts")
    ap.add_argument("--decode-batch", type=int, default=8)
    args, worker_argv = ap.parse_known_args(argv)
    config = WorkerConfig.from_env_and_args(["--scheduler", "unused:0", *worker_argv])
    executor = executor_from_config(config)
    try:
        profiler = Profiler(executor, repeats=args.repeats)
        name = args.name or f"{Path(str(profiler.info.model)).name}_{profiler.info.executor}"
        profile = profiler.run(name, grid=[int(g) for g in args.grid.split(",")], decode_batch=args.decode_batch)
    finally:
        executor.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    profile.save(Path(args.out))
    c = profile.coefficients
    print(f"wrote {args.out}: S_pf = {profile.s_pf} tokens, T_pf = {profile.t_pf_s * 1000:.2f} ms, "
          f"base {c.base_ms:.2f} ms + {c.per_token_ms * 1000:.2f} us/token, decode context "
          f"{c.decode_ctx_ms * 1e6:.1f} ns/token, {profile.num_blocks - 1} blocks of {profile.block_size}")
    for s_f, ms in profile.measured_forward_ms:
        print(f"  T({s_f:>5}) = {ms:8.2f} ms")
    return 0


def _run_service(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


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
    p.add_argument("--routing", default="least-work", help="how requests are spread over workers: least-work or slo-aware")
    p.add_argument("--jobs", type=int, default=None, help="parallel simulations (default: CPU count)")
    p.add_argument("--json", default=None, help="write results JSON here")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="accelgen", description="Heterogeneous-SLO LLM serving (AccelGen)")
    sub = ap.add_subparsers(dest="command", required=True)

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

    up = sub.add_parser("up", help="start Redis, the scheduler, N workers and the gateway; Ctrl-C stops all")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--executor", default="vllm", help="vllm (vLLM's model runner; CPU or GPU) or sim (cost model)")
    up.add_argument("--model", default=None, help="model path or name for vllm workers and the gateway tokenizer")
    up.add_argument("--policy", default="accelgen")
    up.add_argument("--time-scale", type=float, default=1.0, help="sim executor: scale of the simulated iteration time")
    up.add_argument("--grpc-port", type=int, default=50050)
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--log-dir", default=None, help="write each service's log here")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="send one request to a gateway and stream the answer")
    gen.add_argument("prompt")
    gen.add_argument("--gateway", default="127.0.0.1:50050")
    gen.add_argument("--app-class", default="chat")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--ttft-ms", type=float, default=0.0)
    gen.add_argument("--tbt-ms", type=float, default=0.0)
    gen.add_argument("--timeout", type=float, default=600.0)
    gen.set_defaults(func=cmd_generate)

    load = sub.add_parser("load", help="replay a workload against a gateway; prints the same table as sim")
    add_workload_args(load)
    load.add_argument("--gateway", default="127.0.0.1:50050")
    load.add_argument("--profile", default=DEFAULT_PROFILE, help="profile for S_pf (compute utilisation)")
    load.add_argument("--policy-label", default="service", help="row name in the JSON")
    load.add_argument("--json", default=None)
    load.set_defaults(func=cmd_load)

    sub.add_parser("profile", help="measure a worker's iteration time and write a device profile "
                                   "(accelgen profile --help)", add_help=False)
    for name in SERVICES:
        # Dispatched before parsing (see main) so the service's own parser sees every flag.
        sub.add_parser(name, help=f"run the {name} service (accelgen {name} --help for its flags)", add_help=False)

    demo = sub.add_parser("demo", help="start the local stack, run a mixed-SLO workload through it, print the report")
    demo.add_argument("--rate", type=float, default=1.5)
    demo.add_argument("--duration", type=float, default=60.0)
    demo.add_argument("--workers", type=int, default=1)
    demo.add_argument("--executor", default="vllm", help="vllm (the test model on vLLM's CPU runner) or sim")
    demo.set_defaults(func=cmd_demo)
    return ap


SERVICES = {"scheduler": "scheduler_service.main", "worker": "worker_service.main", "gateway": "gateway.main"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:
        return _run_service(SERVICES[argv[0]], argv[1:])
    if argv and argv[0] == "profile":
        return cmd_profile(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
