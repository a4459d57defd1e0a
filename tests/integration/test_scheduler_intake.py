"""The scheduler's intake over real gRPC against a real Redis: what it keeps of a Submit (tenant,
label) across a restart, ids that are taken, and the bounds on what gateways and workers send.

The scheduler runs in-process (``start_scheduler``, port 0); its one worker is an in-process sim
worker standing in for the lane's stub, or a worker that never answers, so requests stay live.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from accelgen.wire.worker_info import worker_info_to_json
from scheduler_service import delivery
from scheduler_service.config import SchedulerConfig
from scheduler_service.errors import ServiceError
from scheduler_service.main import SchedulerHandle, start_scheduler
from scheduler_service.workers import WorkerRegistry
from tests.support.in_process_worker import InProcessWorker

pytestmark = pytest.mark.integration


_UNUSED_PORTS = itertools.count(1)  # nothing listens there: the stub answers instead


async def _scheduler(url: str, prefix: str, hang: bool = False, **settings) -> SchedulerHandle:
    config = SchedulerConfig(port=0, redis_url=url, redis_prefix=prefix, heartbeat_interval_s=0.5,
                             heartbeat_ttl_s=60.0, lease_ttl_s=2.0, **settings)
    handle = await start_scheduler(config)
    worker = InProcessWorker(hang)
    # A new address each time: a scheduler that recovered w0 from Redis already runs a lane for
    # it, dialing the address it had; registering the same worker unchanged would keep that lane
    # (which fails to connect and is dropped), a changed one gets a fresh lane with the stub.
    await handle.app.workers.register("w0", f"127.0.0.1:{next(_UNUSED_PORTS)}", worker.servicer.info)
    handle.app.workers.lanes["w0"].link.stub = worker  # before the lane's first await
    return handle


def _run(scenario: Callable[[scheduler_pb2_grpc.SchedulerStub, SchedulerHandle], Awaitable[None]], url: str,
         prefix: str, hang: bool = False, **settings) -> None:
    async def main() -> None:
        handle = await _scheduler(url, prefix, hang, **settings)
        channel = grpc.aio.insecure_channel(handle.address)
        try:
            await scenario(scheduler_pb2_grpc.SchedulerStub(channel), handle)
        finally:
            await channel.close()
            await handle.stop(grace_s=0.2)

    asyncio.run(main())


def _submit(rid: str, max_tokens: int = 4, **fields) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=[7] * 20, app_class="batch",
                                       sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens,
                                                                                 ignore_eos=True), **fields)


async def _refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _until(predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- tenant and label --------------------------------------------------------------------------
def test_tenant_and_label_are_kept_and_survive_a_scheduler_restart(redis_url: str) -> None:
    async def main() -> None:
        first = await _scheduler(redis_url, "tags:", hang=True)  # the request stays live
        async with grpc.aio.insecure_channel(first.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            await stub.Submit(_submit("r1", tenant="team-a", label="client:req.1", owner="gw1"), timeout=5)
            state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="r1"), timeout=5)
            assert (state.tenant, state.label, state.status) == ("team-a", "client:req.1", "waiting")
            await stub.Submit(_submit("r2"), timeout=5)  # no tenant (an open gateway), no label
            state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="r2"), timeout=5)
            assert (state.tenant, state.label) == ("", "")
        await first.stop(grace_s=0.2)

        second = await _scheduler(redis_url, "tags:", hang=True)  # recovers r1 and r2 from Redis
        try:
            assert {r.request_id for lane in second.app.workers.lanes.values() for r in lane.core.requests.values()} \
                   | {r.request_id for r in second.app.workers.orphans} == {"r1", "r2"}
            async with grpc.aio.insecure_channel(second.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="r1"), timeout=5)
                assert (state.tenant, state.label) == ("team-a", "client:req.1")
                err = await _refused(stub.Submit(_submit("r1", tenant="team-b"), timeout=5))
                assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        finally:
            await second.stop(grace_s=0.2)

    asyncio.run(main())


@pytest.mark.parametrize("fields, named", [
    ({"tenant": "a b"}, "tenant must be printable characters without spaces"),
    ({"tenant": "t" * 129}, "tenant must have 0 to 128 characters, got 129"),
    ({"label": "my label"}, "label may use only letters, digits"),
    ({"label": "x" * 129}, "label must have 0 to 128 characters, got 129"),
    ({"owner": "g" * 257}, "owner must have 0 to 256 characters, got 257"),
])
def test_a_bad_tenant_label_or_owner_is_invalid_argument_naming_it(redis_url: str, fields: dict, named: str) -> None:
    async def scenario(stub: scheduler_pb2_grpc.SchedulerStub, handle: SchedulerHandle) -> None:
        err = await _refused(stub.Submit(_submit("bad", **fields), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.details()
        assert await handle.app.store.load_request("bad") is None

    _run(scenario, redis_url, "badtags:")


# -- ids that are taken --------------------------------------------------------------------------
def test_the_id_of_a_finished_request_is_refused_after_its_channel_expired(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "CHANNEL_KEPT_S", 0.05)

    async def scenario(stub: scheduler_pb2_grpc.SchedulerStub, handle: SchedulerHandle) -> None:
        await stub.Submit(_submit("done-1", tenant="team-a"), timeout=5)

        async def finished_and_forgotten() -> bool:
            state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="done-1"), timeout=5)
            return state.status == "finished" and "done-1" not in handle.app.delivery.channels

        await _until(finished_and_forgotten, "the request to finish and its channel to expire")
        # Before: accepted, and the new request took over the finished one's record (and tenant).
        err = await _refused(stub.Submit(_submit("done-1", tenant="team-b"), timeout=5))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "'done-1' is already in use" in err.details()
        state = await stub.GetRequest(common_pb2.GetRequestRequest(request_id="done-1"), timeout=5)
        assert (state.status, state.tenant, len(state.output_ids)) == ("finished", "team-a", 4)
        await stub.Submit(_submit("done-2"), timeout=5)  # another id is fine

    _run(scenario, redis_url, "taken:")


# -- workers ------------------------------------------------------------------------------------
def _register(worker_id: str = "fzw-1", address: str = "127.0.0.1:1", **description) -> scheduler_pb2.RegisterWorkerRequest:
    fields = dict(model="m", executor="sim", block_size=16, num_blocks=64, max_model_len=2048, vocab_size=50272)
    return scheduler_pb2.RegisterWorkerRequest(worker_id=worker_id, address=address,
                                               description=common_pb2.WorkerDescription(**{**fields, **description}))


def test_registration_fields_out_of_bounds_are_refused_quickly_naming_the_field(redis_url: str) -> None:
    async def scenario(stub: scheduler_pb2_grpc.SchedulerStub, handle: SchedulerHandle) -> None:
        cases = [
            (_register(num_blocks=2**32 - 1), "description.num_blocks must be in [2, 1048576], got 4294967295"),
            (_register(num_blocks=0), "description.num_blocks must be in [2, 1048576], got 0"),
            (_register(block_size=0), "description.block_size must be in [1, 65536]"),
            (_register(max_model_len=2**32 - 1), "description.max_model_len must be in [0, 16777216]"),
            (_register(vocab_size=2**32 - 1), "description.vocab_size must be in [0, 16777216]"),
            (_register(max_num_seqs=2**32 - 1), "description.max_num_seqs must be in [0, 1048576]"),
            (_register(max_num_batched_tokens=2**32 - 1), "description.max_num_batched_tokens must be in"),
            (_register(profile_json="x" * ((1 << 20) + 1)),
             "description.profile_json may have at most 1048576 characters, got 1048577"),
            (_register(model="m" * 513), "description.model may have at most 512 characters"),
            (_register(worker_id=""), "worker_id must have 1 to 128 characters, got 0"),
            (_register(worker_id="w" * 129), "worker_id must have 1 to 128 characters, got 129"),
            (_register(worker_id="bad id"), "worker_id may use only letters, digits"),
            (_register(address=""), "address is required"),
            (_register(address="h" * 300 + ":1"), "address must have 0 to 256 characters, got 302"),
            (_register(address="127.0.0.1 :1"), "address must be printable characters without spaces"),
        ]
        for msg, named in cases:
            start = time.perf_counter()
            err = await _refused(stub.RegisterWorker(msg, timeout=5))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.details(), (named, err.details())
            assert time.perf_counter() - start < 1.0, named
        assert set(handle.app.workers.lanes) == {"w0"} and set(await handle.app.store.live_workers()) == {"w0"}
        for call in (stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="w" * 10_000), timeout=5),
                     stub.DeregisterWorker(scheduler_pb2.DeregisterWorkerRequest(worker_id="no such!"), timeout=5)):
            err = await _refused(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "worker_id" in err.details()
        reply = await stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="nobody"), timeout=5)
        assert not reply.known
        err = await _refused(stub.GetRequest(common_pb2.GetRequestRequest(request_id="r" * 300), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id must have 1 to 256" in err.details()

    _run(scenario, redis_url, "register:")


def test_max_workers_bounds_the_registered_ids_and_a_reregistration_counts_once(redis_url: str) -> None:
    async def scenario(stub: scheduler_pb2_grpc.SchedulerStub, handle: SchedulerHandle) -> None:
        await stub.RegisterWorker(_register("mw-1", "127.0.0.1:2"), timeout=5)  # w0 and mw-1: the cap
        for _ in range(2):  # the same worker again, and again changed: still one id of the two
            await stub.RegisterWorker(_register("mw-1", "127.0.0.1:2"), timeout=5)
        await stub.RegisterWorker(_register("mw-1", "127.0.0.1:3", num_blocks=128), timeout=5)
        err = await _refused(stub.RegisterWorker(_register("mw-2", "127.0.0.1:4"), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot register worker mw-2: 2 workers are registered already, the scheduler's max_workers = 2" \
            in err.details()
        assert set(handle.app.workers.lanes) == {"w0", "mw-1"} and "mw-2" not in await handle.app.store.live_workers()
        await stub.DeregisterWorker(scheduler_pb2.DeregisterWorkerRequest(worker_id="mw-1"), timeout=5)
        await stub.RegisterWorker(_register("mw-2", "127.0.0.1:4"), timeout=5)  # room again
        assert set(handle.app.workers.lanes) == {"w0", "mw-2"}

    _run(scenario, redis_url, "maxw:", max_workers=2)


def test_a_worker_ids_certificate_binding_survives_a_restart_and_old_records_are_adopted(redis_url: str) -> None:
    """Identities as the servicer passes them (certificate fingerprints; test_tls covers the real
    handshakes): kept in Redis with the worker, so a restarted scheduler refuses another
    certificate too; a record without one (written before identities were kept) is bound by the
    first certificate that heart-beats for it."""
    async def refused_by(call: Awaitable[object]) -> ServiceError:
        with pytest.raises(ServiceError) as info:
            await call
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        return info.value

    async def main() -> None:
        first = await _scheduler(redis_url, "bind:")
        try:
            info = first.app.workers.lanes["w0"].info
            await first.app.workers.register("wb", "127.0.0.1:5", info, identity="a" * 64)
            # An old record: the fields a scheduler wrote before identities were kept.
            old = json.dumps({"address": "127.0.0.1:6", **json.loads(worker_info_to_json(info))})
            await first.app.store.redis.hset("bind:workers", "wold", old)
            await first.app.store.redis.set("bind:alive:wold", "1", px=60_000)
        finally:
            await first.stop(grace_s=0.2)

        second = await _scheduler(redis_url, "bind:")
        workers: WorkerRegistry = second.app.workers
        try:
            assert {"wb", "wold"} <= set(workers.lanes)
            err = await refused_by(workers.register("wb", "127.0.0.1:7", info, identity="b" * 64))
            assert "worker id wb is registered with another certificate" in str(err)
            await refused_by(workers.heartbeat("wb", identity="b" * 64))
            await refused_by(workers.deregister("wb", identity="b" * 64))
            assert workers.lanes["wb"].address == "127.0.0.1:5"
            assert await workers.heartbeat("wb", identity="a" * 64)
            # The unbound lane: the first certificate takes it, persisted for the next scheduler.
            assert await workers.heartbeat("wold", identity="c" * 64)
            await refused_by(workers.heartbeat("wold", identity="d" * 64))

            async def persisted() -> bool:
                return (await second.app.store.live_worker_records())["wold"].identity == "c" * 64
            await _until(persisted, "the adopted identity to be written to Redis")
            await workers.deregister("wb", identity="a" * 64)  # its holder leaves: the id is free
            await workers.register("wb", "127.0.0.1:7", info, identity="b" * 64)
            assert (await second.app.store.live_worker_records())["wb"].identity == "b" * 64
        finally:
            await second.stop(grace_s=0.2)

    asyncio.run(main())


# -- WatchMany --------------------------------------------------------------------------------
async def _requests(queue: asyncio.Queue) -> AsyncIterator[scheduler_pb2.WatchManyRequest]:
    while (msg := await queue.get()) is not None:
        yield msg


def _watch(*rids: str, unwatch: tuple[str, ...] = ()) -> scheduler_pb2.WatchManyRequest:
    return scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=r) for r in rids],
                                          unwatch=list(unwatch), owner="gw1")


def test_a_watchmany_message_over_the_id_limit_ends_the_stream_invalid_argument(redis_url: str) -> None:
    async def scenario(stub: scheduler_pb2_grpc.SchedulerStub, handle: SchedulerHandle) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        call = stub.WatchMany(_requests(queue))
        queue.put_nowait(_watch(*(f"r{i}" for i in range(1000)), unwatch=tuple(f"u{i}" for i in range(25))))
        err = await _refused(call.read())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 1024 request ids (watch and unwatch together), got 1025" in err.details()
        call = stub.WatchMany(_requests(queue := asyncio.Queue()))
        queue.put_nowait(_watch("x" * 257))
        err = await _refused(call.read())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "watch.request_id" in err.details()

    _run(scenario, redis_url, "watchmsg:")


def test_a_watchmany_stream_watches_at_most_its_limit_and_the_others_go_on(redis_url: str) -> None:
    async def scenario(stub: scheduler_pb2_grpc.SchedulerStub, handle: SchedulerHandle) -> None:
        for rid in ("a", "b", "c"):
            await stub.Submit(_submit(rid), timeout=5)  # live: the worker never answers
        queue: asyncio.Queue = asyncio.Queue()
        call = stub.WatchMany(_requests(queue))
        queue.put_nowait(_watch("a", "b", "c"))
        resp = await asyncio.wait_for(call.read(), 5)
        [error] = resp.errors
        assert error.request_id == "c" and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "watch_max_ids_per_stream" in error.message
        queue.put_nowait(_watch("c", unwatch=("a",)))  # room again: c is watched now
        await asyncio.sleep(0.1)
        await stub.Cancel(common_pb2.CancelRequest(request_id="c"), timeout=5)
        resp = await asyncio.wait_for(call.read(), 5)
        assert [(b.request_id, b.finished, b.finish_reason) for b in resp.batches] == [("c", True, "abort")]
        assert not resp.errors
        queue.put_nowait(None)
        call.cancel()

    _run(scenario, redis_url, "watchstream:", hang=True, watch_max_ids_per_stream=2)


def test_the_gateway_splits_a_large_rewatch_into_messages_the_scheduler_takes(redis_url: str) -> None:
    """2000 unknown ids queued at once (a gateway re-watching after a restart): every one is
    answered NOT_FOUND, none refused for the message size."""
    from gateway.watch_hub import _requests as gateway_requests

    async def scenario(stub: scheduler_pb2_grpc.SchedulerStub, handle: SchedulerHandle) -> None:
        outbox: asyncio.Queue = asyncio.Queue()
        for i in range(2000):
            outbox.put_nowait(scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=f"n{i}")]))
        call = stub.WatchMany(gateway_requests(outbox, "gw1"))
        seen: set[str] = set()
        while len(seen) < 2000:
            resp = await asyncio.wait_for(call.read(), 10)
            assert all(e.code == grpc.StatusCode.NOT_FOUND.value[0] for e in resp.errors)
            seen |= {e.request_id for e in resp.errors}
        call.cancel()

    _run(scenario, redis_url, "rewatch:")
