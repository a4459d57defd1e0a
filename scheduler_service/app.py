"""The scheduler service, assembled: its parts, its life cycle and its recovery.

Data crosses the scheduler in one direction::

    intake (Submit) -> worker registry (routing) -> lane (core step, plan, worker call)
        -> committer (per-lane order, durable in Redis) -> delivery (channels, WatchMany) -> gateways

Nothing downstream calls back upstream. A lane that fails ends with its reason, and the registry,
which watches its lanes, drops the worker and re-routes its requests.

**Recovery.** A (re)started scheduler takes the leader lease, starts a new *epoch* (workers
drop their caches when they see it), and adopts every live request from Redis: nothing
accepted is lost, and since every lane's block accounting starts empty, no KV block is leaked.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import structlog

from accelgen.profiles import load_profile
from accelgen.v1 import scheduler_pb2
from accelgen.wire.slo import slo_to_proto
from scheduler_service.committer import Committer
from scheduler_service.config import SchedulerConfig
from scheduler_service.delivery import Delivery
from scheduler_service.intake import RequestIntake
from scheduler_service.lane import WorkerLane
from scheduler_service.state.store import RedisStore
from scheduler_service.tasks import Background
from scheduler_service.workers import WorkerRegistry

log = structlog.get_logger("scheduler")


class SchedulerApp:
    def __init__(self, config: SchedulerConfig, store: RedisStore) -> None:
        self.config = config
        self.store = store
        self.catalog = config.catalog()
        self.profile = load_profile(config.profile)
        self.epoch = uuid.uuid4().hex[:12]
        self.background = Background()
        self.delivery = Delivery(store)
        self.committer = Committer(store, self.delivery.publish)
        self.workers = WorkerRegistry(config, store, self.committer, self.background, self.profile, self.catalog,
                                      self.epoch)
        self.intake = RequestIntake(config, store, self.catalog, self.workers, self.committer, self.delivery,
                                    self.background)
        self._monitor: asyncio.Task | None = None
        self._stopping = False

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self, lease_wait_s: float = 60.0) -> None:
        deadline = time.monotonic() + lease_wait_s
        ttl_ms = int(self.config.lease_ttl_s * 1000)
        while not await self.store.acquire_lease(self.config.instance_id, ttl_ms):
            if time.monotonic() > deadline:
                raise RuntimeError("another scheduler holds the leader lease")
            await asyncio.sleep(min(0.5, self.config.lease_ttl_s / 4))
        for wid, (address, info) in (await self.store.live_workers()).items():
            self.workers.add_lane(wid, address, info)
        recovered = await self.store.load_live()
        for rec in recovered:
            r = rec.request
            self.delivery.open(r.request_id, r.num_prompt_tokens, r.output_token_ids, rec.emitted_at)
            self.workers.route(r, adopt=True)
        log.info("scheduler_started", epoch=self.epoch, workers=len(self.workers.lanes), recovered=len(recovered))
        self._monitor = asyncio.create_task(self._monitor_loop(), name="monitor")

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        await self.workers.stop(commit_timeout_s=5.0)
        await self.store.release_lease(self.config.instance_id)

    async def _monitor_loop(self) -> None:
        ttl_ms = int(self.config.lease_ttl_s * 1000)
        while not self._stopping:
            await asyncio.sleep(min(self.config.heartbeat_interval_s, self.config.lease_ttl_s / 3))
            try:
                if not await self.store.acquire_lease(self.config.instance_id, ttl_ms):
                    log.error("lease_lost", instance=self.config.instance_id)
            except Exception as exc:  # Redis down: keep serving from memory, retry next tick
                log.warning("lease_renew_failed", error=str(exc))
            self.workers.drop_silent(time.monotonic())

    # -- views --------------------------------------------------------------------------------
    def server_info(self) -> scheduler_pb2.ServerInfo:
        lanes = list(self.workers.lanes.values())
        return scheduler_pb2.ServerInfo(
            model=self.profile.name if not lanes else lanes[0].model,
            max_model_len=self.workers.max_model_len(),
            block_size=lanes[0].core.kv.block_size if lanes else self.profile.block_size,
            live_workers=len(lanes), queued_requests=self.workers.num_unfinished(), policy=self.config.policy,
            app_classes=list(self.catalog.names),
            classes=[scheduler_pb2.AppClass(name=c.name, slo=slo_to_proto(c.slo)) for c in self.catalog.classes],
            vocab_size=self.workers.vocab_size() or 0,
            iterations=sum(ln.stats.iterations for ln in lanes),
            overhead_ms=1000 * sum(ln.stats.overhead_s for ln in lanes) / max(1, len(lanes)),
            **self._decision_percentiles(lanes))

    @staticmethod
    def _decision_percentiles(lanes: list[WorkerLane]) -> dict[str, float]:
        recent = [d for ln in lanes for d in list(ln.stats.decision_s)[-2000:]]
        if not recent:
            return {"sched_ms_p50": 0.0, "sched_ms_p99": 0.0}
        recent.sort()
        pick = lambda q: recent[min(len(recent) - 1, int(q * len(recent)))] * 1000.0  # noqa: E731
        return {"sched_ms_p50": pick(0.5), "sched_ms_p99": pick(0.99)}
