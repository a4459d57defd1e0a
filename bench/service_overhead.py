"""Service overhead: what the scheduler adds per iteration beyond the policy's decision.

A. One lane, in process: decision + the iteration's Redis write (one MULTI/EXEC round trip) at
   100 / 1,000 / 10,000 queued requests, against a private redis-server.
B. The whole scheduler process driving 1 / 4 / 16 sim workers whose iterations take zero time
   (pure overhead: decision, gRPC hop, Redis write), in iterations per second.

Usage: python -m bench.service_overhead [--json FILE] [--workers 1,4,16] [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any, Sequence

import grpc
import numpy as np

from accelgen.common.grpc_server import free_port
from launcher.stack import Stack, start_redis, start_scheduler_proc, start_worker_proc, _wait_workers
from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from bench.overhead import MAX_NUM_SEQS, MAX_TOKENS, NUM_BLOCKS, PROMPT_LEN
from accelgen.core.plan import IterationResult
from accelgen.core.request import Request, SamplingParams
from accelgen.core.slo import SLOCatalog
from accelgen.core.worker_info import WorkerInfo
from accelgen.profiles import load_profile
from scheduler_service.state.store import RedisStore


async def _lane_iterations(redis_url: str, queue_size: int, repeats: int) -> dict[str, float]:
    from scheduler_service.committer import Committer
    from scheduler_service.config import SchedulerConfig
    from scheduler_service.lane import WorkerLane

    catalog = SLOCatalog()
    classes = [c.name for c in catalog.classes if c.slo.tbt_s is not None]
    store = RedisStore(redis_url, prefix=f"bench{queue_size}:")
    profile = load_profile()
    info = WorkerInfo(model=profile.name, executor="sim", block_size=128, num_blocks=NUM_BLOCKS,
                      max_model_len=profile.max_model_len, profile_json="", eos_token_id=0, vocab_size=0)
    # The lane's loop is not run: each iteration is driven here, its write awaited and timed.
    config = SchedulerConfig(policy="accelgen", max_num_seqs=MAX_NUM_SEQS)
    lane = WorkerLane("w0", "127.0.0.1:1", info, profile, config, catalog,
                      Committer(store, deliver=lambda _changes: None).chain())
    core = lane.core
    counter = iter(range(10**9))
    now = time.time()
    samples, decisions = [], []
    for step in range(MAX_TOKENS + 32 + repeats):
        while len(core.waiting) < queue_size:
            i = next(counter)
            r = Request(f"q{i}", [7] * PROMPT_LEN, SamplingParams(max_tokens=MAX_TOKENS),
                        catalog.get(classes[i % len(classes)]).slo, app_class="chat", arrival_s=now)
            core.add_request(r)
        t0 = time.perf_counter()
        plan = core.step(now)
        t1 = time.perf_counter()
        now += 0.03
        outcome = core.complete(plan, IterationResult(plan.iteration, {c.request_id: 100 for c in plan.chunks if c.samples}, 0.0), now)
        await store.commit_iteration(lane.changes_for(plan, outcome))  # not overlapped here: measured
        t2 = time.perf_counter()
        for r in outcome.finished:
            core.forget(r.request_id)
        if step >= MAX_TOKENS + 32:
            samples.append(t2 - t0)
            decisions.append(t1 - t0)
    await store.close()
    await lane.channel.close()
    a, d = np.array(samples) * 1000, np.array(decisions) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "decision_p50_ms": float(np.percentile(d, 50)), "redis_p50_ms": float(np.percentile(a - d, 50))}


def lane_overhead(sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    proc, url = start_redis(key_prefix=None)  # a prefix per queue size
    try:
        return {str(n): asyncio.run(_lane_iterations(url, n, repeats)) for n in sizes}
    finally:
        proc.stop()


def throughput(workers: int, seconds: float = 5.0, per_worker: int = 16) -> dict[str, float]:
    """Iterations/s of one scheduler process over ``workers`` zero-time sim workers."""
    stack = Stack()
    redis_proc, stack.redis_url = start_redis()
    stack.procs.append(redis_proc)
    try:
        port = free_port()
        stack.scheduler_address = f"127.0.0.1:{port}"
        stack.procs.append(start_scheduler_proc(stack, port, ["--log-level", "WARNING"]))
        for i in range(workers):
            stack.procs.append(start_worker_proc(stack, f"worker-{i}", ["--executor", "sim", "--time-scale", "0",
                                                                        "--log-level", "WARNING"]))
        _wait_workers(stack.scheduler_address, workers, 120.0, stack)
        with grpc.insecure_channel(stack.scheduler_address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            for i in range(workers * per_worker):
                stub.Submit(scheduler_pb2.SubmitRequest(
                    request_id=f"t{i}", prompt_token_ids=[7] * 32, app_class="summarization",
                    sampling_params=common_pb2.SamplingParams(max_new_tokens=2000, ignore_eos=True)), timeout=10)
            time.sleep(1.0)
            a = stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
            t0 = time.monotonic()
            time.sleep(seconds)
            b = stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
            dt = time.monotonic() - t0
        return {"iterations_per_s": (b.iterations - a.iterations) / dt, "sched_ms_p50": b.sched_ms_p50,
                "sched_ms_p99": b.sched_ms_p99}
    finally:
        stack.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--workers", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"lane_iteration_with_redis": lane_overhead([int(s) for s in args.sizes.split(",")], args.repeats),
                           "scheduler_iterations_per_s": {}}
    for n, row in out["lane_iteration_with_redis"].items():
        print(f"queued {n:>6}: decision+Redis p50 {row['p50_ms']:.3f} ms p99 {row['p99_ms']:.3f} ms "
              f"(decision p50 {row['decision_p50_ms']:.3f}, Redis p50 {row['redis_p50_ms']:.3f})")
    for w in [int(x) for x in args.workers.split(",")]:
        row = throughput(w, args.seconds)
        out["scheduler_iterations_per_s"][str(w)] = row
        print(f"{w:>2} zero-time workers: {row['iterations_per_s']:.0f} iterations/s "
              f"(decision p50 {row['sched_ms_p50']:.3f} ms, p99 {row['sched_ms_p99']:.3f} ms)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
