"""Scheduling overhead: time of one decision per policy at 100 / 1,000 / 10,000 waiting requests,
beside vLLM V1's own ``Scheduler.schedule()`` on an equivalent queue.

Both sides see the same shape of work: prompts of 256 tokens, 128 output tokens, 4,096 KV
blocks of 128 tokens, at most 256 running requests, a 2,048-token budget for the FCFS
baselines; the waiting queue is topped up to its target size before every decision, and each
decision's plan is completed with a fake result (one token per sampling request) so the
scheduler reaches a steady state of running and waiting requests. Only the decision is timed.

Usage: python -m bench.overhead [--sizes 100,1000,10000] [--repeats 200] [--json FILE] [--no-vllm]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from accelgen.core.kv_blocks import KVBlockManager
from accelgen.core.plan import IterationResult
from accelgen.core.policies.registry import POLICY_NAMES, make_policy
from accelgen.core.request import Request, SamplingParams
from accelgen.core.scheduler import CoreConfig, SchedulerCore
from accelgen.core.slo import SLOCatalog
from accelgen.profiles import load_profile

PROMPT_LEN = 256
MAX_TOKENS = 128
NUM_BLOCKS = 4096
MAX_NUM_SEQS = 256


def time_policy(policy_name: str, queue_size: int, repeats: int, seed: int = 0) -> dict[str, float]:
    profile = load_profile()
    catalog = SLOCatalog()
    classes = [c.name for c in catalog.classes if c.slo.tbt_s is not None]
    rng = np.random.default_rng(seed)
    lengths: dict[str, int] = {}
    policy = make_policy(policy_name, profile, catalog, output_lengths=lengths)
    core = SchedulerCore(policy, profile, kv=KVBlockManager(NUM_BLOCKS, 128), config=CoreConfig(MAX_NUM_SEQS))
    counter = iter(range(10**9))
    now = 0.0
    samples: list[int] = []
    running: list[int] = []
    warmup = MAX_TOKENS + 32
    for step in range(warmup + repeats):
        while len(core.waiting) < queue_size:
            rid = f"q{next(counter)}"
            lengths[rid] = MAX_TOKENS
            core.add_request(Request(rid, [7] * PROMPT_LEN, SamplingParams(max_tokens=MAX_TOKENS),
                                     catalog.get(classes[int(rng.integers(len(classes)))]).slo,
                                     app_class="chat", arrival_s=now))
        if step == warmup:
            gc.collect()
            gc.freeze()
        t0 = time.perf_counter_ns()
        plan = core.step(now)
        dt = time.perf_counter_ns() - t0
        if step >= warmup:
            samples.append(dt)
            running.append(len(core.running))
        now += 0.03
        core.complete(plan, IterationResult(plan.iteration, {c.request_id: 100 for c in plan.chunks if c.samples}, 0.03), now)
    gc.unfreeze()
    a = np.asarray(samples, dtype=np.float64) / 1e6
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "mean_running": float(np.mean(running))}


def time_vllm(sizes: Sequence[int], repeats: int) -> dict[int, dict[str, float]] | str:
    """vLLM's own scheduler on the same queue shape; a reason string if vLLM is unavailable."""
    try:
        from bench.vllm_sched_overhead import time_vllm_schedule
        from scripts.make_test_model import make_test_model
    except ImportError as exc:  # vllm not installed (e.g. a scheduler-only node)
        return f"vLLM not importable: {exc}"
    model_dir = make_test_model(Path(".cache") / "test-model")
    return time_vllm_schedule(model_dir, queue_sizes=sizes, repeats=repeats, prompt_len=PROMPT_LEN,
                              max_tokens=MAX_TOKENS, num_gpu_blocks=NUM_BLOCKS,
                              engine_kwargs={"max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": 2048})


def run(sizes: Sequence[int], repeats: int, with_vllm: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {"config": {"prompt_len": PROMPT_LEN, "max_tokens": MAX_TOKENS, "num_blocks": NUM_BLOCKS,
                                          "max_num_seqs": MAX_NUM_SEQS, "repeats": repeats, "sizes": list(sizes)},
                               "policies": {}}
    for name in POLICY_NAMES:
        results["policies"][name] = {str(n): time_policy(name, n, repeats) for n in sizes}
    if with_vllm:
        v = time_vllm(sizes, repeats)
        results["vllm_v1_scheduler"] = v if isinstance(v, str) else {str(k): val for k, val in v.items()}
    return results


def format_results(results: dict[str, Any]) -> str:
    sizes = results["config"]["sizes"]
    rows = dict(results["policies"])
    if isinstance(results.get("vllm_v1_scheduler"), dict):
        rows["vLLM V1 Scheduler.schedule()"] = results["vllm_v1_scheduler"]
    width = max(len(k) for k in rows) + 2
    head = "scheduler".ljust(width) + "".join(f"{n:>9} p50 ms {n:>7} p99 ms".rjust(30) for n in sizes)
    lines = [head, "-" * len(head)]
    for name, per in rows.items():
        cells = "".join(f"{per[str(n)]['p50_ms']:>15.3f}{per[str(n)]['p99_ms']:>15.3f}" for n in sizes)
        lines.append(name.ljust(width) + cells)
    if isinstance(results.get("vllm_v1_scheduler"), str):
        lines.append(f"vLLM scheduler: {results['vllm_v1_scheduler']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="scheduling-decision overhead per policy, and vLLM's scheduler")
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's scheduler (no vllm installed)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = run(sizes, args.repeats, with_vllm=not args.no_vllm)
    print(format_results(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
