"""The issue's goal, as a deployment would run it: every service a process, API keys at the
gateway and mutual TLS between the services (certificates from ``accelgen certs``).

With keys and ``--tls-dir`` configured: no request is served to, read by or cancelled by a caller
without a valid key, on gRPC and HTTP, a guessed or leaked id included; no plaintext connection
is accepted between services; a worker without a certificate from the CA cannot register.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from accelgen.common.certs import CertsRequest, make_certs
from accelgen.common.tls import open_sync_channel
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from launcher.stack import Stack, python_module, spawn, start_stack

pytestmark = pytest.mark.e2e

KEY_A = "team-a-" + "a" * 24
KEY_B = "team-b-" + "b" * 24


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("secure")
    make_certs(CertsRequest(root / "tls"))
    keys = root / "api-keys"
    keys.write_text(f"# two tenants\n{KEY_A} name=team-a\n{KEY_B} name=team-b\n")
    s = start_stack(workers=1, executor="sim", worker_args=["--time-scale", "0.02", "--log-level", "WARNING"],
                    scheduler_args=["--log-level", "WARNING"],
                    gateway_args=["--api-keys", str(keys), "--log-level", "WARNING"], log_dir=root,
                    tls_dir=root / "tls")
    yield s
    s.stop()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def generate(stack: Stack, key: str | None, max_tokens: int = 8) -> list[gateway_pb2.GenerateResponse]:
    with grpc.insecure_channel(stack.gateway_address) as ch:
        req = gateway_pb2.GenerateRequest(request_id="my-own-id", text="hello there", app_class="chat", stream=True,
                                          sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens))
        return list(gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=30,
                                                              metadata=bearer(key) if key else None))


def http(stack: Stack, method: str, path: str, key: str | None, body: dict[str, Any] | None = None
         ) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{stack.http_port}{path}", method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_a_valid_key_is_served_and_owns_its_request(stack: Stack) -> None:
    responses = generate(stack, KEY_A)
    assert responses[-1].complete.completion_tokens == 8
    rid = responses[-1].request_id
    assert rid != "my-own-id" and len(rid) == 32  # made by the gateway; the client's id is a label
    with grpc.insecure_channel(stack.gateway_address) as ch:
        state = gateway_pb2_grpc.GatewayStub(ch).GetRequest(common_pb2.GetRequestRequest(request_id=rid),
                                                            timeout=10, metadata=bearer(KEY_A))
    assert (state.tenant, state.label, state.status) == ("team-a", "my-own-id", "finished")


@pytest.mark.parametrize("key", [None, "not-a-key-of-this-gateway-at-all"])
def test_no_request_without_a_valid_key(stack: Stack, key: str | None) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        generate(stack, key)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, body = http(stack, "POST", "/v1/completions", key, {"prompt": "hi", "max_tokens": 4})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_another_key_cannot_read_cancel_or_attach_even_knowing_the_id(stack: Stack) -> None:
    """A stream still running: key B holds its id (leaked, guessed) and gets exactly what a random
    id gets; key A's request runs on untouched."""
    with grpc.insecure_channel(stack.gateway_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        req = gateway_pb2.GenerateRequest(text="a long one", app_class="batch", stream=True,
                                          sampling_params=common_pb2.SamplingParams(max_new_tokens=400))
        call = stub.Generate(req, timeout=60, metadata=bearer(KEY_A))
        rid = dict(call.initial_metadata())["x-request-id"]
        unknown = uuid.uuid4().hex
        answers: dict[str, list[tuple[Any, str]]] = {}
        for victim in (rid, unknown):
            seen = answers[victim] = []
            for method, message in ((stub.GetRequest, common_pb2.GetRequestRequest(request_id=victim)),
                                    (stub.Cancel, common_pb2.CancelRequest(request_id=victim))):
                with pytest.raises(grpc.RpcError) as err:
                    method(message, timeout=10, metadata=bearer(KEY_B))
                seen.append((err.value.code(), err.value.details().replace(victim, "ID")))
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Attach(gateway_pb2.AttachRequest(request_id=victim), timeout=10, metadata=bearer(KEY_B)))
            seen.append((err.value.code(), err.value.details().replace(victim, "ID")))
            status, body = http(stack, "GET", f"/v1/requests/{victim}", KEY_B)
            seen.append((status, body["error"]["message"].replace(victim, "ID")))
        assert [code for code, _ in answers[rid]] == [grpc.StatusCode.NOT_FOUND] * 3 + [404]
        assert answers[rid] == answers[unknown]  # "someone else's" and "nobody's" cannot be told apart
        responses = list(call)
    assert responses[-1].complete.completion_tokens == 400 and responses[-1].complete.finish_reason == "length"
    assert http(stack, "GET", f"/v1/requests/{rid}", KEY_A)[0] == 200


def test_no_plaintext_between_services(stack: Stack) -> None:
    """The scheduler and a worker refuse a plaintext client (the TLS handshake fails); the same call
    with a gateway certificate goes through, so it is the transport that is refused."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    workers = _worker_addresses(stack)
    assert workers
    for address, service in [(stack.scheduler_address, "accelgen.v1.Scheduler"), (workers[0], "accelgen.v1.Worker")]:
        with grpc.insecure_channel(address) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with open_sync_channel(stack.scheduler_address, stack.probe, "scheduler") as ch:
        assert scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(),
                                                                  timeout=5).live_workers == 1
    # A gateway certificate may not send a worker plans: that is the scheduler's alone.
    with open_sync_channel(workers[0], stack.probe, "worker") as ch:
        with pytest.raises(grpc.RpcError) as denied:
            worker_pb2_grpc.WorkerStub(ch).ExecuteIteration(worker_pb2.BatchPlan(), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_rogue_worker_cannot_register(stack: Stack, tmp_path: Path) -> None:
    """A worker process with certificates from another CA dials the real scheduler: refused at the
    handshake, it never registers (the scheduler's worker count stays 1)."""
    make_certs(CertsRequest(tmp_path / "rogue"))
    rogue = spawn("rogue-worker", python_module("worker_service.main", "--scheduler", stack.scheduler_address,
                                                "--worker-id", "rogue", "--tls-dir", str(tmp_path / "rogue"),
                                                "--log-level", "WARNING"), tmp_path)
    try:
        time.sleep(6.0)  # several registration attempts
        with open_sync_channel(stack.scheduler_address, stack.probe, "scheduler") as ch:
            info = scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
        assert info.live_workers == 1
    finally:
        rogue.stop()
    assert generate(stack, KEY_A, max_tokens=4)[-1].complete.completion_tokens == 4  # the real one serves on


def _worker_addresses(stack: Stack) -> list[str]:
    """The workers' addresses, as the scheduler's Redis records hold them."""
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    try:
        return [json.loads(raw)["address"] for raw in r.hgetall("accelgen:workers").values()]
    finally:
        r.close()

