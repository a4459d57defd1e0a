"""Which Redis failures are retried, what a client sees for each, and what the committer does with
a write that can never succeed (a store double: no Redis here)."""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any

import grpc
import pytest
import redis.exceptions as rx

from accelgen.core.request import RequestStatus
from scheduler_service.committer import Committer
from scheduler_service.errors import NOT_LEADER, status_of, store_unavailable
from scheduler_service.state.redis_conn import (DeadlineRetry, NotReplicated, is_transient, parse_sentinel_url,
                                                reply_code)
from scheduler_service.state.store import IterationChanges


class LeaseLost(Exception):
    """Stands in for store.LeaseLost: recognised by name."""


TRANSIENT = [rx.ConnectionError("Error 111 connecting"), rx.TimeoutError("Timeout reading"),
             rx.BusyLoadingError("Redis is loading the dataset in memory"),
             rx.ReadOnlyError("You can't write against a read only replica."), rx.TryAgainError("TRYAGAIN"),
             rx.MasterDownError("Link with MASTER is down"), rx.OutOfMemoryError("command not allowed when used memory"),
             rx.NoScriptError("No matching script"), rx.ResponseError("BUSY Redis is busy running a script"),
             rx.ResponseError("Command # 2 (EVALSHA abc) of pipeline caused error: BUSY Redis is busy"),
             ConnectionError("refused"), OSError("network is unreachable"), asyncio.TimeoutError()]
PERMANENT = [rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
             rx.ResponseError("Command # 1 (HSET k) of pipeline caused error: WRONGTYPE Operation against a key"),
             rx.NoPermissionError("this user has no permissions to run the 'eval' command"),
             rx.ResponseError("Error running script (call to f_1234): @user_script:1: oops"),
             rx.AuthenticationError("invalid password"), rx.DataError("Invalid input of type: 'dict'"),
             LeaseLost("lease held by other:7"), ValueError("a bug")]


@pytest.mark.parametrize("exc", TRANSIENT, ids=repr)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=repr)
def test_permanent_failures_are_not(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_reply_code_reads_through_the_pipeline_wrapping() -> None:
    assert reply_code(rx.ResponseError("Command # 3 (X) of pipeline caused error: WRONGTYPE bad")) == "WRONGTYPE"
    assert reply_code(rx.ResponseError("lowercase text")) == ""


def test_what_a_client_sees_for_each_kind_of_store_failure() -> None:
    down = store_unavailable(rx.ConnectionError("Connection refused"))
    assert down.code == grpc.StatusCode.UNAVAILABLE and "retry" in str(down)
    deposed = store_unavailable(LeaseLost("fenced"))
    assert deposed.code == grpc.StatusCode.UNAVAILABLE and str(deposed) == NOT_LEADER
    broken = store_unavailable(rx.ResponseError("WRONGTYPE Operation against a key"))
    assert broken.code == grpc.StatusCode.INTERNAL and "WRONGTYPE" in str(broken) and "not retryable" in str(broken)
    few = store_unavailable(NotReplicated(0, 1, 1000))
    assert few.code == grpc.StatusCode.UNAVAILABLE and "0 of 1 replica" in str(few) and "failover" in str(few)
    assert status_of(LeaseLost("x"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_of(rx.ResponseError("NOPERM no"))[0] == grpc.StatusCode.INTERNAL
    assert status_of(rx.TimeoutError("t"))[0] == grpc.StatusCode.UNAVAILABLE


def test_sentinel_urls() -> None:
    spec = parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380/mymaster/2?sentinel_password=s")
    assert spec["sentinels"] == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert (spec["service"], spec["db"], spec["password"], spec["sentinel_password"]) == ("mymaster", 2, "pw", "s")
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/svc", "redis+sentinel://h:1/svc/x",
                "redis://h:1/0"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)


def test_deadline_retry_outlasts_a_short_outage_and_gives_up_after_its_budget() -> None:
    async def scenario() -> None:
        calls: list[float] = []

        async def flaky(until: float) -> str:
            calls.append(time.monotonic())
            if time.monotonic() < until:
                raise rx.ConnectionError("refused")
            return "ok"

        async def nothing(*_: Any) -> None:
            pass

        retry = DeadlineRetry(retry_s=1.0)
        start = time.monotonic()
        assert await retry.call_with_retry(lambda: flaky(start + 0.4), nothing) == "ok"  # 3 retries were 0.35 s
        start = time.monotonic()
        with pytest.raises(rx.ConnectionError):
            await retry.call_with_retry(lambda: flaky(start + 60), nothing)
        assert 0.6 < time.monotonic() - start < 1.6
        with pytest.raises(rx.AuthenticationError):  # a wrong password is not retried
            await retry.call_with_retry(lambda: _raise(rx.AuthenticationError("invalid password")), nothing)

    asyncio.run(scenario())


async def _raise(exc: BaseException) -> None:
    raise exc


# -- the committer against a store double ----------------------------------------------------
class DoubleStore:
    """commit_iteration as Redis would do it, where ``bad`` requests' keys have the wrong type
    (a MULTI runs every other command: the others' tokens land), and ``fail_next`` raises once."""

    p = "t:"

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.tim: dict[str, bytes] = {}
        self.status: dict[str, RequestStatus] = {}
        self.bad: set[str] = set()
        self.fail_next: list[BaseException] = []
        self.land_then_fail = False
        self.writes = 0

    async def commit_iteration(self, ch: IterationChanges) -> None:
        self.writes += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        error = None
        for rid, (toks, times) in ch.tokens.items():
            if rid in self.bad:
                error = error or rx.ResponseError("Command # 1 (EVALSHA) of pipeline caused error: WRONGTYPE x")
                continue
            offset = ch.offsets.get(rid)
            if offset is not None and len(self.tokens.get(rid, [])) >= offset + len(toks):
                continue  # the script's idempotence: these tokens are already there
            self.tokens.setdefault(rid, []).extend(toks)
            self.tim[rid] = self.tim.get(rid, b"") + array("d", times).tobytes()
        for rid, (status, _) in ch.status.items():
            self.status[rid] = status
        if error is not None:
            raise error
        if self.land_then_fail:  # EXEC ran, the reply was lost
            self.land_then_fail = False
            raise rx.ConnectionError("Connection closed by server.")


def _iteration(step: int, *rids: str) -> IterationChanges:
    return IterationChanges(worker_id="w0", tokens={r: ([step], [1000.0 + step]) for r in rids},
                            status={r: (RequestStatus.RUNNING, "") for r in rids},
                            offsets={r: step - 1 for r in rids})


def _committer(store: DoubleStore) -> tuple[Committer, list[IterationChanges], list[str]]:
    delivered: list[IterationChanges] = []
    failed: list[str] = []
    committer = Committer(store, delivered.append)  # type: ignore[arg-type]
    committer.on_request_failed = lambda rid, _why: failed.append(rid)
    return committer, delivered, failed


def test_a_bad_key_fails_only_its_own_request() -> None:
    async def scenario() -> None:
        store = DoubleStore()
        store.bad = {"bad"}
        committer, delivered, failed = _committer(store)
        await committer.commit(_iteration(1, "a", "bad", "b"))
        # a and b were written once (no duplicate from the per-request retry), and delivered
        assert store.tokens == {"a": [1], "b": [1]}
        assert delivered[0].tokens.keys() == {"a", "b"} and "bad" in delivered[0].finished
        assert delivered[0].status["bad"][1] == "abort" and failed == ["bad"]
        writes = store.writes
        await committer.commit(_iteration(2, "a", "bad", "b"))  # later iterations skip the failed request
        assert store.writes == writes + 1 and store.tokens == {"a": [1, 2], "b": [1, 2]}
        assert "bad" not in delivered[1].tokens and "bad" not in delivered[1].finished

    asyncio.run(scenario())


def test_a_lost_lease_gives_up_without_delivering() -> None:
    async def scenario() -> None:
        store = DoubleStore()
        store.fail_next = [LeaseLost("someone else leads")]
        committer, delivered, _ = _committer(store)
        await committer.commit(_iteration(1, "a"))
        assert delivered == [] and committer.lease_lost
        assert await committer.write_durably(_iteration(2, "a")) is False
        assert store.writes == 1, "no write after the lease is lost"

    asyncio.run(scenario())


def test_transient_failures_are_retried_without_duplicating_tokens() -> None:
    async def scenario() -> None:
        store = DoubleStore()
        committer, delivered, _ = _committer(store)
        store.fail_next = [rx.ConnectionError("refused"), rx.BusyLoadingError("loading")]
        await committer.commit(_iteration(1, "a"))
        assert store.tokens == {"a": [1]} and len(delivered) == 1
        store.land_then_fail = True  # the write lands, its reply is lost: the retry must not append again
        await committer.commit(_iteration(2, "a"))
        assert store.tokens == {"a": [1, 2]} and delivered[1].tokens["a"] == ([2], [1002.0])

    asyncio.run(scenario())
