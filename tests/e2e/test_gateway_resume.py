"""A gateway killed with kill -9 mid-stream: its clients resume through another gateway (Attach,
tokens exactly once from their index), and the scheduler cancels the requests nobody resumed
once the dead gateway has been gone ``owner_gone_cancel_s``.

Real processes: redis-server, scheduler, one sim worker, two gateways.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from accelgen.common.grpc_server import free_port
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from launcher.stack import Proc, Stack, python_module, spawn, start_stack, wait_healthy

pytestmark = pytest.mark.e2e

GONE_S = 2.0


def start_gateway(stack: Stack, name: str) -> tuple[Proc, str]:
    port = free_port()
    proc = spawn(name, python_module("gateway.main", "--scheduler-address", stack.scheduler_address, "--host",
                                     "127.0.0.1", "--grpc-port", str(port), "--http-port", "-1", "--instance-id",
                                     name, "--log-level", "INFO"), stack.log_dir)
    wait_healthy(f"127.0.0.1:{port}", "accelgen.v1.Gateway", timeout_s=30, proc=proc)
    return proc, f"127.0.0.1:{port}"


def state(stack: Stack, rid: str) -> common_pb2.RequestState:
    with grpc.insecure_channel(stack.scheduler_address) as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetRequest(common_pb2.GetRequestRequest(request_id=rid),
                                                               timeout=5)


def wait_until(predicate, what: str, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


class Reader(threading.Thread):
    """Streams one request through a gateway, keeping every token id it got until the stream ends,
    and the request id the gateway made for it (``rid`` is only the client's label)."""

    def __init__(self, address: str, rid: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.address, self.rid, self.max_tokens = address, rid, max_tokens
        self.request_id = ""
        self.tokens: list[int] = []
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            req = gateway_pb2.GenerateRequest(
                request_id=self.rid, tokenized=common_pb2.TokenizedInput(input_ids=[7] * 16), stream=True,
                sampling_params=common_pb2.SamplingParams(max_new_tokens=self.max_tokens, ignore_eos=True))
            try:
                for resp in gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=120):
                    self.request_id = resp.request_id
                    self.tokens.extend(resp.chunk.token_ids)
            except grpc.RpcError as exc:
                self.error = exc


@pytest.fixture
def stack(tmp_path: Path):
    s = start_stack(workers=1, executor="sim", worker_args=["--time-scale", "0.2", "--log-level", "WARNING"],
                    scheduler_args=["--owner-gone-cancel-s", str(GONE_S), "--log-level", "INFO"],
                    gateway_args=["--log-level", "WARNING"], log_dir=tmp_path)
    yield s
    s.stop()


def test_a_killed_gateways_clients_resume_elsewhere_and_the_rest_is_cancelled(stack: Stack) -> None:
    g1, g1_address = start_gateway(stack, "gw-1")
    g2, g2_address = start_gateway(stack, "gw-2")
    stack.procs += [g1, g2]
    abandoned, resumed = Reader(g1_address, "abandoned", 1900), Reader(g1_address, "resumed", 1200)
    abandoned.start()
    resumed.start()
    wait_until(lambda: len(abandoned.tokens) > 30 and len(resumed.tokens) > 30, "tokens through gw-1")

    g1.kill()  # kill -9: no clean shutdown, no cancel, its streams just stop
    killed_at = time.monotonic()
    abandoned.join(10)
    resumed.join(10)
    assert abandoned.error is not None and resumed.error is not None
    have = len(resumed.tokens)
    resumed_id, abandoned_id = resumed.request_id, abandoned.request_id
    assert state(stack, resumed_id).label == "resumed"

    # The client resumes through gw-2 from what it has: every token once, in order.
    with grpc.insecure_channel(g2_address) as ch:
        out = list(gateway_pb2_grpc.GatewayStub(ch).Attach(
            gateway_pb2.AttachRequest(request_id=resumed_id, from_token_index=have), timeout=60))
        # Its gateway is gone, but not long enough yet: the other request still runs.
        if time.monotonic() - killed_at < GONE_S:
            assert state(stack, abandoned_id).status in ("running", "waiting")
    rest = [t for r in out if r.WhichOneof("response") == "chunk" for t in r.chunk.token_ids]
    final = state(stack, resumed_id)
    assert final.status == "finished" and len(final.output_ids) == 1200
    assert resumed.tokens + rest == list(final.output_ids)
    assert out[-1].complete.completion_tokens == 1200 and list(out[-1].complete.output_ids) == list(final.output_ids)

    # The request nobody resumed is cancelled once gw-1 has been gone GONE_S (durably: in Redis).
    wait_until(lambda: state(stack, abandoned_id).status == "cancelled", "the abandoned request cancelled")
    assert time.monotonic() - killed_at >= GONE_S
    gone = state(stack, abandoned_id)
    assert gone.finish_reason == "abort" and len(gone.output_ids) < 1900
    log = stack.find("scheduler").log_path.read_text()
    assert '"owner_gone"' in log and '"owner": "gw-1"' in log

    # gw-2 serves on, and a scheduler that is asked directly still answers about both.
    with grpc.insecure_channel(stack.scheduler_address) as ch:
        info = scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
    assert info.queued_requests == 0
