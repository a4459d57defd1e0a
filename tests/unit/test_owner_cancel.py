"""The scheduler's owner book: which gateway's requests are cancelled when it is gone (no I/O:
the sweep's decisions, ``OwnerBook.due``, on hand-made channels)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from scheduler_service.owners import OwnerBook

pytestmark = pytest.mark.unit


@dataclass(eq=False)
class Channel:
    finished: bool = False
    watchers: set[Any] = field(default_factory=set)


@dataclass(eq=False)
class Session:
    owner: str


def book(*rids: str, after_s: float = 10.0) -> OwnerBook:
    b = OwnerBook(store=None, channels={rid: Channel() for rid in rids})  # type: ignore[arg-type]
    b.cancel_after_s, b.enabled = after_s, True
    return b


def test_an_owner_gone_long_enough_loses_its_unwatched_requests() -> None:
    b = book("a", "b", "c")
    for rid in ("a", "b"):
        b.submitted(rid, "gw1")
    b.submitted("c", "gw2")
    b.stream_opened("gw1")
    b.stream_opened("gw2")
    b.stream_closed("gw1")
    since = b.gone_since["gw1"]
    assert b.due(since + 9.9) == []  # not yet
    [(owner, cancel, moved)] = b.due(since + 10)
    assert owner == "gw1" and sorted(cancel) == ["a", "b"] and moved == 0  # gw2's request is not touched


def test_an_owner_with_a_stream_open_is_never_due() -> None:
    b = book("a")
    b.submitted("a", "gw1")
    b.stream_opened("gw1")
    b.stream_opened("gw1")
    b.stream_closed("gw1")  # one of two streams: still there
    assert b.due(1e12) == []


def test_a_request_watched_by_another_gateway_moves_to_it() -> None:
    b = book("a", "b")
    b.submitted("a", "gw1")
    b.submitted("b", "gw1")
    b.stream_opened("gw2")
    b.watched_by("a", "gw2")  # re-attached through gw2
    assert b.owner_of["a"] == "gw2"
    b.stream_opened("gw1")
    b.stream_closed("gw1")
    [(owner, cancel, _)] = b.due(1e12)
    assert owner == "gw1" and cancel == ["b"]


def test_a_watched_request_of_a_gone_owner_moves_instead_of_being_cancelled() -> None:
    b = book("a")
    b.submitted("a", "gw1")
    b.channels["a"].watchers.add(Session("gw2"))  # gw2 watches it (a second watcher)
    b.stream_opened("gw1")
    b.stream_closed("gw1")
    [(owner, cancel, moved)] = b.due(1e12)
    assert cancel == [] and moved == 1 and b.owner_of["a"] == "gw2"
    assert "gw1" not in b.gone_since


def test_ownerless_requests_and_finished_ones_are_never_cancelled() -> None:
    b = book("a", "b")
    b.submitted("a", "")  # a direct client of the scheduler
    b.submitted("b", "gw1")
    b.channels["b"].finished = True
    b.stream_opened("gw1")
    b.stream_closed("gw1")
    assert all(cancel == [] for _, cancel, _ in b.due(1e12))
    assert "a" not in b.owner_of and "b" not in b.owner_of


def test_a_request_watched_only_by_an_ownerless_stream_stays_and_is_looked_at_again() -> None:
    b = book("a")
    b.submitted("a", "gw1")
    b.channels["a"].watchers.add(Session(""))
    b.stream_opened("gw1")
    b.stream_closed("gw1")
    assert b.due(1e12) == [("gw1", [], 0)]
    b.channels["a"].watchers.clear()
    assert b.due(1e12) == [("gw1", ["a"], 0)]


def test_a_submit_renews_the_grace_period() -> None:
    b = book("a", "b")
    b.submitted("a", "gw1")
    first = b.gone_since["gw1"]
    b.submitted("b", "gw1")  # the gateway is alive: it submits, its stream opens right after
    assert b.gone_since["gw1"] >= first
    assert b.due(first + 5) == []


def test_disabled_tracks_nothing() -> None:
    b = book("a", after_s=0)
    b.enabled = False
    b.submitted("a", "gw1")
    assert b.owner_of == {} and b.due(1e12) == []
