"""Taking a worker out of service under load, on the whole stack as processes (sim workers).

A worker drained by SIGTERM or by ``accelgen drain`` gets no new request from the moment the drain
starts, finishes the ones it has (nothing recomputed: the scheduler re-queues none when it leaves),
deregisters and exits 0; one whose grace period ends first has the rest handed to another worker,
and they still finish. What was routed where is read from the scheduler's log (``submitted``
names the worker; ``worker_dropped`` counts the requests re-queued).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc
from launcher.stack import Stack, start_stack, start_worker_proc
from tests.e2e.test_stack_e2e import FAST, generate, server_info, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCHED = ["--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "2", "--lease-ttl-s", "2", "--log-level", "INFO"]
WORKER = ["--executor", "sim", *FAST, "--log-level", "INFO"]
LONG = 600  # output tokens: the drain starts while these run


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = start_stack(workers=2, executor="sim", worker_args=FAST + ["--log-level", "INFO"], scheduler_args=SCHED,
                    gateway_args=["--log-level", "WARNING"], log_dir=tmp_path_factory.mktemp("drain"))
    yield s
    s.stop()


def events(stack: Stack, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of process ``name``, in order."""
    assert stack.log_dir is not None
    out = []
    for line in (stack.log_dir / f"{name}.log").read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def drain_query(stack: Stack, worker: str) -> scheduler_pb2.DrainWorkerResponse | None:
    """The scheduler's view of ``worker``'s drain; None once it is not registered."""
    with grpc.insecure_channel(stack.scheduler_address) as ch:
        try:
            return scheduler_pb2_grpc.SchedulerStub(ch).DrainWorker(
                scheduler_pb2.DrainWorkerRequest(worker_id=worker, query=True), timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            return None


def add_worker(stack: Stack, name: str) -> None:
    before = server_info(stack.scheduler_address).live_workers
    stack.procs.append(start_worker_proc(stack, name, WORKER))
    wait_until(lambda: server_info(stack.scheduler_address).live_workers == before + 1, f"{name} to register")


def start_load(pool: cf.Executor, stack: Stack, n: int, tokens: int) -> list[cf.Future]:
    return [pool.submit(generate, stack.gateway_address, tokens, 20 + i, timeout=240) for i in range(n)]


def routed_to(stack: Stack, worker: str, after: dict[str, Any]) -> int:
    """Requests the scheduler routed to ``worker`` after the log line ``after``."""
    log = events(stack, "scheduler")
    return sum(1 for e in log[log.index(after) + 1:] if e.get("event") == "submitted" and e.get("worker") == worker)


def one(stack: Stack, event: str, worker: str) -> dict[str, Any]:
    found = [e for e in events(stack, "scheduler") if e.get("event") == event and e.get("worker") == worker]
    assert len(found) == 1, (event, worker, found)
    return found[0]


def test_sigterm_drains_the_worker_without_recomputing_anything(stack: Stack) -> None:
    worker = stack.find("worker-1")
    with cf.ThreadPoolExecutor(max_workers=24) as pool:
        first = start_load(pool, stack, 12, LONG)
        wait_until(lambda: server_info(stack.scheduler_address).queued_requests >= 12, "the load to be running")
        os.kill(worker.popen.pid, signal.SIGTERM)
        wait_until(lambda: (q := drain_query(stack, "worker-1")) is None or q.draining, "the drain to start")
        draining = one(stack, "worker_draining", "worker-1")
        assert draining["assigned"] > 0, "the drain must start while the worker has requests"
        second = start_load(pool, stack, 8, 40)  # arrive during the drain: all go to worker-0
        results = [f.result(timeout=240) for f in first + second]
    assert [len(tokens) for tokens, _ in results] == [LONG] * 12 + [40] * 8
    assert worker.popen.wait(timeout=60) == 0
    assert routed_to(stack, "worker-1", draining) == 0
    assert routed_to(stack, "worker-0", draining) >= 8
    dropped = one(stack, "worker_dropped", "worker-1")
    assert dropped["reason"] == "deregistered" and dropped["requeued"] == 0  # nothing recomputed elsewhere
    assert any(e.get("event") == "drained" for e in events(stack, "worker-1"))
    assert server_info(stack.scheduler_address).live_workers == 1


def accelgen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_accelgen_drain_takes_a_worker_out_remotely(stack: Stack) -> None:
    add_worker(stack, "worker-2")
    worker = stack.find("worker-2")
    with cf.ThreadPoolExecutor(max_workers=24) as pool:
        load = start_load(pool, stack, 12, 3 * LONG)  # still running once the command has started
        wait_until(lambda: server_info(stack.scheduler_address).queued_requests >= 12, "the load to be running")
        drain = accelgen("drain", "worker-2", "--scheduler", stack.scheduler_address, "--grace", "120", "--wait")
        out, err = drain.communicate(timeout=180)
        assert drain.returncode == 0, err
        results = [f.result(timeout=240) for f in load]
    assert [len(tokens) for tokens, _ in results] == [3 * LONG] * 12
    assert "is draining" in out and "drained and left" in out, out
    assert worker.popen.wait(timeout=60) == 0
    draining = one(stack, "worker_draining", "worker-2")
    assert draining["assigned"] > 0
    assert routed_to(stack, "worker-2", draining) == 0
    dropped = one(stack, "worker_dropped", "worker-2")
    assert dropped["reason"] == "deregistered" and dropped["requeued"] == 0


def test_what_is_left_at_the_end_of_the_grace_period_is_handed_over(stack: Stack) -> None:
    add_worker(stack, "worker-3")
    worker = stack.find("worker-3")
    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        load = start_load(pool, stack, 12, 3 * LONG)
        wait_until(lambda: server_info(stack.scheduler_address).queued_requests >= 12, "the load to be running")
        drain = accelgen("drain", "worker-3", "--scheduler", stack.scheduler_address, "--grace", "0.5")
        assert drain.wait(timeout=60) == 0, drain.stderr.read() if drain.stderr else ""
        results = [f.result(timeout=300) for f in load]
    assert [len(tokens) for tokens, _ in results] == [3 * LONG] * 12  # handed over, recomputed, complete
    assert worker.popen.wait(timeout=60) == 0
    one(stack, "drain_grace_ended", "worker-3")
    assert one(stack, "worker_dropped", "worker-3")["requeued"] > 0


def test_draining_an_unknown_worker_is_one_line(stack: Stack) -> None:
    drain = accelgen("drain", "no-such-worker", "--scheduler", stack.scheduler_address)
    out, err = drain.communicate(timeout=60)
    assert drain.returncode == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("accelgen drain: error: NOT_FOUND") and "no-such-worker" in err


def test_a_second_sigterm_stops_the_draining_worker_at_once(stack: Stack) -> None:
    add_worker(stack, "worker-4")
    worker = stack.find("worker-4")
    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        load = start_load(pool, stack, 12, 3 * LONG)
        wait_until(lambda: server_info(stack.scheduler_address).queued_requests >= 12, "the load to be running")
        os.kill(worker.popen.pid, signal.SIGTERM)  # drains, for up to the default 30 s
        wait_until(lambda: (q := drain_query(stack, "worker-4")) is None or q.draining, "the drain to start")
        os.kill(worker.popen.pid, signal.SIGTERM)  # ... but not this time
        assert worker.popen.wait(timeout=20) == 0
        results = [f.result(timeout=300) for f in load]
    assert [len(tokens) for tokens, _ in results] == [3 * LONG] * 12
    assert any(e.get("event") == "drain_interrupted" for e in events(stack, "worker-4"))
