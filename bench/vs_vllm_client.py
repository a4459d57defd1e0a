"""The load side of ``bench/vs_vllm.py``: vLLM's own benchmark client against a ``Server``.

``run_client`` is one ``vllm bench serve`` run (``vllm.benchmarks.serve``) against the OpenAI
``/v1/completions`` endpoint: random prompts, ``--ignore-eos``, a seed per run. While it is in
flight ``CpuSampler`` takes the CPU seconds of every server process (and of the rest of the
machine) with ``psutil``, and the engine iterations are counted around it (AccelGen: the
scheduler's ``GetServerInfo``, ``server_info``; vLLM: ``/metrics``, ``vllm_metric``).
``warm_up`` is the burst each fresh server gets before any measured run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.vs_vllm_server import Server


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
