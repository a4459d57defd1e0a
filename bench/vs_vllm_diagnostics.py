"""Diagnostics of where the time goes, run beside ``bench/vs_vllm.py``'s comparison (not part of it).

A keep-alive probe (``probe_keepalive``: the first streamed event on a reused HTTP connection),
py-spy over every server process during a saturation run (``profile_run``, summarised by
category with ``summarise_py_spy``), and a microbenchmark of the worker's decode step with 2 vs 1
torch threads (``decode_microbench``, each variant in a fresh ``python -m bench.vs_vllm
--decode-microbench`` process). ``scripts/make_vllm_comparison.py`` runs them with the comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench.vs_vllm_client import BenchConfig, run_client
from bench.vs_vllm_server import (DTYPE, KV_CACHE_GIB, MAX_MODEL_LEN, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, ROOT,
                                  Server, _vllm_env, ensure_model)


def probe_keepalive(server: Server, n: int = 8, max_tokens: int = 16) -> dict[str, Any]:
    """``n`` streamed completions one after the other on ONE keep-alive HTTP connection, as an
    SDK client reuses its connection: time to the response headers and to the first SSE event,
    and how many socket reads each answer took (``max_tokens`` tokens, one event per token when
    nothing coalesces them). The first request opens the connection."""
    import asyncio

    import aiohttp

    prompt = " ".join(f"word{i % 97}" for i in range(200))

    async def go() -> dict[str, Any]:
        heads, firsts, reads = [], [], []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for i in range(n):
                body = {"model": server.model, "prompt": f"{i} {prompt}", "max_tokens": max_tokens, "stream": True,
                        "ignore_eos": True, "temperature": 0}
                t0 = time.perf_counter()
                async with session.post(f"{server.base_url}/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    heads.append(round(1000 * (time.perf_counter() - t0), 1))
                    first, count = None, 0
                    async for _ in resp.content.iter_any():
                        count += 1
                        if first is None:
                            first = round(1000 * (time.perf_counter() - t0), 1)
                    firsts.append(first)
                    reads.append(count)
        return {"requests": n, "max_tokens": max_tokens, "headers_ms": heads, "first_event_ms": firsts, "reads": reads}

    return asyncio.run(go())


# -- where the time goes: py-spy over every server process ---------------------------------------
# Each sampled stack goes to the first category any of whose markers occurs in one of its frames
# (ordered from specific to generic). py-spy cannot see inside C extensions: time in gRPC's C core
# shows up as the asyncio callback (``Handle._run``) or the poller thread (``Thread.run``) that
# called it, and is reported as such.
PY_SPY_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("model forward (vLLM model runner)", ("_model_forward (",)),
    ("vLLM runner: inputs, sampling, bookkeeping", ("gpu_model_runner.py", "cpu_model_runner.py")),
    ("AccelGen plan -> vLLM translation", ("vllm_executor.py", "request_table.py", "worker_service/convert.py",
                                           "worker_service/plan.py")),
    ("vLLM scheduler", ("vllm/v1/core/sched",)),
    ("tokenise / detokenise", ("tokeniz", "detokeniz")),
    ("Redis client", ("redis/",)),
    ("scheduling decision (AccelGen core)", ("accelgen/core/",)),
    ("HTTP + SSE (uvicorn, starlette, FastAPI, JSON)", ("uvicorn/", "starlette/", "fastapi/", "json/", "pydantic",
                                                        "openai_http.py", "openai_protocol.py")),
    ("vLLM engine <-> worker / API IPC (zmq, shm queue, spin-wait)", ("zmq/", "shm_broadcast", "distributed/utils.py",
                                                                      "msgspec", "serial_utils")),
    ("vLLM engine / output processing", ("vllm/v1/engine", "vllm/entrypoints", "vllm/v1/executor")),
    ("gRPC (Python side) + protobuf", ("grpc/", "_pb2", "protobuf", "scheduler_service/convert.py",
                                       "gateway/convert.py", "scheduler_client.py")),
    ("logging", ("structlog", "logging/")),
]
_LEAF_CATEGORIES = {"Thread.run": "gRPC C core / other C (poller thread, not visible)",
                    "Handle._run": "asyncio callbacks into C (gRPC core, not visible)",
                    "EpollSelector.select": "asyncio poll (select)"}


def _categorise(frames: list[str]) -> str:
    for name, markers in PY_SPY_CATEGORIES:
        if any(m in f for f in frames for m in markers):
            return name
    leaf = frames[-1].split(" (")[0] if frames else ""
    return _LEAF_CATEGORIES.get(leaf, "other Python (asyncio, servicers, glue)")


def summarise_py_spy(path: Path, rate_hz: int) -> dict[str, Any]:
    """Collapsed-stack file -> active seconds by category and the top self-time frames."""
    import collections

    cats: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        count = int(n)
        total += count
        cats[_categorise(frames)] += count
        leaf = frames[-1]
        leaf = leaf.split("site-packages/")[-1] if "site-packages/" in leaf else leaf.replace(str(ROOT) + "/", "")
        leaves[leaf] += count
    return {"active_s": round(total / rate_hz, 2),
            "categories": {k: round(v / rate_hz, 2) for k, v in cats.most_common()},
            "top_self": [(k, round(v / rate_hz, 2)) for k, v in leaves.most_common(8)]}


def py_spy_binary() -> str | None:
    return shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def profile_run(server: Server, model_dir: Path, cfg: BenchConfig, out_dir: Path, rate_hz: int = 100,
                seed: int = 4242) -> dict[str, Any]:
    """One saturation run with py-spy attached to every server process (its throughput is perturbed
    by the sampling and is reported separately from the comparison). Returns per-service
    breakdowns keyed by service name (processes of one service summed)."""
    import subprocess

    spy = py_spy_binary()
    if spy is None:
        raise RuntimeError("py-spy not found (pip install py-spy into the venv)")
    out_dir.mkdir(parents=True, exist_ok=True)
    duration = max(30, int(cfg.num_prompts * cfg.output_len / 500) + 30)  # upper bound; stopped at the end
    spies = []
    for name, pids in server.pids().items():
        if name == "redis":
            continue
        for pid in pids:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            path = out_dir / f"{safe}-{pid}.txt"
            spies.append((name, path, subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "raw", "--nonblocking",
                 "--duration", str(duration), "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(1.0)  # py-spy attaches
    try:
        row = run_client(server, model_dir, float("inf"), cfg, seed=seed)
    finally:
        import signal

        for _, _, p in spies:  # stop sampling when the run ends (py-spy writes its output on SIGINT)
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _, _, p in spies:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    services: dict[str, dict[str, Any]] = {}
    for name, path, _ in spies:
        if not path.exists() or path.stat().st_size == 0:
            continue
        s = summarise_py_spy(path, rate_hz)
        agg = services.setdefault(name, {"active_s": 0.0, "categories": {}, "top_self": []})
        agg["active_s"] = round(agg["active_s"] + s["active_s"], 2)
        for k, v in s["categories"].items():
            agg["categories"][k] = round(agg["categories"].get(k, 0.0) + v, 2)
        agg["top_self"] = sorted(agg["top_self"] + s["top_self"], key=lambda kv: -kv[1])[:8]
    for agg in services.values():
        agg["categories"] = dict(sorted(agg["categories"].items(), key=lambda kv: -kv[1]))
    return {"run": {k: v for k, v in row.items() if k != "raw"}, "services": services, "rate_hz": rate_hz}


# -- the worker's decode step with 1 vs 2 OpenMP threads --------------------------------------------
def _decode_microbench(out: Path, batches: Sequence[int] = (1, 8, 64), repeats: int = 50) -> None:
    """In this process: build the worker's VllmExecutor as the worker does and time decode
    iterations on a separate thread (the worker runs plans on its executor thread)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from worker_service.executors.vllm_executor import VllmExecutor
    from worker_service.profiler import Profiler

    os.environ.update(_vllm_env())
    ex = VllmExecutor(str(ensure_model()), dtype=DTYPE, max_model_len=MAX_MODEL_LEN, kv_cache_space_gb=KV_CACHE_GIB,
                      max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS)
    try:
        prof = Profiler(ex, repeats=repeats)
        with ThreadPoolExecutor(1) as pool:
            threads = pool.submit(torch.get_num_threads).result()
            ms = {str(b): round(pool.submit(prof.decode_ms, b, 256).result(), 3) for b in batches}
    finally:
        ex.close()
    out.write_text(json.dumps({"torch_threads": threads, "decode_ms": ms}))


def decode_microbench(env_variants: dict[str, dict[str, str]]) -> dict[str, Any]:
    """``_decode_microbench`` in a fresh process per environment variant (OpenMP reads its
    environment once). Returns {variant: {"torch_threads": n, "decode_ms": {batch: ms}}}."""
    import subprocess

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in env_variants.items():
            out = Path(tmp) / f"{name}.json"
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            env.update(extra)
            subprocess.run([sys.executable, "-m", "bench.vs_vllm", "--decode-microbench", str(out)], cwd=ROOT, env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
            results[name] = json.loads(out.read_text())
    return results
