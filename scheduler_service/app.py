"""The scheduler service, assembled: its parts, its life cycle and its recovery.

Data crosses the scheduler in one direction::

    intake (Submit) -> worker registry (routing) -> lane (core step, plan, worker call)
        -> committer (per-lane order, durable in Redis) -> delivery (channels, WatchMany) -> gateways

Nothing downstream calls back upstream. A lane that fails ends with its reason, and the registry,
which watches its lanes, drops the worker and re-routes its requests.

**Recovery.** A (re)started scheduler takes the leader lease, starts a new *epoch* (workers
drop their caches when they see it), and adopts every live request from Redis: nothing
accepted is lost, and since every lane's block accounting starts empty, no KV block is leaked.

**Leadership.** One scheduler leads; others wait as standbys for the lease (``lease_wait_s``, 0 =
for ever), polling a few times per ``lease_ttl_s``. The leader renews it (atomically) every
``lease_ttl_s / 3`` at most; its writes are fenced in Redis (``store``). It is *deposed* when a
renewal says another scheduler holds the lease, when a fenced write is refused, or when it could
not renew for ``lease_ttl_s`` (Redis unreachable: another scheduler may have taken over). Deposed,
it stops planning on every lane at once, reports NOT_SERVING and sets ``lease_lost``; the process
then exits with status 3 and its supervisor restarts it as a standby. Readiness is SERVING only
while the lease is held and Redis answered the last renewal.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import structlog

from accelgen.common.grpc_server import set_serving
from accelgen.profiles import load_profile
from accelgen.v1 import scheduler_pb2
from accelgen.wire.slo import slo_to_proto
from scheduler_service.committer import Committer
from scheduler_service.config import SchedulerConfig
from scheduler_service.delivery import Delivery, WatchLimits
from scheduler_service.intake import RequestIntake
from scheduler_service.lane import WorkerLane
from scheduler_service.metrics import LaneView, SchedulerMetrics, StateSource
from scheduler_service.state.redis_conn import is_transient
from scheduler_service.state.store import LeaseLost, RedisStore
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
        self.delivery = Delivery(store, WatchLimits(config.watch_max_ids_per_message, config.watch_max_ids_per_stream,
                                                    config.watch_store_lookups))
        self.committer = Committer(store, self.delivery.publish, on_request_failed=self._stop_failed_request,
                                   history=self.delivery.history)
        self.workers = WorkerRegistry(config, store, self.committer, self.background, self.profile, self.catalog,
                                      self.epoch)
        self.intake = RequestIntake(config, store, self.catalog, self.workers, self.committer, self.delivery,
                                    self.background)
        self.metrics = SchedulerMetrics(self.catalog, config.slo_tbt_tolerance)  # scheduler_service/metrics.py
        self.workers.metrics = self.intake.metrics = self.metrics
        self.metrics.bind(StateSource(lanes=self._lane_views, orphans=lambda: list(self.workers.orphans),
                                      classes=lambda: self.catalog.names, hops=self._hop_samples))
        self._monitor: asyncio.Task | None = None
        self._stopping = False
        self.lease_lost = asyncio.Event()  # set once deposed: the process is to exit (status 3)
        self.lost_reason = ""
        self._lease_valid_until = 0.0  # time.monotonic() until which our lease cannot have expired
        self._health: tuple[object, list[str]] | None = None  # readiness is reported there
        self._ready: bool | None = None
        store.on_lease_lost = self._lose_lease  # whichever write notices first

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self, lease_wait_s: float | None = None) -> None:
        """Wait for the leader lease (``lease_wait_s``, default the config's; 0 = for ever; past
        it RuntimeError), then recover from Redis. Raises ``LeaseLost`` if deposed meanwhile."""
        await self._acquire_lease(self.config.lease_wait_s if lease_wait_s is None else lease_wait_s)
        # Renewing from now on: a recovery longer than the lease must not hand it to a standby.
        self._monitor = asyncio.create_task(self._monitor_loop(), name="monitor")
        live_workers, recovered = await self._read_state()
        for wid, worker in live_workers.items():  # each keeps the certificate it is bound to, and its drain
            self.workers.add_lane(wid, worker.address, worker.info, worker.identity, worker.draining_until)
        for rec in recovered:
            r = rec.request
            self.delivery.open(r.request_id, r.num_prompt_tokens, r.output_token_ids, rec.emitted_at, rec.logprobs)
            self.metrics.accepted(r, rec.emitted_at)
            self.workers.route(r, adopt=True)
        if self.lease_lost.is_set():
            raise LeaseLost(self.lost_reason)
        log.info("scheduler_started", epoch=self.epoch, fence=self.store.fence, workers=len(self.workers.lanes),
                 recovered=len(recovered))
        self.delivery.start_owner_sweep(self.intake.cancel, self.config.owner_gone_cancel_s)  # owners.py

    async def _acquire_lease(self, wait_s: float) -> None:
        """Poll for the lease; Redis down or restarting is waited out (logged), not fatal."""
        ttl_s = self.config.lease_ttl_s
        deadline = time.monotonic() + wait_s if wait_s > 0 else None
        poll_s = min(0.5, ttl_s / 4)
        standby_logged = False
        while True:
            sent = time.monotonic()
            try:
                fence = await self.store.acquire_lease(self.config.instance_id, int(ttl_s * 1000))
            except Exception as exc:
                if not is_transient(exc):
                    raise RuntimeError(f"cannot take the leader lease: {exc}") from exc
                log.warning("lease_acquire_failed", error=str(exc) or type(exc).__name__)
                fence = None
            if fence:  # None: another scheduler holds it
                self._lease_valid_until = sent + ttl_s
                log.info("lease_acquired", instance=self.config.instance_id, fence=fence)
                return
            if not standby_logged:
                log.info("standby", instance=self.config.instance_id, lease_wait_s=wait_s)
                standby_logged = True
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"another scheduler held the leader lease for lease_wait_s = {wait_s:g} s")
            await asyncio.sleep(poll_s)

    async def _read_state(self) -> tuple[dict, list]:
        """The registered workers and the live requests, retried while Redis is briefly away."""
        while True:
            if self.lease_lost.is_set():
                raise LeaseLost(self.lost_reason)
            try:
                return await self.store.live_worker_records(), await self.store.load_live()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("recovery_retry", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        await self.delivery.stop()  # the owner sweep (owners.py)
        deposed = self.lease_lost.is_set()
        # Deposed, nothing pending can land (the writes are fenced): do not wait for it.
        await self.workers.stop(commit_timeout_s=0.0 if deposed else 5.0)
        if not deposed:
            try:  # a standby can take over at its next poll instead of after the TTL
                await asyncio.wait_for(self.store.release_lease(), timeout=2.0)
            except Exception as exc:
                log.warning("lease_release_failed", error=str(exc) or type(exc).__name__)

    # -- leadership ---------------------------------------------------------------------------
    async def attach_health(self, health: object, names: list[str]) -> None:
        """Report readiness on ``health`` from now on (SERVING: the lease held, Redis answering)."""
        self._health = (health, list(names))
        await self._set_ready(not self.lease_lost.is_set())

    async def _set_ready(self, ready: bool) -> None:
        if self._health is None or ready == self._ready:
            return
        self._ready = ready
        health, names = self._health
        await set_serving(health, names, ready)  # type: ignore[arg-type]

    def _lose_lease(self, reason: str) -> None:
        """Deposed: stop planning on every lane at once (no plan goes out from here on), report
        NOT_SERVING, and set ``lease_lost`` (main exits with status 3). Idempotent."""
        if self.lease_lost.is_set():
            return
        self.lost_reason = reason
        log.error("lease_lost", instance=self.config.instance_id, fence=self.store.fence, reason=reason)
        for lane in list(self.workers.lanes.values()):
            lane.halt()
        self.lease_lost.set()
        if self._health is not None:
            self.background.spawn(self._set_ready(False))

    async def _monitor_loop(self) -> None:
        period_s = min(self.config.heartbeat_interval_s, self.config.lease_ttl_s / 3)
        while not self._stopping and not self.lease_lost.is_set():
            # While renewals fail, wake no later than the lease's end: then it is lost.
            await asyncio.sleep(max(0.0, min(period_s, self._lease_valid_until - time.monotonic())))
            if time.monotonic() >= self._lease_valid_until:
                # Woken past the lease (a stall, SIGSTOP): not ready until Redis says it is still
                # ours, or a deposed leader answers SERVING while another leads (campaign: once).
                await self._set_ready(False)
            await self._renew(period_s)
            if not self.lease_lost.is_set():
                self.workers.drop_silent(time.monotonic())

    async def _renew(self, period_s: float) -> None:
        """One renewal, given ``period_s`` at most (a Redis that does not answer that fast counts as
        unreachable: NOT_SERVING) and no longer than the lease may still last — except after a
        stall past the lease, when Redis may still say it is ours, nobody having taken it."""
        ttl_s = self.config.lease_ttl_s
        sent = time.monotonic()
        left = self._lease_valid_until - sent
        try:
            held = await asyncio.wait_for(self.store.renew_lease(int(ttl_s * 1000)),
                                          timeout=min(period_s, left) if left > 0 else period_s)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            if time.monotonic() >= self._lease_valid_until:
                self._lose_lease(f"the lease could not be renewed for lease_ttl_s = {ttl_s:g} s ({error}); "
                                 "another scheduler may hold it now")
            else:  # serving from memory while the lease lasts; not ready for new traffic
                log.warning("lease_renew_failed", error=error,
                            valid_for_s=round(self._lease_valid_until - time.monotonic(), 3))
                await self._set_ready(False)
            return
        if not held:
            self._lose_lease("another scheduler holds the leader lease (this one stalled or was cut off past it)")
            return
        self._lease_valid_until = sent + ttl_s
        await self._set_ready(True)

    def _stop_failed_request(self, request_id: str, why: str) -> None:
        """A request whose record Redis refuses for good (its client got "abort"): stop computing it."""
        self.metrics.forget(request_id)
        lane = self.workers.lane_of(request_id)
        if lane is not None and lane.core.cancel(request_id, time.time()):
            lane.core.forget(request_id)
            lane.wakeup.set()

    # -- views --------------------------------------------------------------------------------
    def _hop_samples(self) -> dict[str, list[float]]:
        lanes = list(self.workers.lanes.values())
        return {"worker_to_scheduler": _recent(lanes, "result_hop_s"),
                "applied_to_durable": list(self.committer.durable_lag_s),
                "applied_to_gateway": list(self.delivery.sent_lag_s)}

    def _lane_views(self) -> list[LaneView]:
        """What a metrics scrape reads of each lane (on the event loop: see accelgen/common/metrics_http)."""
        return [LaneView(wid, list(ln.core.requests.values()), ln.core.kv.total_usable_blocks,
                         ln.core.kv.num_free_blocks, ln.task is not None and not ln.task.done(), ln.stats.overhead_s,
                         draining=self.workers.drain_state(wid).draining)
                for wid, ln in self.workers.lanes.items()]

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
            worker_to_scheduler=_hop(_recent(lanes, "result_hop_s")),
            applied_to_durable=_hop(list(self.committer.durable_lag_s)),
            applied_to_gateway=_hop(list(self.delivery.sent_lag_s)),
            **self._decision_percentiles(lanes))

    @staticmethod
    def _decision_percentiles(lanes: list[WorkerLane]) -> dict[str, float]:
        p50, p99 = _p50_p99_ms(_recent(lanes, "decision_s"))
        return {"sched_ms_p50": p50, "sched_ms_p99": p99}


def _recent(lanes: list[WorkerLane], stat: str, per_lane: int = 2000) -> list[float]:
    """The last ``per_lane`` samples of one of the lanes' ``LaneStats`` windows, all lanes together."""
    return [x for ln in lanes for x in list(getattr(ln.stats, stat))[-per_lane:]]


def _p50_p99_ms(samples_s: list[float]) -> tuple[float, float]:
    """Nearest-rank p50 and p99 of samples in seconds, in ms; (0, 0) without samples."""
    if not samples_s:
        return 0.0, 0.0
    samples_s = sorted(samples_s)
    pick = lambda q: samples_s[min(len(samples_s) - 1, int(q * len(samples_s)))] * 1000.0  # noqa: E731
    return pick(0.5), pick(0.99)


def _hop(samples_s: list[float]) -> scheduler_pb2.HopLatency:
    if not samples_s:
        return scheduler_pb2.HopLatency()
    p50, p99 = _p50_p99_ms(samples_s)
    return scheduler_pb2.HopLatency(p50_ms=p50, p99_ms=p99, samples=len(samples_s))
