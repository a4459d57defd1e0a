"""Mutual TLS between the services, with real handshakes: a scheduler, a sim worker and a gateway
started in-process with ``tls_dir`` serve a request; plaintext callers, callers with another CA's
certificate and callers of the wrong role are refused; a worker id stays with the certificate that
registered it; a second worker on a taken port does not start; and plaintext off loopback is a
config error.

One stack for the module (Redis, scheduler, worker, gateway with ``client_tls``) on a background
loop; the tests call it with blocking clients, as a rogue peer on the network would.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from accelgen.common.certs import CertsRequest, issue_certificate, make_certs
from accelgen.common.grpc_server import CannotListen, free_port
from accelgen.profiles import load_profile
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from accelgen.v1 import worker_pb2_grpc
from accelgen.wire.worker_info import worker_info_to_proto
from gateway.config import GatewayConfig
from gateway.main import start_gateway
from launcher.stack import start_redis
from scheduler_service.config import SchedulerConfig
from scheduler_service.main import ROLES as SCHEDULER_ROLES
from scheduler_service.main import SERVICE as SCHEDULER_SERVICE
from scheduler_service.main import start_scheduler
from tests.support.gateway_stack import LoopThread
from worker_service.config import WorkerConfig
from worker_service.executors.registry import make_executor
from worker_service.main import run as run_worker
from worker_service.main import start_worker
from worker_service.server import ROLES as WORKER_ROLES
from worker_service.server import WORKER_SERVICE_NAME

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING


class Stack:
    """Redis, scheduler, worker and gateway, all with ``tls_dir``; ``foreign``: another CA's files."""

    def __init__(self, root: Path) -> None:
        self.tls, self.foreign = root / "tls", root / "foreign"
        make_certs(CertsRequest(self.tls, hosts=("127.0.0.1",)))
        make_certs(CertsRequest(self.foreign, hosts=("127.0.0.1",)))
        self.redis, redis_url = start_redis(workdir=root)
        self.loop = LoopThread()
        self.scheduler = self.loop.run(start_scheduler(SchedulerConfig(
            port=0, redis_url=redis_url, tls_dir=str(self.tls), heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0,
            grace_s=0.2, log_level="WARNING")))
        self.scheduler_address = f"127.0.0.1:{self.scheduler.port}"
        self.worker = self.loop.run(start_worker(self.worker_config("w-tls")))
        self.gateway = self.loop.run(start_gateway(GatewayConfig(
            scheduler_address=self.scheduler_address, host="127.0.0.1", grpc_port=0, http_port=0,
            tls_dir=str(self.tls), client_tls=True, health_check_interval_s=0.2, grace_s=0.2)))
        self.gateway_address = f"127.0.0.1:{self.gateway.grpc_port}"

    def worker_config(self, worker_id: str, **overrides: Any) -> WorkerConfig:
        fields = dict(scheduler=self.scheduler_address, port=0, worker_id=worker_id, time_scale=0.0, grace_s=0.2,
                      rpc_timeout_s=1.0, register_backoff_max_s=0.2, tls_dir=str(self.tls), log_level="WARNING")
        return WorkerConfig(**{**fields, **overrides})

    def files(self, role: str, foreign: bool = False) -> tuple[bytes, bytes]:
        d = self.foreign if foreign else self.tls
        return (d / f"{role}.key").read_bytes(), (d / f"{role}.crt").read_bytes()

    def channel(self, address: str, peer: str, role: str | None = None, foreign: bool = False) -> grpc.Channel:
        """A TLS channel that trusts the deployment's CA, presenting ``role``'s certificate (of the
        foreign CA with ``foreign``; none without ``role``)."""
        key, cert = self.files(role, foreign) if role else (None, None)
        creds = grpc.ssl_channel_credentials((self.tls / "ca.crt").read_bytes(), key, cert)
        return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", f"{peer}.accelgen")])

    def close(self) -> None:
        for stop in (self.gateway.stop, self.worker.stop, self.scheduler.stop):
            try:
                self.loop.run(stop())
            except Exception:
                pass
        self.loop.close()
        self.redis.stop()


def fingerprint(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def live_workers(stack: Stack) -> int:
    with stack.channel(stack.scheduler_address, "scheduler", "gateway") as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        return stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5).live_workers


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("tls"))
    try:
        wait_until(lambda: live_workers(s) == 1, "the worker to register over mTLS")
        yield s
    finally:
        s.close()


def test_a_stack_with_tls_serves_a_request(stack: Stack) -> None:
    req = gateway_pb2.GenerateRequest(tokenized=common_pb2.TokenizedInput(input_ids=[7] * 8),
                                      sampling_params=common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True),
                                      app_class="chat", stream=True)
    ca = (stack.tls / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(ca)  # client_tls: the gateway's certificate, no client certificate
    with grpc.secure_channel(stack.gateway_address, creds,
                             options=[("grpc.ssl_target_name_override", "gateway.accelgen")]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service="accelgen.v1.Gateway"),
                                        timeout=5).status == SERVING, "the gateway to be ready")
        tokens = [t for r in gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=30) if r.HasField("chunk")
                  for t in r.chunk.token_ids]
    assert len(tokens) == 4  # Submit and WatchMany over mTLS, plans to the worker over mTLS
    # client_tls: plaintext clients are refused on both front ends; HTTPS verifies against ca.crt.
    with grpc.insecure_channel(stack.gateway_address) as plain:
        err = refused(lambda: gateway_pb2_grpc.GatewayStub(plain).GetRequest(
            common_pb2.GetRequestRequest(request_id="x"), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    trust = ssl.create_default_context(cafile=str(stack.tls / "ca.crt"))  # and the IP in the certificate
    reply = httpx.get(f"https://127.0.0.1:{stack.gateway.http_port}/livez", verify=trust, timeout=5)
    assert reply.status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{stack.gateway.http_port}/livez", timeout=5)


@pytest.mark.parametrize("target", ["scheduler", "worker"])
def test_plaintext_and_foreign_ca_clients_are_refused(stack: Stack, target: str) -> None:
    address = stack.scheduler_address if target == "scheduler" else f"127.0.0.1:{stack.worker.port}"
    check = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(address) as plain:
        err = refused(lambda: health_pb2_grpc.HealthStub(plain).Check(check, timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: nothing is served
    # A certificate of another CA (the client trusts ours, so it is the server that says no) ...
    with stack.channel(address, target, "gateway", foreign=True) as ch:
        err = refused(lambda: health_pb2_grpc.HealthStub(ch).Check(check, timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # ... and no certificate at all.
    with stack.channel(address, target, None) as ch:
        err = refused(lambda: health_pb2_grpc.HealthStub(ch).Check(check, timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # Health is open to any certificate of the CA, whatever its role.
    with stack.channel(address, target, "worker") as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(check, timeout=5).status == SERVING


def test_a_rogue_worker_cannot_register(stack: Stack) -> None:
    request = scheduler_pb2.RegisterWorkerRequest(worker_id="rogue", address="127.0.0.1:1",
                                                  description=common_pb2.WorkerDescription())
    with grpc.insecure_channel(stack.scheduler_address) as plain:
        err = refused(lambda: scheduler_pb2_grpc.SchedulerStub(plain).RegisterWorker(request, timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    with stack.channel(stack.scheduler_address, "scheduler", "worker", foreign=True) as ch:
        err = refused(lambda: scheduler_pb2_grpc.SchedulerStub(ch).RegisterWorker(request, timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # A gateway's certificate is from the CA, but not a worker's.
    with stack.channel(stack.scheduler_address, "scheduler", "gateway") as ch:
        err = refused(lambda: scheduler_pb2_grpc.SchedulerStub(ch).RegisterWorker(request, timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "for the worker role" in err.details() and "worker.accelgen" in err.details()
    assert live_workers(stack) == 1


def test_a_worker_id_belongs_to_the_certificate_that_registered_it(stack: Stack, tmp_path: Path) -> None:
    """Both certificates are the CA's and for the worker role: the second may not take over,
    keep alive or drop the first's id, until the first has left; then it may, and the first may not."""
    other_dir = issue_certificate(stack.tls, "worker", f"other-{tmp_path.name}", hosts=("127.0.0.1",))
    other = fingerprint(other_dir / "worker.crt")
    workers = stack.scheduler.app.workers
    running = [stack.loop.run(start_worker(stack.worker_config("w-held")))]
    first = running[0]

    def record() -> Any:
        return stack.loop.run(stack.scheduler.app.store.live_worker_records()).get("w-held")

    def calls(stub: scheduler_pb2_grpc.SchedulerStub) -> dict[str, Callable[[], Any]]:
        description = worker_info_to_proto(first.servicer.info)
        return {
            "register": lambda: stub.RegisterWorker(scheduler_pb2.RegisterWorkerRequest(
                worker_id="w-held", address="127.0.0.1:1", description=description), timeout=5),
            "heartbeat": lambda: stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="w-held"), timeout=5),
            "deregister": lambda: stub.DeregisterWorker(scheduler_pb2.DeregisterWorkerRequest(worker_id="w-held"),
                                                        timeout=5),
        }

    def all_refused(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        for name, call in calls(stub).items():
            err = refused(call)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert "worker id w-held is registered with another certificate" in err.details(), name

    try:
        wait_until(lambda: record() is not None and "w-held" in workers.lanes, "w-held to register")
        lane = workers.lanes["w-held"]
        assert record().identity == fingerprint(stack.tls / "worker.crt") != other
        creds = grpc.ssl_channel_credentials((stack.tls / "ca.crt").read_bytes(),
                                             (other_dir / "worker.key").read_bytes(),
                                             (other_dir / "worker.crt").read_bytes())
        with grpc.secure_channel(stack.scheduler_address, creds,
                                 options=[("grpc.ssl_target_name_override", "scheduler.accelgen")]) as ch:
            all_refused(scheduler_pb2_grpc.SchedulerStub(ch))
        # The first worker keeps its lane (its requests, its epoch) and its record in Redis; its own
        # heartbeats go on being answered (a lost lane would make it register again).
        registrations = first.registration.num_registrations
        time.sleep(0.6)  # three of its heartbeats
        assert workers.lanes["w-held"] is lane and lane.address == first.address
        assert record().address == first.address and record().identity != other
        assert first.registration.num_registrations == registrations
        # Once it has left, the id is free: a worker with the other certificate takes it ...
        stack.loop.run(running.pop().stop())
        wait_until(lambda: "w-held" not in workers.lanes, "w-held to deregister")
        running.append(stack.loop.run(start_worker(stack.worker_config("w-held", tls_dir=str(other_dir)))))
        wait_until(lambda: record() is not None and record().identity == other and "w-held" in workers.lanes,
                   "the other certificate's worker to take w-held")
        assert workers.lanes["w-held"] is not lane
        # ... and now the first certificate is the one refused.
        with stack.channel(stack.scheduler_address, "scheduler", "worker") as ch:
            all_refused(scheduler_pb2_grpc.SchedulerStub(ch))
        stack.loop.run(running.pop().stop())
        wait_until(lambda: "w-held" not in workers.lanes and record() is None, "the second w-held to deregister")
    finally:
        for worker in running:
            stack.loop.run(worker.stop())


def test_roles_guard_each_method(stack: Stack) -> None:
    plan = worker_pb2.BatchPlan(iteration=1, epoch="rogue")
    worker_address = f"127.0.0.1:{stack.worker.port}"
    for role in ("worker", "gateway"):  # only the scheduler's certificate may send plans
        with stack.channel(worker_address, "worker", role) as ch:
            err = refused(lambda: worker_pb2_grpc.WorkerStub(ch).ExecuteIteration(plan, timeout=5))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "for the scheduler role" in err.details()
    with stack.channel(stack.scheduler_address, "scheduler", "worker") as ch:  # workers do not submit
        err = refused(lambda: scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(
            scheduler_pb2.GetServerInfoRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "for the gateway role" in err.details()
    # A client that meant to reach the scheduler refuses a server that is the worker.
    with stack.channel(worker_address, "scheduler", "gateway") as ch:
        err = refused(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # Every method of both services has a role (one left out would be refused to all).
    for service, roles in ((SCHEDULER_SERVICE, SCHEDULER_ROLES), (WORKER_SERVICE_NAME, WORKER_ROLES)):
        pb = scheduler_pb2 if service == SCHEDULER_SERVICE else worker_pb2
        methods = pb.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods
        assert set(roles) == {f"/{service}/{m.name}" for m in methods}


def test_a_second_worker_on_a_taken_port_does_not_start(stack: Stack) -> None:
    taken = free_port()

    async def scenario() -> None:
        # port_offset: the first listens on (taken - 1) + 1.
        first = await start_worker(stack.worker_config("w-port-a", port=taken - 1, port_offset=1))
        try:
            assert first.port == taken
            with pytest.raises(CannotListen, match=f"cannot listen on 127.0.0.1:{taken}"):
                await start_worker(stack.worker_config("w-port-b", port=taken))
            assert await run_worker(stack.worker_config("w-port-c", port=taken)) == 2  # the process exits 2
        finally:
            await first.stop()

    stack.loop.run(scenario(), timeout=60)


def test_plaintext_off_loopback_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.main import main as gateway_main
    from scheduler_service.main import main as scheduler_main
    from worker_service.main import main as worker_main

    fix = "set --tls-dir DIR (make one with `accelgen certs`) or --insecure"
    cases = [
        (scheduler_main, ["--host", "0.0.0.0"], "the scheduler binds 0.0.0.0 (host)"),
        (worker_main, ["--host", "10.1.2.3"], "the worker binds 10.1.2.3 (host)"),
        (worker_main, ["--host", "0.0.0.0", "--scheduler", "10.1.2.3:50051"], "the worker binds 0.0.0.0"),
        (gateway_main, ["--scheduler-address", "10.1.2.3:50051"], "the gateway dials 10.1.2.3 (scheduler_address)"),
    ]
    for main, argv, said in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert said in err and fix in err, err
    # Both, or a directory without the files: config errors too, before anything starts.
    with pytest.raises(SystemExit) as exit_:
        scheduler_main(["--tls-dir", str(tmp_path), "--insecure"])
    assert exit_.value.code == 2 and "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        worker_main(["--tls-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "cannot read ca.crt" in capsys.readouterr().err


def test_a_plaintext_scheduler_dials_only_loopback_workers(tmp_path: Path) -> None:
    """Without tls_dir a scheduler on loopback must not be told to send plans across the network."""
    proc, redis_url = start_redis(workdir=tmp_path)
    loop = LoopThread()
    try:
        handle = loop.run(start_scheduler(SchedulerConfig(port=0, redis_url=redis_url, grace_s=0.2,
                                                          log_level="WARNING")))
        try:
            description = worker_info_to_proto(make_executor("sim", profile=load_profile(), time_scale=0.0).describe())
            request = scheduler_pb2.RegisterWorkerRequest(worker_id="far", address="10.1.2.3:50061",
                                                          description=description)
            with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
                err = refused(lambda: scheduler_pb2_grpc.SchedulerStub(ch).RegisterWorker(request, timeout=5))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "--tls-dir" in err.details()
        finally:
            loop.run(handle.stop(0.2))
    finally:
        loop.close()
        proc.stop()
