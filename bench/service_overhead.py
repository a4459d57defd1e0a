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


async def _lane_iterations(redis_url: str, queue_size: int, repeats: int, pipeline: bool = True) -> dict[str, float]:
    """One lane's iterations against a zero-time worker, timed in three parts as the lane runs
    them: the decision (``step`` + the plan's protobuf + ``dispatch``), the result's application
    and the commit hand-off (``complete``, the changes, queueing the Redis write), and the Redis
    write itself, which the lane overlaps with the next iteration (it is awaited here, after
    the clock stopped, so each write is timed alone)."""
    from scheduler_service import convert
    from scheduler_service.committer import Committer
    from scheduler_service.config import SchedulerConfig
    from scheduler_service.lane import WorkerLane

    catalog = SLOCatalog()
    classes = [c.name for c in catalog.classes if c.slo.tbt_s is not None]
    store = RedisStore(redis_url, prefix=f"bench{queue_size}:")
    profile = load_profile()
    info = WorkerInfo(model=profile.name, executor="sim", block_size=128, num_blocks=NUM_BLOCKS,
                      max_model_len=profile.max_model_len, profile_json="", eos_token_id=0, vocab_size=0)
    # The lane's loop is not run: each iteration is driven here, its parts timed.
    config = SchedulerConfig(policy="accelgen", max_num_seqs=MAX_NUM_SEQS, pipeline=pipeline)
    chain = Committer(store, deliver=lambda _changes: None).chain()
    lane = WorkerLane("w0", "127.0.0.1:1", info, profile, config, catalog, chain)
    core = lane.core
    counter = iter(range(10**9))
    now = time.time()
    decisions, applies, writes = [], [], []
    for step in range(MAX_TOKENS + 32 + repeats):
        while len(core.waiting) < queue_size:
            i = next(counter)
            r = Request(f"q{i}", [7] * PROMPT_LEN, SamplingParams(max_tokens=MAX_TOKENS),
                        catalog.get(classes[i % len(classes)]).slo, app_class="chat", arrival_s=now)
            core.add_request(r)
        t0 = time.perf_counter()
        plan = core.step(now)
        convert.plan_to_proto(plan, core.requests, "bench", 0)
        if pipeline:
            core.dispatch(plan)
        t1 = time.perf_counter()
        now += 0.03
        result = IterationResult(plan.iteration, {c.request_id: 100 for c in plan.chunks if c.samples}, 0.0)
        t2 = time.perf_counter()
        outcome = core.complete(plan, result, now)
        changes = lane.changes_for(plan, outcome)
        for r in outcome.finished:
            core.forget(r.request_id)
        write = chain.iteration(changes)
        t3 = time.perf_counter()
        await write
        t4 = time.perf_counter()
        if step >= MAX_TOKENS + 32:
            decisions.append(t1 - t0)
            applies.append(t3 - t2)
            writes.append(t4 - t3)
    await store.close()
    await lane.channel.close()
    d, a, w = (np.array(x) * 1000 for x in (decisions, applies, writes))
    path = d + a

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q))

    return {"decision_p50_ms": pct(d, 50), "decision_p99_ms": pct(d, 99),
            "decision_commit_p50_ms": pct(path, 50), "decision_commit_p99_ms": pct(path, 99),
            "redis_write_p50_ms": pct(w, 50), "redis_write_p99_ms": pct(w, 99),
            "serial_p50_ms": pct(path + w, 50), "serial_p99_ms": pct(path + w, 99)}


def lane_overhead(sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    proc, url = start_redis(key_prefix=None)  # a prefix per queue size
    try:
        return {str(n): asyncio.run(_lane_iterations(url, n, repeats)) for n in sizes}
    finally:
        proc.stop()


def hops(info: scheduler_pb2.ServerInfo) -> dict[str, dict[str, float]]:
    """The scheduler's own timings of where a token's time goes after the model (``ServerInfo``)."""
    return {name: {"p50_ms": h.p50_ms, "p99_ms": h.p99_ms, "samples": h.samples}
            for name, h in (("worker_to_scheduler", info.worker_to_scheduler),
                            ("applied_to_durable", info.applied_to_durable),
                            ("applied_to_gateway", info.applied_to_gateway))}


def _profile_scheduler(pid: int, seconds: float, rate_hz: int = 200) -> dict[str, Any] | None:
    """py-spy on the scheduler process for ``seconds``: its on-CPU seconds by category (None
    without py-spy)."""
    import subprocess
    import tempfile

    from bench.vs_vllm_diagnostics import py_spy_binary, summarise_py_spy

    spy = py_spy_binary()
    if spy is None:
        print("py-spy not found: no profile of the scheduler (pip install py-spy)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scheduler.txt"
        subprocess.run([spy, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "raw", "--nonblocking",
                        "--duration", str(int(seconds)), "--output", str(path)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 60, check=False)
        if not path.exists() or path.stat().st_size == 0:
            return None
        summary = summarise_py_spy(path, rate_hz)
    summary["wall_s"] = seconds
    return summary


def throughput(workers: int, seconds: float = 5.0, per_worker: int = 16, pipeline: bool = True,
               profile_s: float = 0.0) -> dict[str, Any]:
    """Iterations/s of one scheduler process over ``workers`` zero-time sim workers; with
    ``profile_s``, then that long under py-spy (after the measured window: sampling costs CPU)."""
    stack = Stack()
    redis_proc, stack.redis_url = start_redis()
    stack.procs.append(redis_proc)
    try:
        port = free_port()
        stack.scheduler_address = f"127.0.0.1:{port}"
        scheduler = start_scheduler_proc(stack, port, ["--log-level", "WARNING",
                                                       "--pipeline", "true" if pipeline else "false"])
        stack.procs.append(scheduler)
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
        profile = _profile_scheduler(scheduler.popen.pid, profile_s) if profile_s > 0 else None
        return {"iterations_per_s": (b.iterations - a.iterations) / dt, "sched_ms_p50": b.sched_ms_p50,
                "sched_ms_p99": b.sched_ms_p99, "hops": hops(b), "scheduler_profile": profile}
    finally:
        stack.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--workers", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--pipeline", default="true,false", help="scheduler runs with pipelining on and/or off")
    args = ap.parse_args(argv)
    pipelines = [p.strip() == "true" for p in args.pipeline.split(",")]
    out: dict[str, Any] = {"lane_iteration_with_redis": lane_overhead([int(s) for s in args.sizes.split(",")], args.repeats),
                           "scheduler_iterations_per_s": {}}
    for n, row in out["lane_iteration_with_redis"].items():
        print(f"queued {n:>6}: decision + commit p50 {row['decision_commit_p50_ms']:.3f} ms "
              f"p99 {row['decision_commit_p99_ms']:.3f} ms (decision p50 {row['decision_p50_ms']:.3f} "
              f"p99 {row['decision_p99_ms']:.3f}); Redis write, overlapped, p50 {row['redis_write_p50_ms']:.3f} "
              f"p99 {row['redis_write_p99_ms']:.3f} ms")
    for w in [int(x) for x in args.workers.split(",")]:
        for pipeline in pipelines:
            row = throughput(w, args.seconds, pipeline=pipeline)
            key = str(w) if pipeline else f"{w} unpipelined"
            out["scheduler_iterations_per_s"][key] = row
            print(f"{key:>14} zero-time workers: {row['iterations_per_s']:.0f} iterations/s "
                  f"(decision p50 {row['sched_ms_p50']:.3f} ms, p99 {row['sched_ms_p99']:.3f} ms)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
