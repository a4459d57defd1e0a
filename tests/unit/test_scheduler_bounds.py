"""Bounds on what peers send the scheduler, without a server: the checks in ``convert``, how
WatchMany streams share the Redis pool (``Delivery``'s lookups, against a counting fake store), how
a gateway splits its watch messages (``accelgen.wire.watch``), the ``max_workers`` setting, and the
certificate identity a worker id is bound to (``worker_identity``)."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest

from accelgen.common.certs import CertsRequest, make_certs
from accelgen.core.request import MAX_STOP_TOKEN_IDS
from accelgen.v1 import common_pb2, scheduler_pb2
from accelgen.wire.watch import WATCH_IDS_PER_GATEWAY_MESSAGE, watch_messages
from scheduler_service import convert
from scheduler_service.config import SchedulerConfig
from scheduler_service.delivery import Delivery, WatchLimits
from scheduler_service.errors import ServiceError
from scheduler_service.worker_identity import certificate_identity

pytestmark = pytest.mark.unit


def test_tags_are_returned_when_they_fit_and_refused_naming_the_field_otherwise() -> None:
    ok = scheduler_pb2.SubmitRequest(tenant="key-0123456789ab", label="a.b_c:d-1", owner="gw-1")
    assert convert.submit_tags(ok) == ("key-0123456789ab", "a.b_c:d-1")
    assert convert.submit_tags(scheduler_pb2.SubmitRequest()) == ("", "")
    for fields, named in [({"tenant": "x\ty"}, "tenant"), ({"tenant": "é" * 129}, "tenant"),
                          ({"label": "a/b"}, "label"), ({"owner": "gw 1"}, "owner")]:
        with pytest.raises(convert.InvalidInput, match=named):
            convert.submit_tags(scheduler_pb2.SubmitRequest(**fields))


def test_stop_token_ids_are_counted_before_they_are_copied() -> None:
    msg = scheduler_pb2.SubmitRequest(request_id="r", prompt_token_ids=[5], sampling_params=common_pb2.SamplingParams(
        stop_token_ids=range(MAX_STOP_TOKEN_IDS + 1)))
    with pytest.raises(convert.InvalidInput, match=f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids"):
        convert.request_from_submit(msg, SchedulerConfig().catalog(), max_model_len=2048, now=0.0)
    del msg.sampling_params.stop_token_ids[-1]
    assert len(convert.request_from_submit(msg, SchedulerConfig().catalog(), 2048, 0.0).sampling.stop_token_ids) \
        == MAX_STOP_TOKEN_IDS


def test_a_registration_is_checked_before_anything_is_built_from_it() -> None:
    msg = scheduler_pb2.RegisterWorkerRequest(worker_id="host-1.example:2@x", address="10.0.0.5:50061",
                                              description=common_pb2.WorkerDescription(block_size=16, num_blocks=64))
    worker_id, address, info = convert.worker_from_register(msg)
    assert (worker_id, address, info.num_blocks) == ("host-1.example:2@x", "10.0.0.5:50061", 64)
    msg.description.num_blocks = 2**32 - 1
    with pytest.raises(convert.InvalidInput, match=r"description.num_blocks must be in \[2, 1048576\]"):
        convert.worker_from_register(msg)


class CountingStore:
    """``load_request`` answers "unknown" after a while, counting how many run at once."""

    def __init__(self) -> None:
        self.running = self.most = self.calls = 0

    async def load_request(self, request_id: str) -> None:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.002)
        self.running -= 1
        return None


async def _one_message(msg: scheduler_pb2.WatchManyRequest, done: asyncio.Event) -> AsyncIterator:
    yield msg
    await done.wait()


def test_watchmany_store_lookups_are_bounded_across_streams_and_all_answered() -> None:
    async def main() -> None:
        store = CountingStore()
        delivery = Delivery(store, WatchLimits(store_lookups=3))  # type: ignore[arg-type]
        done = asyncio.Event()

        async def stream(prefix: str) -> set[str]:
            msg = scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=f"{prefix}{i}")
                                                        for i in range(400)])
            answered: set[str] = set()
            async for resp in delivery.watch_many(_one_message(msg, done)):
                assert all(e.code == grpc.StatusCode.NOT_FOUND.value[0] for e in resp.errors)
                answered |= {e.request_id for e in resp.errors}
                if len(answered) == 400:
                    break
            return answered

        first, second = await asyncio.gather(stream("a"), stream("b"))
        done.set()
        assert len(first) == len(second) == 400 and store.calls == 800
        assert store.most == 3, "at most store_lookups lookups at once, all streams together"

    asyncio.run(main())


def test_watch_messages_split_at_the_gateway_limit_and_keep_each_id_once() -> None:
    watch = [scheduler_pb2.WatchRequest(request_id=f"w{i}", start_index=i) for i in range(600)]
    unwatch = [f"u{i}" for i in range(100)]
    messages = list(watch_messages(watch, unwatch, owner="gw1"))
    assert [len(m.watch) + len(m.unwatch) for m in messages] == [256, 256, 188]
    assert all(m.owner == "gw1" for m in messages)
    assert [w for m in messages for w in m.watch] == watch and [u for m in messages for u in m.unwatch] == unwatch
    assert list(watch_messages([], [], owner="gw1")) == [scheduler_pb2.WatchManyRequest(owner="gw1")]


def test_watch_settings_below_what_a_gateway_sends_are_a_config_error() -> None:
    with pytest.raises(ValueError, match=f"watch_max_ids_per_message must be >= {WATCH_IDS_PER_GATEWAY_MESSAGE}"):
        SchedulerConfig(watch_max_ids_per_message=WATCH_IDS_PER_GATEWAY_MESSAGE - 1)
    with pytest.raises(ValueError, match="watch_store_lookups"):
        SchedulerConfig(watch_store_lookups=0)


def test_max_workers_below_one_is_a_config_error() -> None:
    assert SchedulerConfig().max_workers == 64
    with pytest.raises(ValueError, match="max_workers must be >= 1, got 0"):
        SchedulerConfig(max_workers=0)


class _AuthContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self.auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth


def test_a_worker_identity_is_its_certificates_fingerprint_and_tls_without_one_fails_closed(tmp_path: Path) -> None:
    make_certs(CertsRequest(tmp_path, roles=("worker",)))
    pem = (tmp_path / "worker.crt").read_bytes()
    expected = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()
    assert certificate_identity(_AuthContext({"x509_pem_cert": [pem]}), tls=True) == expected  # type: ignore[arg-type]
    assert certificate_identity(_AuthContext({}), tls=False) == ""  # type: ignore[arg-type]
    with pytest.raises(ServiceError, match="no client certificate") as info:
        certificate_identity(_AuthContext({}), tls=True)  # type: ignore[arg-type]
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
