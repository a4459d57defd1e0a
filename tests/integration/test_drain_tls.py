"""DrainWorker under mutual TLS: a worker drains itself with its own certificate (SIGTERM), the
operator's tools drain any worker with the gateway role's certificate, and nothing else may."""

from __future__ import annotations

import signal

import grpc
import pytest

from accelgen.common.certs import issue_certificate
from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.integration.test_tls import Stack, refused, stack, wait_until  # noqa: F401 (a fixture)
from worker_service.main import start_worker

pytestmark = pytest.mark.integration


def _drain(stack: Stack, role: str, worker_id: str, tls_dir=None) -> scheduler_pb2.DrainWorkerResponse:  # noqa: F811
    if tls_dir is not None:  # another certificate of the role, from the same CA
        key, cert = (tls_dir / f"{role}.key").read_bytes(), (tls_dir / f"{role}.crt").read_bytes()
        creds = grpc.ssl_channel_credentials((stack.tls / "ca.crt").read_bytes(), key, cert)
        channel = grpc.secure_channel(stack.scheduler_address, creds,
                                      options=[("grpc.ssl_target_name_override", "scheduler.accelgen")])
    else:
        channel = stack.channel(stack.scheduler_address, "scheduler", role)
    with channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).DrainWorker(
            scheduler_pb2.DrainWorkerRequest(worker_id=worker_id, grace_s=30), timeout=5)


def test_who_may_drain_a_worker(stack: Stack, tmp_path) -> None:  # noqa: F811
    workers = stack.scheduler.app.workers
    own = stack.loop.run(start_worker(stack.worker_config("w-drain")))
    try:
        wait_until(lambda: "w-drain" in workers.lanes, "w-drain to register")
        other = issue_certificate(stack.tls, "worker", "other-node", hosts=("127.0.0.1",))
        err = refused(lambda: _drain(stack, "worker", "w-drain", tls_dir=other))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "another certificate" in err.details()
        err = refused(lambda: _drain(stack, "scheduler", "w-drain"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "for the worker or gateway role" in err.details()
        assert not workers.drain_state("w-drain").draining
        # SIGTERM: the worker asks with its own certificate, has nothing left, deregisters, exits 0.
        stack.loop.loop.call_soon_threadsafe(own.signal_received, signal.SIGTERM)
        stack.loop.run(own.wait(), timeout=30)
        assert own.exit_code == 0 and own.registration.drained.is_set()
        wait_until(lambda: "w-drain" not in workers.lanes, "w-drain to leave")
    finally:
        stack.loop.run(own.stop())

    remote = stack.loop.run(start_worker(stack.worker_config("w-drain-2")))
    try:
        wait_until(lambda: "w-drain-2" in workers.lanes, "w-drain-2 to register")
        reply = _drain(stack, "gateway", "w-drain-2")  # the operator's role may drain any worker
        assert reply.draining and reply.assigned == 0
        stack.loop.run(remote.wait(), timeout=30)  # it hears of it in a heartbeat answer and leaves
        assert remote.exit_code == 0 and remote.registration.draining.is_set()
        wait_until(lambda: "w-drain-2" not in workers.lanes, "w-drain-2 to leave")
    finally:
        stack.loop.run(remote.stop())
