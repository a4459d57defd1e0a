"""The fault classes: what each breaks, what it needs from the stack, and when it counts as recovered.

Each class names the topology it needs (a standby scheduler, Sentinel, link proxies, more than
one gateway). ``inject`` does one fault and blocks until the broken part is back (or a timeout),
returning the time that took (``ready_s``) and what it saw.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from bench.faults.topology import SENTINEL_NAME, Topology, health_status

RECOVERY_TIMEOUT_S = 60.0


@dataclass
class Timing:
    """Durations the classes derive their holds from (the scheduler's settings of the campaign)."""

    heartbeat_ttl_s: float = 2.0
    lease_ttl_s: float = 5.0


def _until(predicate: Callable[[], bool], timeout_s: float = RECOVERY_TIMEOUT_S) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


@dataclass
class FaultClass(ABC):
    name: str
    title: str
    weight: int  # share of the campaign's faults
    topology: dict = field(default_factory=dict)  # TopologyConfig overrides

    @abstractmethod
    def inject(self, topo: Topology, rng: random.Random, timing: Timing) -> dict:
        """Inject one fault and wait for recovery: ``{"target", "ready_s", ...}``."""


def _worker_ready(topo: Topology, i: int) -> bool:
    return (topo.workers[i].alive() and health_status(f"127.0.0.1:{topo.worker_ports[i]}") == "SERVING"
            and topo.live_workers() >= topo.cfg.workers)


class KillScheduler(FaultClass):
    def inject(self, topo, rng, timing):
        i = topo.leader() or 0
        s = topo.schedulers[i]
        starts = s.starts
        s.signal(signal.SIGKILL)
        ready = _until(lambda: s.starts > starts and topo.leader() is not None
                       and topo.live_workers() >= topo.cfg.workers)
        return {"target": s.name, "ready_s": ready}


class KillWorker(FaultClass):
    def inject(self, topo, rng, timing):
        i = rng.randrange(len(topo.workers))
        w = topo.workers[i]
        starts = w.starts
        w.signal(signal.SIGKILL)
        ready = _until(lambda: w.starts > starts and _worker_ready(topo, i))
        return {"target": w.name, "ready_s": ready}


class KillGateway(FaultClass):
    def inject(self, topo, rng, timing):
        i = rng.randrange(len(topo.gateways))
        g = topo.gateways[i]
        starts = g.starts
        g.signal(signal.SIGKILL)
        addr = topo.gateway_endpoints[i][0]
        ready = _until(lambda: g.starts > starts and health_status(addr) == "SERVING")
        return {"target": g.name, "ready_s": ready}


class KillRedis(FaultClass):
    def inject(self, topo, rng, timing):
        r = topo.redis[0]
        starts = r.starts
        r.signal(signal.SIGKILL)
        ready = _until(lambda: r.starts > starts and topo.ready())
        return {"target": r.name, "ready_s": ready}


class RedisFailover(FaultClass):
    def inject(self, topo, rng, timing):
        old = topo.master_port()
        _until(topo.sentinel_sees_replica, 30.0)  # sentinel learns replicas from INFO, every 10 s
        client = redis.Redis(port=topo.sentinel_port, socket_timeout=2)
        try:
            client.execute_command("SENTINEL", "FAILOVER", SENTINEL_NAME)
        finally:
            client.close()
        ready = _until(lambda: topo.master_port() not in (None, old) and topo.ready())
        # The next failover needs a synced replica: wait for the old master to follow the new one.
        synced = _until(lambda: _synced_replica(old), 30.0)
        return {"target": f"redis:{old}->{topo.master_port()}", "ready_s": ready, "replica_resynced": synced is not None}


def _synced_replica(port: int | None) -> bool:
    try:
        info = redis.Redis(port=port, socket_timeout=1).info("replication")
        return info.get("role") == "slave" and info.get("master_link_status") == "up"
    except (redis.exceptions.RedisError, TypeError):
        return False


class StopScheduler(FaultClass):
    """SIGSTOP the leader past its lease with a standby running; SIGCONT once the standby leads."""

    def inject(self, topo, rng, timing):
        i = topo.leader()
        if i is None:
            return {"target": "scheduler", "ready_s": None, "error": "no leader before the fault"}
        s, hold = topo.schedulers[i], timing.lease_ttl_s + 2.0
        starts, exits = s.starts, len(s.exit_codes)
        t0 = time.monotonic()
        s.signal(signal.SIGSTOP)
        takeover = _until(lambda: topo.leader() not in (None, i), 30.0)  # the standby serves
        ready = _until(lambda: topo.leader() not in (None, i) and topo.live_workers() >= topo.cfg.workers)
        ready = None if ready is None else time.monotonic() - t0
        time.sleep(max(0.0, hold - (time.monotonic() - t0)))
        s.signal(signal.SIGCONT)
        # The deposed leader must stop serving and exit (3) so its supervisor restarts it as a standby.
        both = False
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and len(s.exit_codes) == exits:
            if health_status(topo.scheduler_addresses[i]) == "SERVING" and topo.leader() != i:
                both = True  # the old leader answers ready while another leads
            time.sleep(0.1)
        old_exit = s.exit_codes[exits] if len(s.exit_codes) > exits else None
        if old_exit is not None:
            _until(lambda: s.starts > starts, 10.0)
        return {"target": s.name, "ready_s": ready, "takeover_s": takeover, "held_s": hold, "deposed_exit": old_exit,
                "both_ready_seen": both}


class StopWorker(FaultClass):
    """SIGSTOP a worker for longer than the heartbeat TTL, then SIGCONT."""

    def inject(self, topo, rng, timing):
        i = rng.randrange(len(topo.workers))
        w, hold = topo.workers[i], timing.heartbeat_ttl_s + 1.0
        w.signal(signal.SIGSTOP)
        time.sleep(hold)
        w.signal(signal.SIGCONT)
        ready = _until(lambda: _worker_ready(topo, i))
        return {"target": w.name, "ready_s": None if ready is None else hold + ready, "held_s": hold}


class CutLink(FaultClass):
    """Drop every scheduler <-> worker connection of one worker and refuse new ones for a while."""

    def inject(self, topo, rng, timing):
        i = rng.randrange(len(topo.workers))
        hold = rng.uniform(0.5, 2 * timing.heartbeat_ttl_s)
        for p in topo.proxies[i]:
            p.cut(hold)
        time.sleep(hold)
        ready = _until(lambda: _worker_ready(topo, i))
        return {"target": f"link:worker-{i}", "ready_s": None if ready is None else hold + ready, "held_s": hold}


CLASSES: list[FaultClass] = [
    KillScheduler("kill_scheduler", "kill -9 the scheduler (restarted)", 30),
    KillWorker("kill_worker", "kill -9 a worker (restarted)", 40),
    KillGateway("kill_gateway", "kill -9 a gateway of two (restarted)", 25, {"gateways": 2}),
    KillRedis("kill_redis", "kill -9 Redis, AOF on (restarted)", 30),
    RedisFailover("redis_failover", "Redis failover under Sentinel (SENTINEL FAILOVER)", 12, {"sentinel": True}),
    StopScheduler("stop_scheduler", "SIGSTOP the leader past its lease, standby running; SIGCONT", 15,
                  {"standby": True}),
    StopWorker("stop_worker", "SIGSTOP a worker past the heartbeat TTL; SIGCONT", 25),
    CutLink("cut_link", "cut scheduler <-> worker traffic of one worker (proxy)", 30, {"proxies": True}),
]
BY_NAME = {c.name: c for c in CLASSES}


def allocate(total: int, names: list[str]) -> dict[str, int]:
    """Split ``total`` faults over the classes ``names`` by weight (at least one each)."""
    weights = {n: BY_NAME[n].weight for n in names}
    shares = {n: total * w / max(1, sum(weights.values())) for n, w in weights.items()}
    counts = {n: int(v) for n, v in shares.items()}
    for n in sorted(shares, key=lambda k: counts[k] - shares[k])[: max(0, total - sum(counts.values()))]:
        counts[n] += 1  # largest remainders first, so the counts add up to ``total``
    return {n: max(1, c) for n, c in counts.items()}
