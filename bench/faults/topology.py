"""The stack of one campaign phase, started service by service as systemd would.

Redis (AOF on, its own data directory; or master + replica + Sentinel), one scheduler (or a
leader and a standby on two ports), N workers and one or more gateways, each a separate
process under a ``Supervised`` restart loop, on fixed ports so a restart comes back where its
peers expect it. Where the phase cuts links, each worker's traffic crosses two ``TcpProxy``s.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.grpc_server import free_port
from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc
from bench.faults.procs import Supervised, redis_argv, sentinel_argv, sentinel_master
from launcher.stack import wait_redis
from bench.faults.proxy import TcpProxy

SENTINEL_NAME = "accelgen"


@dataclass
class TopologyConfig:
    executor: str = "sim"
    workers: int = 2
    gateways: int = 1
    standby: bool = False  # a second scheduler waiting for the lease
    sentinel: bool = False  # Redis master + replica + Sentinel, the scheduler on a sentinel URL
    proxies: bool = False  # worker <-> scheduler traffic through TcpProxy
    scheduler_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    start_timeout_s: float = 120.0


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def health_status(address: str, service: str = "", timeout_s: float = 1.0) -> str:
    """The readiness (``""``) or named health status of ``address``, or ``DOWN`` if it does not answer."""
    try:
        with grpc.insecure_channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout_s)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "DOWN"


class Topology:
    def __init__(self, cfg: TopologyConfig, log_dir: Path) -> None:
        self.cfg, self.log_dir = cfg, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_ports = [free_port() for _ in range(2 if cfg.sentinel else 1)]
        self.sentinel_port = free_port() if cfg.sentinel else 0
        self.scheduler_ports = [free_port() for _ in range(2 if cfg.standby else 1)]
        self.worker_ports = [free_port() for _ in range(cfg.workers)]
        self.gateway_ports = [(free_port(), free_port()) for _ in range(cfg.gateways)]
        self.redis: list[Supervised] = []
        self.sentinel: Supervised | None = None
        self.schedulers: list[Supervised] = []
        self.workers: list[Supervised] = []
        self.gateways: list[Supervised] = []
        self.proxies: list[tuple[TcpProxy, TcpProxy]] = []  # per worker: (plan calls, worker's calls)

    # -- addresses ------------------------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        if self.cfg.sentinel:
            return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SENTINEL_NAME}"
        return f"redis://127.0.0.1:{self.redis_ports[0]}/0"

    @property
    def scheduler_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.scheduler_ports]

    @property
    def scheduler_target(self) -> str:
        return ",".join(self.scheduler_addresses)

    @property
    def gateway_endpoints(self) -> list[tuple[str, int]]:
        return [(f"127.0.0.1:{g}", h) for g, h in self.gateway_ports]

    # -- start / stop ---------------------------------------------------------------------------
    def start(self) -> None:
        c, logs = self.cfg, self.log_dir
        try:
            self._start_redis()
            sched_common = ["--redis-url", self.redis_url, "--log-level", c.log_level, *c.scheduler_args]
            if c.sentinel:  # as deploy/sentinel.conf says: every write on a replica before it counts
                sched_common += ["--redis-min-replicas", "1"]
            for i, port in enumerate(self.scheduler_ports):
                argv = _py("scheduler_service.main", "--port", str(port), "--instance-id", f"sched-{i}", *sched_common)
                self.schedulers.append(Supervised(f"scheduler-{i}", lambda a=argv: a, logs).start())
                if i == 0:
                    self._wait(lambda: self.leader() is not None, "the first scheduler to lead")
            for i, port in enumerate(self.worker_ports):
                sched, advertise = self.scheduler_target, []
                if c.proxies:
                    plan = TcpProxy(("127.0.0.2", port), ("127.0.0.1", port))
                    back = TcpProxy(("127.0.0.3", free_port()), ("127.0.0.1", self.scheduler_ports[0]))
                    self.proxies.append((plan, back))
                    sched, advertise = back.address, ["--advertise-host", "127.0.0.2"]
                argv = _py("worker_service.main", "--scheduler", sched, "--worker-id", f"worker-{i}", "--host",
                           "127.0.0.1", "--port", str(port), "--executor", c.executor, "--log-level", c.log_level,
                           *advertise, *c.worker_args)
                self.workers.append(Supervised(f"worker-{i}", lambda a=argv: a, logs, env=c.worker_env).start())
            self._wait(lambda: self.live_workers() >= c.workers, f"{c.workers} workers to register")
            for i, (gport, hport) in enumerate(self.gateway_ports):
                argv = _py("gateway.main", "--scheduler-address", self.scheduler_target, "--grpc-port", str(gport),
                           "--http-port", str(hport), "--host", "127.0.0.1", "--log-level", c.log_level,
                           *c.gateway_args)
                self.gateways.append(Supervised(f"gateway-{i}", lambda a=argv: a, logs).start())
            self._wait(self.ready, "the whole stack to be ready")
        except BaseException:
            self.stop()
            raise

    def _start_redis(self) -> None:
        logs = self.log_dir
        master = self.redis_ports[0]
        self.redis.append(Supervised("redis-0", lambda: redis_argv(master, logs / "redis-0"), logs, restart_s=1.0)
                          .start())
        if not wait_redis(master):
            raise RuntimeError("redis-server did not start")
        if self.cfg.sentinel:
            rep = self.redis_ports[1]
            # A restarted node rejoins as a replica of whoever the sentinel names master now.
            self.redis[0]._argv = lambda: redis_argv(master, logs / "redis-0", self._replica_of(master))
            self.redis.append(Supervised("redis-1", lambda: redis_argv(rep, logs / "redis-1", self._replica_of(rep)
                                                                         or master), logs, restart_s=1.0).start())
            self.sentinel = Supervised("sentinel", lambda: sentinel_argv(self.sentinel_port, master, logs / "sentinel"),
                                       logs).start()
            self._wait(lambda: sentinel_master(self.sentinel_port) == master, "the sentinel to see the master")
            self._wait(self._replica_synced, "the replica to sync")
            self._wait(self.sentinel_sees_replica, "the sentinel to see the replica")

    def _replica_of(self, port: int) -> int | None:
        if self.sentinel is None:
            return None
        current = sentinel_master(self.sentinel_port)
        return None if current in (None, port) else current

    def _replica_synced(self) -> bool:
        try:
            info = redis.Redis(port=self.redis_ports[1], socket_timeout=1).info("replication")
            return info.get("master_link_status") == "up"
        except redis.exceptions.RedisError:
            return False

    def sentinel_sees_replica(self) -> bool:
        """The sentinel knows a healthy replica it could promote."""
        try:
            replicas = redis.Redis(port=self.sentinel_port, socket_timeout=1).execute_command(
                "SENTINEL", "REPLICAS", SENTINEL_NAME)
        except redis.exceptions.RedisError:
            return False
        for r in replicas or []:
            fields = dict(zip(r[::2], r[1::2])) if isinstance(r, list) else r
            flags = str(fields.get("flags", fields.get(b"flags", "")))
            link = str(fields.get("master-link-status", fields.get(b"master-link-status", "")))
            if "down" not in flags and "disconnected" not in flags and "ok" in link:
                return True
        return False

    def stop(self) -> None:
        for group in (self.gateways, self.workers, self.schedulers, [self.sentinel] if self.sentinel else [],
                      self.redis):
            for s in reversed(group):
                s.stop()
        for pair in self.proxies:
            for p in pair:
                p.close()

    def all_procs(self) -> list[Supervised]:
        return [*self.redis, *([self.sentinel] if self.sentinel else []), *self.schedulers, *self.workers,
                *self.gateways]

    # -- state ----------------------------------------------------------------------------------
    def leader(self) -> int | None:
        """Index of the scheduler that is ready (holds the lease and serves), if one is."""
        for i, addr in enumerate(self.scheduler_addresses):
            if health_status(addr) == "SERVING":
                return i
        return None

    def server_info(self) -> scheduler_pb2.ServerInfo | None:
        i = self.leader()
        if i is None:
            return None
        try:
            with grpc.insecure_channel(self.scheduler_addresses[i]) as ch:
                return scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(),
                                                                           timeout=2)
        except grpc.RpcError:
            return None

    def live_workers(self) -> int:
        info = self.server_info()
        return info.live_workers if info is not None else 0

    def master_port(self) -> int | None:
        if self.cfg.sentinel:
            return sentinel_master(self.sentinel_port)
        return self.redis_ports[0]

    def ready(self) -> bool:
        """Every part is back: Redis answers, a scheduler leads, every worker is registered, every
        gateway is ready, and no link is cut."""
        master = self.master_port()
        if master is None or not wait_redis(master, timeout_s=0.5):
            return False
        if self.live_workers() < self.cfg.workers:
            return False
        if any(p.is_cut() for pair in self.proxies for p in pair):
            return False
        return all(health_status(g) == "SERVING" for g, _ in self.gateway_endpoints)

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while not predicate():
            dead = [s for s in self.all_procs() if s.exit_codes and s.exit_codes[-1] == 0 and not s.alive()]
            if dead or time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; logs in {self.log_dir}")
            time.sleep(0.1)
