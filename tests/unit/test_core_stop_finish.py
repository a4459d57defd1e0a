"""``SchedulerCore.finish_stopped``: a request a gateway found a stop string in ends as vLLM ends
it, finished with reason "stop" and its output cut at the token that completed the string, even
with later tokens sampled meanwhile or pending in plans in flight (never delivered)."""

from __future__ import annotations

import pytest

from accelgen.core.request import PENDING_TOKEN, FinishReason, RequestStatus
from tests.unit.test_core_pipelining import Driver, make_core, req
from worker_service.executors.sim import sim_token

pytestmark = pytest.mark.unit


def test_finish_stopped_cuts_the_output_and_finishes_as_stop() -> None:
    core = make_core()
    victim, other = req("s", 20, 100), req("o", 20, 30)
    core.add_request(victim)
    core.add_request(other)
    driver = Driver(core, depth=1)
    for _ in range(8):
        driver.cycle()
    produced = list(driver.run.tokens["s"])
    assert len(produced) >= 5
    assert core.finish_stopped("s", 3, driver.now)
    assert victim.status is RequestStatus.FINISHED and victim.finish_reason is FinishReason.STOP
    assert victim.output_token_ids == produced[:3] and victim.finish_s == driver.now
    assert core.kv.num_blocks_of("s") == 0 and core.has_ids_to_free
    assert not core.finish_stopped("s", 3, driver.now)  # done: a second one changes nothing
    run = driver.drain()
    assert run.tokens["s"] == produced and "s" not in run.reasons  # nothing more was delivered
    assert "s" not in driver.worker.requests
    assert run.tokens["o"] == [sim_token("o", i) for i in range(30)]


def test_finish_stopped_with_plans_in_flight_drops_their_tokens() -> None:
    core = make_core()
    victim = req("s", 20, 100)
    core.add_request(victim)
    core.add_request(req("o", 20, 30))
    driver = Driver(core, depth=2)
    for _ in range(5):
        driver.cycle()
    while driver.send():
        pass
    assert victim.num_pending_outputs == 2
    delivered = list(driver.run.tokens["s"])
    assert core.finish_stopped("s", len(delivered) - 1, driver.now)
    assert victim.output_token_ids == delivered[:-1] and PENDING_TOKEN not in victim.output_token_ids
    assert victim.num_pending_outputs == 0
    run = driver.drain()
    assert run.tokens["s"] == delivered  # the two results in flight are dropped


def test_finish_stopped_refuses_more_than_the_known_outputs() -> None:
    core = make_core()
    core.add_request(req("s", 20, 100))
    driver = Driver(core, depth=2)
    for _ in range(3):
        driver.cycle()
    while driver.send():
        pass
    known = core.requests["s"].num_known_outputs
    with pytest.raises(ValueError):
        core.finish_stopped("s", known + 1, driver.now)  # a pending token is not known yet
    assert core.requests["s"].status is RequestStatus.RUNNING  # nothing changed
    assert not core.finish_stopped("nobody", 0, driver.now)
