"""SchedulerApp under failures, in one process: a scripted store (Redis down, or hanging) and
in-process sim workers, so each race is driven step by step instead of hoped for.

Each test names the failure it reproduces; each failed on the code before its fix.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Awaitable, Callable

import grpc
import pytest

from accelgen.v1 import common_pb2, scheduler_pb2, worker_pb2
from scheduler_service.app import SchedulerApp
from scheduler_service.config import SchedulerConfig
from scheduler_service.errors import ServiceError
from scheduler_service.state.store import IterationChanges, status_text
from worker_service.executors.sim import sim_token
from tests.support.in_process_worker import InProcessWorker


class ScriptedStore:
    """The RedisStore methods the app calls, in memory. ``down`` makes every call raise as a
    refused connection does; an unset ``gate`` makes every call wait, as a hung Redis does
    (only ``add_request`` while ``gate_submits_only``); ``held`` counts the calls waiting there."""

    def __init__(self) -> None:
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.gate_submits_only = False
        self.failures = 0
        self.held = 0
        self.status: dict[str, str] = {}
        self.tokens: dict[str, list[int]] = {}

    async def _io(self, submit: bool = False) -> None:
        if submit or not self.gate_submits_only:
            self.held += 1
            try:
                await self.gate.wait()
            finally:
                self.held -= 1
        if self.down:
            self.failures += 1
            raise ConnectionError("Error 111 connecting to redis (scripted)")

    fence = 0  # unfenced: plans carry fence 0

    async def acquire_lease(self, instance: str, ttl_ms: int) -> int:
        return 1

    async def renew_lease(self, ttl_ms: int) -> bool:
        return True

    async def release_lease(self) -> None:
        pass

    async def live_worker_records(self) -> dict[str, Any]:
        return {}

    async def load_live(self) -> list:
        return []

    async def register_worker(self, worker_id: str, address: str, info: Any, ttl_s: float, identity: str = "",
                              draining_until: float = 0.0) -> None:
        await self._io()

    async def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        await self._io()

    async def remove_worker(self, worker_id: str) -> None:
        await self._io()

    async def add_request(self, request: Any, worker_id: str, tenant: str = "", label: str = "", **_: Any) -> None:
        await self._io(submit=True)
        self.status[request.request_id] = "waiting"
        self.tokens[request.request_id] = []

    async def load_request(self, request_id: str) -> None:
        await self._io()
        return None  # only what delivery asks for a request it has no channel of: unknown here

    async def commit_iteration(self, ch: IterationChanges) -> None:
        await self._io()
        for rid, (toks, _times) in ch.tokens.items():
            self.tokens.setdefault(rid, []).extend(toks)
        for rid, (status, _reason) in ch.status.items():
            self.status[rid] = status_text(status)


def _run(scenario: Callable[[SchedulerApp, ScriptedStore], Awaitable[None]], workers: tuple[str, ...] = ("w0",)) -> None:
    """Start an app on a scripted store with in-process workers, run ``scenario``, always stop."""

    async def main() -> None:
        store = ScriptedStore()
        config = SchedulerConfig(heartbeat_interval_s=0.05, heartbeat_ttl_s=60.0)
        app = SchedulerApp(config, store)  # type: ignore[arg-type]
        await app.start()
        try:
            for worker_id in workers:
                await _add_worker(app, worker_id)
            await scenario(app, store)
        finally:
            store.down = False
            store.gate.set()
            await app.stop()

    asyncio.run(main())


async def _add_worker(app: SchedulerApp, worker_id: str) -> None:
    worker = InProcessWorker()
    await app.workers.register(worker_id, "127.0.0.1:1", worker.servicer.info)
    app.workers.lanes[worker_id].link.stub = worker  # before the lane's first await: it never sees the real stub


def _submit(request_id: str, max_tokens: int) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        request_id=request_id, prompt_token_ids=[7] * 40, app_class="batch",
        sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))


async def _until(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _running_when_redis_goes_down(app: SchedulerApp, store: ScriptedStore) -> None:
    """r1 (60 tokens) is mid-generation when Redis starts refusing: a commit is retrying."""
    await app.intake.submit(_submit("r1", 60))
    await _until(lambda: len(app.delivery.channels["r1"].tokens) >= 5, "first tokens")
    store.down = True
    await _until(lambda: store.failures >= 2, "a commit retrying")


def test_heartbeat_answers_from_memory_while_redis_hangs() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        store.gate.clear()  # Redis stops answering (a stall, not a refusal)
        assert await asyncio.wait_for(app.workers.heartbeat("w0"), timeout=0.5) is True

    _run(scenario)


def test_cancel_abandoned_by_its_caller_is_still_complete() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await app.intake.submit(_submit("r1", 500))
        await _until(lambda: len(app.delivery.channels["r1"].tokens) >= 3, "first tokens")
        store.gate.clear()
        with pytest.raises(asyncio.TimeoutError):  # the Cancel's deadline ends while Redis hangs
            await asyncio.wait_for(app.intake.cancel("r1"), timeout=0.05)
        channel = app.delivery.channels["r1"]
        assert channel.finished and channel.finish_reason == "abort"  # watchers are released
        assert "r1" not in app.workers.lanes["w0"].core.requests and app.workers.worker_of("r1") is None
        store.gate.set()
        await _until(lambda: store.status.get("r1") == "cancelled", "the deferred cancel record")

    _run(scenario)


def test_dropping_a_worker_while_redis_is_down_publishes_every_applied_token() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await _running_when_redis_goes_down(app, store)
        drop = asyncio.create_task(app.workers.drop("w0", reason="test"))
        # The drop has taken the lane away and waits for its pending write, which Redis refuses.
        await _until(lambda: "w0" not in app.workers.lanes and app.workers.lane_of("r1") is not None,
                     "the drop to be under way")
        store.down = False
        await drop
        await _add_worker(app, "w1")  # adopts the orphaned request and recomputes it
        channel = app.delivery.channels["r1"]
        await _until(lambda: channel.finished, "the request to finish on w1")
        assert channel.tokens == [sim_token("r1", i) for i in range(60)]
        assert store.tokens["r1"] == channel.tokens

    _run(scenario)


def test_submit_racing_a_worker_drop_runs_on_a_live_worker() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        picked = app.workers.pick_lane().worker_id  # both idle: the submit picks the same one
        store.gate_submits_only = True
        store.gate.clear()
        submit = asyncio.create_task(app.intake.submit(_submit("r1", 10)))
        await _until(lambda: store.held == 1, "the submit to be inside its Redis write")
        await app.workers.drop(picked, reason="test")  # leaves between the pick and the write's end
        store.gate.set()
        await submit
        owner = app.workers.worker_of("r1")
        assert owner != picked and owner in app.workers.lanes
        await _until(lambda: app.delivery.channels["r1"].finished, "the request to finish")
        assert len(app.delivery.channels["r1"].tokens) == 10

    _run(scenario, workers=("w0", "w1"))


def test_submit_abandoned_mid_write_is_accepted_whole_or_not_at_all() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        store.gate.clear()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(app.intake.submit(_submit("r1", 10)), timeout=0.05)
        with pytest.raises(ServiceError) as exc:  # still being accepted: the id is taken
            await asyncio.wait_for(app.intake.submit(_submit("r1", 10)), timeout=1.0)
        assert exc.value.code == grpc.StatusCode.ALREADY_EXISTS
        store.gate.set()
        channels = app.delivery.channels
        await _until(lambda: "r1" in channels and channels["r1"].finished, "the accepted request to finish")
        assert store.status["r1"] == "finished" and len(app.delivery.channels["r1"].tokens) == 10

    _run(scenario)


def test_a_prompt_id_outside_the_vocabulary_is_refused_and_the_worker_kept() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        bad = _submit("r1", 5)
        bad.prompt_token_ids[3] = 60000  # the sim worker's vocabulary has 50272 ids
        with pytest.raises(ServiceError) as exc:
            await app.intake.submit(bad)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids[3] = 60000" in str(exc.value)
        assert app.server_info().vocab_size == 50272
        await app.intake.submit(_submit("r2", 5))
        await _until(lambda: app.delivery.channels["r2"].finished, "a good request to finish")
        assert "w0" in app.workers.lanes

    _run(scenario)


def test_a_worker_reregistering_unchanged_keeps_its_lane_and_a_changed_one_gets_a_fresh_epoch() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await app.intake.submit(_submit("r1", 300))
        await _until(lambda: len(app.delivery.channels["r1"].tokens) >= 3, "first tokens")
        lane = app.workers.lanes["w0"]
        await app.workers.register("w0", lane.address, lane.info)  # back after a blip, as it was
        assert app.workers.lanes["w0"] is lane and app.workers.worker_of("r1") == "w0"
        await _until(lambda: app.delivery.channels["r1"].finished, "the request to finish on the kept lane")
        assert app.delivery.channels["r1"].tokens == [sim_token("r1", i) for i in range(300)]
        changed = dataclasses.replace(lane.info, num_blocks=lane.info.num_blocks - 1)
        await app.workers.register("w0", lane.address, changed)  # another KV size: not the worker the lane knew
        assert app.workers.lanes["w0"] is not lane and app.workers.lanes["w0"].epoch not in ("", lane.epoch)

    _run(scenario)


def test_a_drop_whose_caller_gives_up_still_hands_the_requests_on() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await _running_when_redis_goes_down(app, store)
        with pytest.raises(asyncio.TimeoutError):  # e.g. DeregisterWorker's deadline, Redis still down
            await asyncio.wait_for(app.workers.drop("w0", reason="test"), timeout=0.05)
        store.down = False
        await _until(lambda: [r.request_id for r in app.workers.orphans] == ["r1"], "the request to be orphaned")
        await _add_worker(app, "w1")
        await _until(lambda: app.delivery.channels["r1"].finished, "the request to finish on w1")
        assert app.delivery.channels["r1"].tokens == [sim_token("r1", i) for i in range(60)]

    _run(scenario)


def test_cancel_is_recorded_after_the_lanes_earlier_writes() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await app.intake.submit(_submit("r1", 500))
        store.down = True  # the first iteration's write (status "running") cannot land
        await _until(lambda: store.failures >= 5, "that write backing off to ~1 s between tries")
        await asyncio.wait_for(app.intake.cancel("r1"), timeout=2.0)
        lane = app.workers.lanes["w0"]
        store.down = False
        await _until(lambda: all(t.done() for t in app.background.tasks) and lane.commits.last.done(),
                     "the iteration's write and the cancel's to land")
        assert store.status["r1"] == "cancelled"

    _run(scenario)


def test_cancel_while_the_worker_is_being_dropped_cancels() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await _running_when_redis_goes_down(app, store)
        drop = asyncio.create_task(app.workers.drop("w0", reason="test"))
        # The lane is gone from the registry, its requests not yet moved (its write waits for Redis).
        await _until(lambda: "w0" not in app.workers.lanes and app.workers.lane_of("r1") is not None,
                     "the drop to be under way")
        assert await app.intake.cancel("r1") is True
        store.down = False
        await drop
        assert app.workers.orphans == [] and app.workers.worker_of("r1") is None
        assert app.delivery.channels["r1"].finish_reason == "abort"
        await _until(lambda: store.status.get("r1") == "cancelled", "the cancel record")

    _run(scenario)


def test_cancel_during_a_submits_write_applies_once_it_is_in() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        store.gate_submits_only = True
        store.gate.clear()
        submit = asyncio.create_task(app.intake.submit(_submit("r1", 500)))
        await _until(lambda: store.held == 1, "the submit to be inside its Redis write")
        assert await asyncio.wait_for(app.intake.cancel("r1"), timeout=0.5) is True  # does not wait for Redis
        store.gate.set()
        await submit
        await _until(lambda: app.delivery.channels["r1"].finished, "the request to be cancelled")
        assert app.delivery.channels["r1"].finish_reason == "abort" and app.workers.worker_of("r1") is None

    _run(scenario)


def test_a_reply_the_core_cannot_apply_drops_the_worker_and_requeues() -> None:
    class Garbled(InProcessWorker):
        def received(self, reply):
            reply.sampled_token_ids.clear()  # claims to have sampled nothing
            return reply

    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        app.workers.lanes["w0"].link.stub = Garbled()
        await app.intake.submit(_submit("r1", 10))
        await _until(lambda: "w0" not in app.workers.lanes and app.workers.orphans, "the worker to be dropped")
        assert [r.request_id for r in app.workers.orphans] == ["r1"]  # kept, waiting for a worker

    _run(scenario)


def test_admission_refuses_a_hopeless_submit_with_a_retry_hint_and_keeps_the_rest() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await app.intake.submit(_submit("accepted", 20))  # batch class: a JCT of minutes, always admitted
        admission = app.workers.lanes["w0"].core.policy.admission
        assert admission is not None  # on by default
        admission._tokens, admission._seconds = 1.0, 1.0  # as if the lane had prefilled 1 token/s
        chat = scheduler_pb2.SubmitRequest(request_id="hopeless", prompt_token_ids=[7] * 40, app_class="chat",
                                           sampling_params=common_pb2.SamplingParams(max_new_tokens=4))
        with pytest.raises(ServiceError) as err:
            await app.intake.submit(chat)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cannot be met" in str(err.value)
        assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
        assert app.workers.worker_of("hopeless") is None and "hopeless" not in store.status
        await _until(lambda: store.status.get("accepted") == "finished", "the accepted request to finish")

    _run(scenario)


def test_admission_can_be_switched_off() -> None:
    async def main() -> None:
        app = SchedulerApp(SchedulerConfig(admission=False), ScriptedStore())  # type: ignore[arg-type]
        await app.start()
        try:
            await _add_worker(app, "w0")
            assert app.workers.lanes["w0"].core.policy.admission is None
        finally:
            await app.stop()

    asyncio.run(main())


def test_a_request_watchmany_cannot_watch_gets_the_status_a_call_would() -> None:
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        async def watch_once(request_id: str) -> scheduler_pb2.WatchError:
            watch = scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=request_id)])

            async def requests():
                yield watch

            responses = [resp async for resp in app.delivery.watch_many(requests())]
            (error,) = [e for resp in responses for e in resp.errors]
            return error

        unknown = await watch_once("ghost")
        assert (unknown.code, unknown.message) == (grpc.StatusCode.NOT_FOUND.value[0],
                                                   "request 'ghost' is unknown (or expired)")
        store.down = True
        down = await watch_once("ghost")
        assert down.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert down.message.startswith("the state store (Redis) is unavailable: ")

    _run(scenario)


def test_a_lane_whose_loop_crashes_is_dropped_and_its_requests_finish_elsewhere() -> None:
    """A bug in a lane's loop (not a worker's error) used to end the task silently while heartbeats
    kept its worker registered, so its requests hung: now the registry sees the task end."""
    async def scenario(app: SchedulerApp, store: ScriptedStore) -> None:
        await app.intake.submit(_submit("r1", 30))
        lane = app.workers.lane_of("r1")
        assert lane is not None
        await _until(lambda: len(app.delivery.channels["r1"].tokens) >= 3, "first tokens")

        def crash(now: float):
            raise RuntimeError("a bug in the lane's loop")

        lane.core.step = crash  # type: ignore[method-assign]
        await _until(lambda: lane.worker_id not in app.workers.lanes, "the crashed lane to be dropped")
        await _until(lambda: app.delivery.channels["r1"].finished, "r1 to finish on the other worker")
        channel = app.delivery.channels["r1"]
        assert channel.finish_reason == "length" and len(channel.tokens) == 30
        assert store.status["r1"] == "finished"

    _run(scenario, workers=("w0", "w1"))
