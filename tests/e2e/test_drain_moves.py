"""A drain moves the requests its worker has not started, on the whole stack as processes (sim
workers): with the scheduler running two requests at a time per worker, a worker drained by
SIGTERM keeps only the two it started; the ones waiting behind them go to the other worker at once
(``drain_moved``), nothing is recomputed (``worker_dropped`` re-queues none), and every request
finishes. Its own stack: ``--max-num-seqs 2`` would slow the other drain tests."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
from pathlib import Path

import pytest

from launcher.stack import start_stack
from tests.e2e.test_stack_e2e import FAST, server_info, wait_until
from tests.e2e.test_worker_drain import SCHED, drain_query, events, one, start_load

pytestmark = pytest.mark.e2e

TOKENS = 300  # output tokens: the drain starts while the first two on each worker run


def test_a_drain_sends_what_its_worker_has_not_started_to_the_other_worker(tmp_path: Path) -> None:
    stack = start_stack(workers=2, executor="sim", worker_args=FAST + ["--log-level", "INFO"],
                        scheduler_args=[*SCHED, "--max-num-seqs", "2"], gateway_args=["--log-level", "WARNING"],
                        log_dir=tmp_path)
    try:
        worker = stack.find("worker-1")
        with cf.ThreadPoolExecutor(max_workers=16) as pool:
            load = start_load(pool, stack, 12, TOKENS)  # 6 a worker: 2 running, 4 waiting
            wait_until(lambda: server_info(stack.scheduler_address).queued_requests >= 12, "the load to be queued")
            os.kill(worker.popen.pid, signal.SIGTERM)
            wait_until(lambda: (q := drain_query(stack, "worker-1")) is None or q.draining, "the drain to start")
            results = [f.result(timeout=240) for f in load]
        assert [len(tokens) for tokens, _ in results] == [TOKENS] * 12
        assert worker.popen.wait(timeout=60) == 0
        draining = one(stack, "worker_draining", "worker-1")
        moved = one(stack, "drain_moved", "worker-1")
        assert moved["moved"] > 0 and moved["moved"] + moved["assigned"] == draining["assigned"]
        assert moved["assigned"] <= 2  # what it had started is all it ran after the drain began
        dropped = one(stack, "worker_dropped", "worker-1")
        assert dropped["reason"] == "deregistered" and dropped["requeued"] == 0  # nothing recomputed
        assert any(e.get("event") == "drained" for e in events(stack, "worker-1"))
    finally:
        stack.stop()
