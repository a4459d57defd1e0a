"""One campaign: a phase per fault class (its own stack, the load running, faults at seeded
random moments), then one fault-free reference run of every request sent, then the comparison.

A phase: start the stack; start the load; after a warm-up, repeat: wait a random gap, inject
one fault while a probe loop sends small requests (``serving_s`` = until one succeeds end to
end), wait until the broken part is back (``ready_s``, from the class) and the whole stack is
ready again. Then stop the load, let every accepted request finish, and read each request's
final state from the scheduler (``GetRequest``). Nothing here decides what is lost or differs:
``verdict`` does, from the records, the final states and the reference.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog

from accelgen.v1 import common_pb2, scheduler_pb2_grpc
from bench.faults.injectors import BY_NAME, FaultClass, Timing
from bench.faults.topology import Topology, TopologyConfig
from bench.faults.workload import GatewayClient, LoadRunner, RequestSpec, make_specs, run_all

log = structlog.get_logger("faults")
LOG_PATTERNS = {"too_many_pings": re.compile(rb"too_many_pings"), "goaway": re.compile(rb"GOAWAY")}
UNFINISHED = {"waiting", "running", "preempted"}


@dataclass
class Settings:
    executor: str = "sim"
    seed: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # class -> how many
    concurrency: int = 6
    gap_s: tuple[float, float] = (0.5, 3.0)  # random wait before each fault
    warmup_s: float = 3.0
    time_scale: float = 0.3
    heartbeat_interval_s: float = 0.5
    heartbeat_ttl_s: float = 2.0
    lease_ttl_s: float = 5.0
    drain_timeout_s: float = 180.0
    out_dir: Path = Path("bench/out/faults")
    model_dir: Path | None = None  # vllm

    def timing(self) -> Timing:
        return Timing(heartbeat_ttl_s=self.heartbeat_ttl_s, lease_ttl_s=self.lease_ttl_s)

    def topology(self, overrides: dict[str, Any], log_level: str = "INFO") -> TopologyConfig:
        sched = ["--heartbeat-interval-s", str(self.heartbeat_interval_s), "--heartbeat-ttl-s",
                 str(self.heartbeat_ttl_s), "--lease-ttl-s", str(self.lease_ttl_s)]
        if self.executor == "vllm":
            from bench.vs_vllm_server import worker_args

            assert self.model_dir is not None
            return TopologyConfig(executor="vllm", scheduler_args=sched, worker_args=worker_args(self.model_dir),
                                  gateway_args=["--model", str(self.model_dir)], worker_env={
                                      "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                                  log_level=log_level, start_timeout_s=600.0, **overrides)
        return TopologyConfig(scheduler_args=sched, worker_args=["--time-scale", str(self.time_scale)],
                              log_level=log_level, **overrides)


class Prober:
    """From the moment of a fault: small requests, one after another, until one succeeds."""

    def __init__(self, topo: Topology, tag: str) -> None:
        self.client = GatewayClient(topo.gateway_endpoints, timeout_s=10.0, attach_for_s=0.0)
        self.tag, self.serving_s, self.attempts = tag, None, 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set() and time.monotonic() - self._t0 < 120:
            self.attempts += 1
            spec = RequestSpec(f"probe-{self.tag}-{self.attempts}", "batch", (11, 12, 13, 14), 2, "grpc")
            if self.client.run(spec, gateway=self.attempts % len(self.client.gateways)).finished:
                self.serving_s = time.monotonic() - self._t0
                return
            self._stop.wait(0.2)

    def result(self, timeout_s: float = 60.0) -> float | None:
        self._thread.join(timeout=timeout_s)
        self._stop.set()
        self.client.close()
        return self.serving_s


def final_states(topo: Topology, ids: list[str], timeout_s: float = 60.0) -> dict[str, dict | None]:
    """Each request's state at the scheduler that leads now: None = the scheduler does not know it."""
    out: dict[str, dict | None] = {}
    deadline = time.monotonic() + timeout_s
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        leader = topo.leader()
        if leader is None:
            time.sleep(0.2)
            continue
        with grpc.insecure_channel(topo.scheduler_addresses[leader]) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            retry = []
            for rid in pending:
                try:
                    st = stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5)
                    out[rid] = {"status": st.status, "output_ids": list(st.output_ids),
                                "finish_reason": st.finish_reason}
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        out[rid] = None
                    else:
                        retry.append(rid)
            pending = retry
    for rid in pending:
        out[rid] = {"status": "unreadable", "output_ids": [], "finish_reason": ""}
    return out


def drain(topo: Topology, ids: list[str], timeout_s: float) -> dict[str, dict | None]:
    """Wait until no known request is still unfinished (or the timeout), then the final states."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = final_states(topo, ids)
        open_ = [r for r, s in states.items() if s is not None and s["status"] in UNFINISHED | {"unreadable"}]
        if not open_ or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def grep_logs(log_dir: Path) -> dict[str, dict[str, int]]:
    """``too_many_pings`` / ``GOAWAY`` lines in each service's log."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(log_dir.glob("*.log")):
        data = path.read_bytes()
        hits = {k: len(p.findall(data)) for k, p in LOG_PATTERNS.items()}
        if any(hits.values()):
            counts[path.stem] = hits
    return counts


def run_phase(fc: FaultClass, n: int, s: Settings) -> dict[str, Any]:
    rng = random.Random(f"{s.seed}:{fc.name}")
    log_dir = s.out_dir / "logs" / fc.name
    topo = Topology(s.topology(fc.topology), log_dir)
    t_start = time.monotonic()
    try:
        topo.start()
    except Exception as exc:
        return {"class": fc.name, "title": fc.title, "status": "not run", "reason": f"stack did not start: {exc}"}
    events: list[dict] = []
    client = GatewayClient(topo.gateway_endpoints)
    runner = LoadRunner(client, make_specs(fc.name, s.seed), s.concurrency, seed=s.seed).start()
    try:
        time.sleep(s.warmup_s)
        for k in range(n):
            time.sleep(rng.uniform(*s.gap_s))
            prober = Prober(topo, f"{fc.name}-{k}")
            at = time.monotonic() - t_start
            try:
                ev = fc.inject(topo, rng, s.timing())
            except Exception as exc:  # a harness problem, reported with the fault, not fatal
                ev = {"target": "?", "ready_s": None, "error": f"{type(exc).__name__}: {exc}"}
            ev.update(at_s=round(at, 2), serving_s=prober.result())
            ev["stack_ready"] = _wait_ready(topo, 90.0)
            events.append(ev)
            log.info("fault", cls=fc.name, n=k + 1, of=n, **{k2: v for k2, v in ev.items() if k2 != "cls"})
        runner.stop()
        records = runner.records
        states = drain(topo, [r.request_id for r in records if r.request_id], s.drain_timeout_s)
    finally:
        runner.stop(timeout_s=5)
        client.close()
        procs = {p.name: {"starts": p.starts, "exit_codes": p.exit_codes} for p in topo.all_procs()}
        topo.stop()
    return {"class": fc.name, "title": fc.title, "status": "run", "events": events,
            "records": [r.to_json() for r in records], "final": states, "log_counts": grep_logs(log_dir),
            "procs": procs, "wall_s": round(time.monotonic() - t_start, 1)}


def _wait_ready(topo: Topology, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if topo.ready():
            return True
        time.sleep(0.2)
    return False


def reference_run(specs: list[RequestSpec], s: Settings) -> dict[str, Any]:
    """Every request once on a fault-free stack: the outputs the faulted runs must match."""
    t0 = time.monotonic()
    cfg = s.topology({}, log_level="WARNING")
    cfg.scheduler_args += ["--admission", "false"]  # admission decides nothing about outputs
    if s.executor == "sim":
        cfg.worker_args = ["--time-scale", "0"]  # outputs do not depend on the clock
    topo = Topology(cfg, s.out_dir / "logs" / "reference")
    topo.start()
    try:
        client = GatewayClient(topo.gateway_endpoints, timeout_s=600.0)
        records = run_all(client, specs, concurrency=16)
        client.close()
        states = drain(topo, [r.request_id for r in records.values() if r.request_id], s.drain_timeout_s)
    finally:
        topo.stop()
    return {"records": {rid: r.to_json() for rid, r in records.items()}, "final": states,
            "wall_s": round(time.monotonic() - t0, 1)}


def run_campaign(s: Settings) -> dict[str, Any]:
    t0 = time.monotonic()
    phases = [run_phase(BY_NAME[name], n, s) for name, n in s.faults.items()]
    specs = [RequestSpec(**{**r["spec"], "prompt": tuple(r["spec"]["prompt"])})
             for p in phases if p["status"] == "run" for r in p["records"]]
    reference = reference_run(specs, s) if specs else {"records": {}, "final": {}, "wall_s": 0.0}
    return {"settings": {"executor": s.executor, "seed": s.seed, "faults": s.faults, "concurrency": s.concurrency,
                         "gap_s": list(s.gap_s), "time_scale": s.time_scale,
                         "heartbeat_ttl_s": s.heartbeat_ttl_s, "lease_ttl_s": s.lease_ttl_s},
            "phases": phases, "reference": reference, "wall_s": round(time.monotonic() - t0, 1)}
