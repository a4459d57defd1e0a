"""One worker's lane: its scheduling core, its gRPC stub, and the iteration loop that joins them.

Each worker has its own KV pool, so each lane has its own ``SchedulerCore`` (policy, block
accounting) sized from what the worker reported. The loop: plan -> ExecuteIteration -> apply
the result -> write the iteration's changes to Redis in one round trip -> publish the tokens.
Tokens reach clients only after they are durable, so a crash never shows a client a token that
a restarted scheduler would not know.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Coroutine

import grpc
import structlog

from accelgen.common.grpc_server import CHANNEL_OPTIONS
from accelgen.v1 import worker_pb2_grpc
from scheduler_service import convert
from accelgen.core.kv_blocks import KVBlockManager
from accelgen.core.profile import DeviceProfile
from accelgen.core.scheduler import CoreConfig, SchedulerCore
from accelgen.core.slo import SLOCatalog
from scheduler_service.state.store import IterationChanges

if TYPE_CHECKING:
    from scheduler_service.app import SchedulerApp

log = structlog.get_logger("scheduler.lane")


@dataclass
class LaneStats:
    iterations: int = 0
    last_iteration_s: float = 0.0
    overhead_s: float = 0.0
    time_correction: float = 1.0
    decision_s: deque = field(default_factory=lambda: deque(maxlen=5000))


class WorkerLane:
    def __init__(self, app: "SchedulerApp", worker_id: str, address: str, profile: DeviceProfile,
                 num_blocks: int, block_size: int, policy: str, catalog: SLOCatalog, max_num_seqs: int,
                 max_batched_tokens: int = 0, description: dict | None = None, epoch: str = "",
                 admission: bool = True) -> None:
        self.app = app
        self.worker_id = worker_id
        self.address = address
        self.profile = profile
        self.description = dict(description or {})  # the registration this lane was made from
        self.epoch = epoch  # sent with every plan; new for every lane, so the worker resets on it
        policy_obj = app.config.make_policy(profile, catalog)
        self.core = SchedulerCore(policy_obj, profile, kv=KVBlockManager(num_blocks, block_size),
                                  config=CoreConfig(max_num_seqs=max_num_seqs,
                                                    max_num_batched_tokens=max_batched_tokens or None))
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.wakeup = asyncio.Event()
        self.last_heartbeat = time.monotonic()
        self.stats = LaneStats()
        self._task: asyncio.Task | None = None
        self._committing: asyncio.Task | None = None  # the newest iteration's write; each waits for the one before
        self.registry_refresh: asyncio.Task | None = None  # the heartbeat's TTL write to Redis, if in flight
        self._stopping = False

    @property
    def model(self) -> str:
        return str(self.description.get("model") or self.profile.name)

    @property
    def vocab_size(self) -> int:
        """What the worker reported; 0 = unknown."""
        return int(self.description.get("vocab_size") or 0)

    # -- load ---------------------------------------------------------------------------------
    def load(self) -> int:
        """Tokens still to run on this lane: where the router sends the next request."""
        return sum(r.num_uncomputed_tokens for r in self.core.requests.values() if not r.status.is_done)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"lane-{self.worker_id}")

    async def stop(self, commit_timeout_s: float | None = None) -> None:
        """Stop planning, then wait (up to ``commit_timeout_s``; None: as long as Redis takes) for
        the iterations already applied to the core to be written and published. Their tokens
        are in the requests; a caller that moved the requests before that would skip them."""
        self._stopping = True
        self.wakeup.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._committing is not None:
            await asyncio.wait({self._committing}, timeout=commit_timeout_s)
        await self.channel.close()

    # -- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        """Plan, execute, apply; the Redis write and token delivery of iteration k overlap the
        execution of iteration k+1 (at most one behind, in order), so the round trip to Redis is
        off the critical path while tokens still reach clients only once durable."""
        core = self.core
        while not self._stopping:
            if not core.has_work() and not core._to_free:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            t0 = time.perf_counter()
            plan = core.step(time.time())
            decision = time.perf_counter() - t0
            if plan.is_empty and not plan.freed_request_ids:
                # Work exists but none fits now (e.g. KV full of finished-but-unfreed requests):
                # wait for a new arrival, a cancel, or a short while.
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=0.01)
                except asyncio.TimeoutError:
                    pass
                continue
            msg = convert.plan_to_proto(plan, core.requests, self.epoch)
            try:
                reply = await self.stub.ExecuteIteration(msg, timeout=self.app.config.worker_rpc_timeout_s)
                outcome = core.complete(plan, convert.result_from_proto(reply), time.time())
            except grpc.aio.AioRpcError as exc:
                log.warning("worker_failed", worker=self.worker_id, code=exc.code().name, details=exc.details())
                self.app.start_drop(self.worker_id, reason=f"ExecuteIteration: {exc.code().name}")
                return
            except Exception as exc:  # a reply the core cannot apply: this worker is not trustworthy
                log.exception("iteration_failed", worker=self.worker_id)
                self.app.start_drop(self.worker_id, reason=f"bad iteration result: {exc}")
                return
            changes = self.changes_for(plan, outcome)
            self.stats.iterations += 1
            self.stats.last_iteration_s = reply.elapsed_s
            self.stats.decision_s.append(decision)
            # The write task exists before the next await, so stopping the loop cannot lose an
            # iteration the core has applied; the loop stays at most one iteration ahead of Redis.
            previous = self._committing
            self.chain_write(self.app.commit(self, changes, outcome))
            if previous is not None:
                await asyncio.shield(previous)
            self._learn_overhead(time.perf_counter() - t0 - reply.elapsed_s)
            self._learn_time_correction(plan.predicted_time_s, reply.elapsed_s)

    def chain_write(self, write: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run ``write`` after every write queued on this lane before it: Redis and watchers see
        iteration k before k+1, and a cancel's record after the iterations that preceded it."""
        self._committing = asyncio.create_task(_after(self._committing, write))
        return self._committing

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

    def changes_for(self, plan, outcome) -> IterationChanges:
        """What this iteration changed, for one Redis round trip."""
        core = self.core
        ch = IterationChanges(worker_id=self.worker_id, free_blocks=core.kv.num_free_blocks)
        for ev in outcome.tokens:
            toks, times = ch.tokens.setdefault(ev.request_id, ([], []))
            toks.append(ev.token_id)
            times.append(ev.time_s)
        for c in plan.chunks:
            if c.new_block_ids or c.is_new:
                table = core.kv.block_table(c.request_id)
                if table:
                    ch.block_tables[c.request_id] = table
        for rid in plan.preempted_request_ids:
            r = core.requests.get(rid)
            if r is not None:
                ch.status[rid] = ("preempted", "")
                ch.preemptions[rid] = r.num_preemptions
                ch.freed_tables.append(rid)
        for r in outcome.finished:
            ch.status[r.request_id] = ("finished", r.finish_reason.value if r.finish_reason else "")
            ch.finished.append(r.request_id)
            ch.freed_tables.append(r.request_id)
        for c in plan.chunks:
            r = core.requests.get(c.request_id)
            if c.is_new and r is not None and c.request_id not in ch.status:
                ch.status[c.request_id] = ("running", "")
        return ch


async def _after(previous: asyncio.Task | None, write: Coroutine[Any, Any, None]) -> None:
    if previous is not None:
        await asyncio.wait({previous})  # its failure is its own (logged there); ours still runs
    await write
