"""One worker's lane: its scheduling core, its gRPC stub, and the iteration loop that joins them.

Each worker has its own KV pool, so each lane has its own ``SchedulerCore`` (policy, block
accounting) sized from the ``WorkerInfo`` the worker registered with. The loop: plan -> send it
on the worker's stream (``worker_link``; the next plan is decided while this one runs) -> apply
the result -> hand the iteration's changes to the lane's commit chain (which writes them to
Redis, then delivers the tokens). The lane calls nothing upstream: when the
worker fails or sends a result the core cannot apply, the loop ends with ``failure`` set, and the
worker registry, which watches its lanes, drops the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import structlog

from accelgen.common.grpc_server import CHANNEL_OPTIONS
from accelgen.common.tls import open_channel
from accelgen.core.kv_blocks import KVBlockManager
from accelgen.core.plan import BatchPlan
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import RequestStatus
from accelgen.core.scheduler import CoreConfig, SchedulerCore, StepOutcome
from accelgen.core.slo import SLOCatalog
from accelgen.core.worker_info import WorkerInfo
from accelgen.v1 import worker_pb2_grpc
from scheduler_service import convert
from scheduler_service.committer import CommitChain
from scheduler_service.config import SchedulerConfig
from scheduler_service.metrics import LaneMetrics, SchedulerMetrics
from scheduler_service.state.store import IterationChanges
from scheduler_service.worker_link import LinkTimeout, WorkerLink

log = structlog.get_logger("scheduler.lane")


def lane_profile(default: DeviceProfile, info: WorkerInfo) -> DeviceProfile:
    """The worker's measured profile if it sent one, else ``default`` — with the context length
    the worker actually serves (a prompt the worker cannot hold is refused at Submit, not
    discovered by the worker)."""
    profile = default
    if info.profile_json:
        try:
            profile = DeviceProfile.from_dict(json.loads(info.profile_json))
        except ValueError as exc:
            log.warning("bad_worker_profile", error=str(exc))
    if info.max_model_len and info.max_model_len != profile.max_model_len:
        profile = dataclasses.replace(profile, max_model_len=info.max_model_len)
    return profile


@dataclass
class LaneStats:
    iterations: int = 0
    last_iteration_s: float = 0.0
    overhead_s: float = 0.0
    time_correction: float = 1.0
    decision_s: deque = field(default_factory=lambda: deque(maxlen=5000))
    result_hop_s: deque = field(default_factory=lambda: deque(maxlen=5000))  # worker's result ready -> applied


class WorkerLane:
    def __init__(self, worker_id: str, address: str, info: WorkerInfo, profile: DeviceProfile,
                 config: SchedulerConfig, catalog: SLOCatalog, commits: CommitChain, epoch: str = "") -> None:
        self.worker_id = worker_id
        self.address = address
        self.info = info  # what the worker registered with
        self.profile = profile
        self.commits = commits  # where each applied iteration goes: Redis, then delivery
        self.epoch = epoch  # sent with every plan; new for every lane, so the worker resets on it
        max_seqs = min(config.max_num_seqs, info.max_num_seqs) if info.max_num_seqs else config.max_num_seqs
        self.core = SchedulerCore(config.make_policy(profile, catalog), profile,
                                  kv=KVBlockManager(info.num_blocks, info.block_size),
                                  config=CoreConfig(max_num_seqs=max_seqs,
                                                    max_num_batched_tokens=info.max_num_batched_tokens or None))
        self.channel = open_channel(address, CHANNEL_OPTIONS, config.transport, peer_role="worker")
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.link = WorkerLink(self.stub, worker_id, config.worker_rpc_timeout_s)
        self.depth = 2 if config.pipeline else 1  # plans in flight at once
        self._last_done = 0.0  # when the last result was applied (perf_counter)
        self.wakeup = asyncio.Event()
        self.stats = LaneStats()
        self.metrics: LaneMetrics = SchedulerMetrics().lane(worker_id)  # the registry's replaces it
        self.task: asyncio.Task | None = None
        self.failure: str | None = None  # why the loop ended on its own (the worker is to be dropped)
        self._stopping = False

    @property
    def model(self) -> str:
        return self.info.model or self.profile.name

    @property
    def vocab_size(self) -> int:
        """What the worker reported; 0 = unknown."""
        return self.info.vocab_size

    def same_worker(self, address: str, info: WorkerInfo) -> bool:
        """A registration with the same address and description is the worker this lane knows (a
        restarted worker process with the same id is caught by its first plan: it knows none of
        the lane's requests, the iteration fails INVALID_ARGUMENT, the lane ends and the worker
        re-registers into a fresh one)."""
        return self.address == address and self.info == info

    # -- load ---------------------------------------------------------------------------------
    def load(self) -> int:
        """Tokens still to run on this lane: where the router sends the next request."""
        return sum(r.num_uncomputed_tokens for r in self.core.requests.values() if not r.status.is_done)

    @property
    def fence(self) -> int:
        """The leader lease's fencing token (0: unfenced), sent with every plan so that a worker
        refuses plans from a deposed scheduler. The store writing this lane's iterations holds it."""
        return self.commits.store.fence

    def start(self) -> asyncio.Task:
        self.task = asyncio.create_task(self._run(), name=f"lane-{self.worker_id}")
        return self.task

    def _deposed(self, exc: grpc.aio.AioRpcError) -> bool:
        """The worker refused the plan because it has seen a newer leader's fence: this scheduler
        is deposed (the worker knows before Redis told us). The same stop as a refused write."""
        store = self.commits.store
        if (exc.code() != grpc.StatusCode.FAILED_PRECONDITION or "deposed scheduler" not in (exc.details() or "")
                or store.on_lease_lost is None):
            return False
        store.on_lease_lost(f"worker {self.worker_id} refused a plan: {exc.details()}")
        return True

    def halt(self) -> None:
        """Stop planning now, without waiting: the lease is lost, so no plan may go out and no
        pending write can land (``stop`` still closes the channel)."""
        self._stopping = True
        self.wakeup.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def stop(self, commit_timeout_s: float | None = None) -> None:
        """Stop planning, then wait (up to ``commit_timeout_s``; None: as long as Redis takes) for
        the iterations already applied to the core to be written and delivered. Their tokens
        are in the requests; a caller that moved the requests before that would skip them."""
        self._stopping = True
        self.wakeup.set()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await self.commits.drain(commit_timeout_s)
        await self.channel.close()

    # -- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        """Plan, send, apply. With ``pipeline`` the next plan is decided and sent while the
        worker runs the current one (``SchedulerCore.dispatch``: at most ``depth`` plans in
        flight), so the decision, the gRPC hops and the result's processing are off the
        worker's critical path. The Redis write and token delivery of iteration k overlap the
        execution of the next (at most one behind, in order), so the round trip to Redis is off
        it too, while tokens still reach clients only once durable."""
        try:
            await self._loop()
        finally:
            self.link.close()

    async def _loop(self) -> None:
        core, link = self.core, self.link
        in_flight: deque[tuple[BatchPlan, float]] = deque()  # (plan, when its decision started)
        while not self._stopping:
            depth = self.depth if link.streaming else 1
            if len(in_flight) < depth and (core.has_work() or core.has_ids_to_free):
                t0 = time.perf_counter()
                plan = core.step(time.time())
                decision = time.perf_counter() - t0
                if not plan.is_empty or plan.freed_request_ids:
                    msg = convert.plan_to_proto(plan, core.requests, self.epoch, self.fence)
                    if depth > 1:
                        core.dispatch(plan)
                    self.stats.decision_s.append(decision)
                    self.metrics.decided(decision)
                    in_flight.append((plan, t0))
                    await link.send(msg)
                    continue  # fill the pipeline before waiting for a result
                if not in_flight:
                    # Work exists but none fits now (e.g. KV full of finished-but-unfreed
                    # requests): wait for a new arrival, a cancel, or a short while.
                    await self._nap(0.01)
                    continue
            if not in_flight:
                await self._nap(None)
                continue
            try:
                reply = await link.receive()
                plan, t0 = in_flight.popleft()
                applied_at = time.time()
                outcome = core.complete(plan, convert.result_from_proto(reply), applied_at)
            except grpc.aio.AioRpcError as exc:
                if self._deposed(exc):
                    return
                log.warning("worker_failed", worker=self.worker_id, code=exc.code().name, details=exc.details(),
                            plans_in_flight=len(in_flight))
                self.failure = f"ExecuteStream: {exc.code().name}"
                return
            except LinkTimeout as exc:
                log.warning("worker_failed", worker=self.worker_id, code="DEADLINE_EXCEEDED", details=str(exc))
                self.failure = "ExecuteStream: DEADLINE_EXCEEDED"
                return
            except Exception as exc:  # a reply the core cannot apply: this worker is not trustworthy
                log.exception("iteration_failed", worker=self.worker_id)
                self.failure = f"bad iteration result: {exc}"
                return
            changes = self.changes_for(plan, outcome)
            changes.applied_at = applied_at
            self.metrics.applied(plan, outcome, core.requests, applied_at)  # before the finished are forgotten
            if reply.finished_at:
                self.stats.result_hop_s.append(applied_at - reply.finished_at)
            for r in outcome.finished:  # its record and tokens travel in ``changes`` from here on
                core.forget(r.request_id)
            self.stats.iterations += 1
            self.stats.last_iteration_s = reply.elapsed_s
            # The write task exists before the next await, so stopping the loop cannot lose an
            # iteration the core has applied; the loop stays at most one iteration ahead of Redis.
            previous = self.commits.last
            self.commits.iteration(changes)
            if previous is not None:
                await asyncio.shield(previous)
            done = time.perf_counter()
            # Time outside the model per iteration: from when the worker could start this plan
            # (its decision began, or the previous result was in) to its result being applied.
            overhead = done - max(t0, self._last_done) - reply.elapsed_s
            self._learn_overhead(overhead)
            self.metrics.timed(reply.elapsed_s, overhead)
            self._last_done = done
            self._learn_time_correction(plan.predicted_time_s, reply.elapsed_s)

    async def _nap(self, timeout_s: float | None) -> None:
        """Until something wakes the lane (an arrival, a cancel, stop), at most ``timeout_s``."""
        self.wakeup.clear()
        try:
            await asyncio.wait_for(self.wakeup.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            pass

    def _learn_overhead(self, overhead_s: float) -> None:
        """EWMA of the time an iteration spends outside the model; the policy budgets around it."""
        ewma = self.stats.overhead_s
        self.stats.overhead_s = overhead_s if ewma == 0 else 0.9 * ewma + 0.1 * max(0.0, overhead_s)
        self.core.policy.overhead_s = self.stats.overhead_s

    def _learn_time_correction(self, predicted_s: float, measured_s: float) -> None:
        """EWMA of measured / predicted model time, clamped to [0.25, 4]: the profile, refined
        from what the worker reports. Tiny iterations are skipped (timer noise dominates)."""
        if predicted_s < 0.001 or measured_s <= 0:
            return
        ratio = min(4.0, max(0.25, measured_s / predicted_s))
        policy = self.core.policy
        policy.time_correction = 0.95 * policy.time_correction + 0.05 * ratio
        self.stats.time_correction = policy.time_correction

    def changes_for(self, plan: BatchPlan, outcome: StepOutcome) -> IterationChanges:
        """What this iteration changed, for one Redis round trip."""
        core = self.core
        ch = IterationChanges(worker_id=self.worker_id)
        for ev in outcome.tokens:
            toks, times = ch.tokens.setdefault(ev.request_id, ([], []))
            toks.append(ev.token_id)
            times.append(ev.time_s)
            if ev.logprob is not None:  # the request asked for logprobs: they travel with the token
                ch.logprobs.setdefault(ev.request_id, []).append(ev.logprob)
        for rid, (toks, _times) in ch.tokens.items():  # what Redis holds before these (idempotent appends)
            r = core.requests.get(rid)
            if r is not None:
                ch.offsets[rid] = r.num_known_outputs - len(toks)
        for rid in plan.preempted_request_ids:
            r = core.requests.get(rid)
            if r is not None:
                ch.status[rid] = (RequestStatus.PREEMPTED, "")
                ch.preemptions[rid] = r.num_preemptions
        for r in outcome.finished:
            ch.status[r.request_id] = (RequestStatus.FINISHED, r.finish_reason.value if r.finish_reason else "")
            ch.finished.append(r.request_id)
        for c in plan.chunks:
            r = core.requests.get(c.request_id)
            if c.is_new and r is not None and c.request_id not in ch.status:
                ch.status[c.request_id] = (RequestStatus.RUNNING, "")
        return ch
