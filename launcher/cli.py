"""The ``accelgen`` command: one entry point, one subcommand per job.

The service commands (``scheduler``, ``worker``, ``gateway``, ``profile``) and ``up``, ``drain``
and ``generate`` need only the installed packages; ``sim``, ``capacity``, ``load`` and ``demo``
(``launcher.research``) need the source checkout, for ``bench/``. Every subcommand fails with one
line on stderr, never a traceback (``launcher.errors``; ``accelgen --debug CMD`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from accelgen.common.config import HelpFormatter
from launcher.drain import add_command as add_drain_command
from launcher.errors import debug_requested, guarded
from launcher.test_model import default_model
from launcher.top import DEFAULT_SCHEDULER_METRICS_PORT
from launcher.top import add_command as add_top_command
from launcher.up_options import add_options as add_service_options


def cmd_up(args: argparse.Namespace) -> int:
    """The whole stack in one process tree, on embedded defaults, supervised: a service that
    exits is restarted with backoff while the rest keep running; Ctrl-C stops it all."""
    import signal
    import threading

    import shutil
    import tempfile

    from launcher.errors import CliError
    from launcher.stack import RunCertificates, Supervisor, start_stack
    from launcher.up_options import service_args
    from scheduler_service.state.redis_conn import redact_url

    if args.tls_dir and args.insecure:
        raise CliError("--tls-dir and --insecure exclude each other")
    run_dir = Path(tempfile.mkdtemp(prefix="accelgen-up-"))  # --config's tables, one file per service
    try:
        extra = service_args(args, run_dir)  # every file and flag checked before anything starts
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    worker_args = ["--time-scale", str(args.time_scale)] if args.time_scale is not None else []
    if args.executor == "vllm" and not args.model:
        args.model = default_model()
        print(f"no --model given: serving the seeded test model {args.model}", flush=True)
    if args.model:
        worker_args += ["--model", args.model]
    run_certs = None if args.insecure or args.tls_dir else RunCertificates()
    tls_dir = Path(args.tls_dir) if args.tls_dir else run_certs.tls_dir if run_certs else None
    try:
        stack = start_stack(workers=args.workers, executor=args.executor, worker_args=worker_args + extra.worker,
                            gateway_args=(["--model", args.model] if args.model else []) + extra.gateway,
                            scheduler_args=(["--policy", args.policy] if args.policy else []) + extra.scheduler,
                            http_port=args.http_port or None, grpc_port=args.grpc_port or None,
                            log_dir=Path(args.log_dir) if args.log_dir else None, redis_appendfsync="always",
                            tls_dir=tls_dir, scheduler_metrics_port=args.metrics_port or None)
    except BaseException as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_certs is not None:
            run_certs.remove()
        if isinstance(exc, (RuntimeError, TimeoutError)):  # a service that exited or never got ready
            hint = f"; see the logs in {args.log_dir}" if args.log_dir else " (its error is above)"
            raise CliError(f"the stack did not start: {exc}{hint}") from None
        raise
    internal = f"mutual TLS (certificates in {tls_dir})" if tls_dir else "plaintext (--insecure)"
    print(f"AccelGen is up: gateway gRPC {stack.gateway_address}, OpenAI HTTP http://127.0.0.1:{stack.http_port}/v1, "
          f"scheduler {stack.scheduler_address}, Redis {redact_url(stack.redis_url)} (AOF and the password, in "
          f"redis-users.conf, in {stack.redis_dir}), "
          f"{args.workers} {args.executor} worker(s); between the services: {internal}. "
          "A service that exits is restarted; Ctrl-C stops everything.",
          flush=True)
    print("Prometheus metrics: " + ", ".join(f"{name} {url}" for name, url in stack.metrics_urls.items())
          + f"; live view: accelgen top --scheduler-metrics {stack.metrics_urls['scheduler']}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        code = Supervisor(stack).run(done)
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_certs is not None:
            run_certs.remove()
        print("stopped", flush=True)
    return code


def cmd_certs(args: argparse.Namespace) -> int:
    """Make a CA and a certificate per service role for mutual TLS (``--tls-dir`` on each service);
    with ``--issue ROLE --name NAME``, one more certificate from the CA already in ``--out``."""
    from accelgen.common.certs import CertsError, CertsRequest, issue_certificate, make_certs

    try:
        if args.issue:
            if not args.name:
                raise CertsError("--issue needs --name (the host the certificate is for)")
            out = issue_certificate(Path(args.out), args.issue, args.name, hosts=tuple(args.host), days=args.days)
            print(f"wrote {out}: ca.crt, {args.issue}.crt and {args.issue}.key, signed by the CA in {args.out}; "
                  f"use it as that host's --tls-dir")
            return 0
        written = make_certs(CertsRequest(Path(args.out), hosts=tuple(args.host), days=args.days, force=args.force))
    except CertsError as exc:
        print(f"accelgen certs: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out}: ca.crt and, per role (scheduler, worker, gateway), "
          "ROLE.crt and ROLE.key. Give each host ca.crt and its roles' files (--tls-dir); keep ca.key off "
          "the service hosts. One certificate per worker node: accelgen certs --out DIR --issue worker --name NODE.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import os

    import grpc

    from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    sp = common_pb2.SamplingParams(temperature=args.temperature, max_new_tokens=args.max_tokens)
    req = gateway_pb2.GenerateRequest(text=args.prompt, sampling_params=sp, app_class=args.app_class, stream=True)
    if args.tbt_ms:
        req.slo.CopyFrom(common_pb2.SLOSpec(ttft_ms=args.ttft_ms, tbt_ms=args.tbt_ms))
    if args.ca:  # a gateway with client_tls
        creds = grpc.ssl_channel_credentials(root_certificates=Path(args.ca).read_bytes())
        ch = grpc.secure_channel(args.gateway, creds, options=[("grpc.ssl_target_name_override", args.server_name)])
    else:
        ch = grpc.insecure_channel(args.gateway)
    api_key = args.api_key or os.environ.get("ACCELGEN_API_KEY", "")
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    with ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            for resp in stub.Generate(req, timeout=args.timeout, metadata=metadata):
                if resp.HasField("chunk"):
                    print(resp.chunk.text or "".join(f"{t} " for t in resp.chunk.token_ids), end="", flush=True)
                else:
                    c = resp.complete
                    print(f"\n[{resp.request_id}: {c.completion_tokens} tokens, finish={c.finish_reason}, "
                          f"TTFT {c.ttft_ms:.1f} ms, mean TBT {c.mean_tbt_ms:.1f} ms, SLO met: {c.slo_met}]")
        except grpc.RpcError as exc:
            print(f"accelgen generate: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_profile(argv: list[str]) -> int:
    """Measure T(S_f) on a worker's executor and write the device profile the scheduler loads."""
    from accelgen.common.config import ConfigError, HelpFormatter
    from worker_service.config import LOADER
    from worker_service.executors.registry import executor_from_config
    from worker_service.profiler import DEFAULT_GRID, Profiler

    ap = argparse.ArgumentParser(prog="accelgen profile", description=cmd_profile.__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", required=True, help="where to write the profile JSON")
    ap.add_argument("--name", default=None, help="profile name (default: derived from the model)")
    ap.add_argument("--grid", default=",".join(map(str, DEFAULT_GRID)), help="forward sizes to measure")
    ap.add_argument("--repeats", type=int, default=5, help="runs per point; the fastest counts")
    ap.add_argument("--decode-batch", type=int, default=8)
    # The worker's settings (config file, ACCELGEN_WORKER_* and flags), e.g. --executor vllm --model PATH;
    # its scheduler is never dialled.
    LOADER.add_args(ap.add_argument_group("worker settings (as accelgen worker)"))
    args = ap.parse_args(argv)
    try:
        config = LOADER.from_args(args)
    except ConfigError as exc:
        LOADER.exit(exc)
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="accelgen", description="Heterogeneous-SLO LLM serving (AccelGen)")
    sub = ap.add_subparsers(dest="command", required=True)
    try:
        from launcher import research  # needs the source checkout (bench/)
    except SystemExit as exc:  # installed without one: the research commands are not offered
        ap.epilog = str(exc)
    else:
        research.add_commands(sub)
    up = sub.add_parser("up", help="start Redis, the scheduler, N workers and the gateway, restart any that "
                                   "exits; Ctrl-C stops all", allow_abbrev=False, formatter_class=HelpFormatter,
                        description="Every setting of each service is a flag here, prefixed with the service's "
                                    "name (--worker-dtype float32, --scheduler-max-queue 100), or a config file "
                                    "(--worker-config FILE, or --config FILE with [worker], [scheduler] and "
                                    "[gateway] tables).")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--executor", default="vllm", help="vllm (vLLM's model runner; CPU or GPU) or sim (cost model)")
    up.add_argument("--model", default=None, help="model path or name for vllm workers and the gateway tokenizer")
    up.add_argument("--policy", default=None, help="the scheduling policy (default: the scheduler's, accelgen)")
    up.add_argument("--time-scale", type=float, default=None,
                    help="sim executor: scale of the simulated iteration time (default: the worker's, 1)")
    up.add_argument("--grpc-port", type=int, default=50050)
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--metrics-port", type=int, default=DEFAULT_SCHEDULER_METRICS_PORT,
                    help="the scheduler's Prometheus /metrics port (0 = a free one; what `accelgen top` reads by "
                         "default); each worker's is a free port, the gateway's is its HTTP port; all are printed")
    up.add_argument("--log-dir", default=None, help="write each service's log here")
    up.add_argument("--tls-dir", default=None, help="mutual TLS between the services with these certificates "
                                                   "(`accelgen certs`); default: a CA made for this run")
    up.add_argument("--insecure", action="store_true", help="plaintext between the services (all on loopback)")
    add_service_options(up)
    up.set_defaults(func=cmd_up)
    add_drain_command(sub)
    add_top_command(sub)

    certs = sub.add_parser("certs", help="make a CA and a certificate per service for mutual TLS (--tls-dir)",
                           description=cmd_certs.__doc__)
    certs.add_argument("--out", required=True, help="directory to write ca.crt, ca.key and ROLE.crt/ROLE.key to")
    certs.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                       help="a host name or IP address added to every certificate (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.add_argument("--force", action="store_true", help="replace an existing CA in --out")
    certs.add_argument("--issue", choices=["scheduler", "worker", "gateway"], default=None,
                       help="instead: one more certificate for this role from the CA in --out, into --out/NAME/ "
                            "(a worker id is bound to the certificate that registered it: one per worker node)")
    certs.add_argument("--name", default=None, help="with --issue: the host it is for (the directory's name)")
    certs.set_defaults(func=cmd_certs)

    gen = sub.add_parser("generate", help="send one request to a gateway and stream the answer")
    gen.add_argument("prompt")
    gen.add_argument("--gateway", default="127.0.0.1:50050")
    gen.add_argument("--app-class", default="chat")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--ttft-ms", type=float, default=0.0)
    gen.add_argument("--tbt-ms", type=float, default=0.0)
    gen.add_argument("--timeout", type=float, default=600.0)
    gen.add_argument("--ca", default=None, help="a gateway with client_tls: the CA certificate to verify it with")
    gen.add_argument("--server-name", default="gateway.accelgen", help="with --ca: the name the gateway's "
                                                                         "certificate must carry")
    gen.add_argument("--api-key", default=None, help="the gateway's API key, sent as `authorization: Bearer KEY` "
                                                     "(default: $ACCELGEN_API_KEY; prefer it: a flag shows in `ps`)")
    gen.set_defaults(func=cmd_generate)

    sub.add_parser("profile", help="measure a worker's iteration time and write a device profile "
                                   "(accelgen profile --help)", add_help=False)
    for name in SERVICES:
        # Dispatched before parsing (see main) so the service's own parser sees every flag.
        sub.add_parser(name, help=f"run the {name} service (accelgen {name} --help for its flags)", add_help=False)
    return ap


SERVICES = {"scheduler": "scheduler_service.main", "worker": "worker_service.main", "gateway": "gateway.main"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    if command in SERVICES:
        return guarded(command, lambda: _run_service(SERVICES[command], argv[1:]), debug)
    if command == "profile":
        return guarded(command, lambda: cmd_profile(argv[1:]), debug)
    args = build_parser().parse_args(argv)  # a bad flag: argparse's one-line usage error, exit 2
    return guarded(args.command, lambda: int(args.func(args) or 0), debug)


if __name__ == "__main__":
    raise SystemExit(main())
