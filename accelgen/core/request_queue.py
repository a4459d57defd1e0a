"""Waiting-request queues behind one small interface, so each policy supplies only its order.

Keys are fixed when a request enters the queue, which keeps every operation O(log n): a policy
whose priority changes with time must express it as a key that does not (for example an
absolute deadline rather than time left).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

from sortedcontainers import SortedKeyList

from accelgen.core.request import Request

QueueKey = Callable[[Request, bool], Any]
"""``key(request, preempted)``: smaller runs first. Ties are broken by insertion order."""


class RequestQueue:
    """A priority-ordered set of waiting requests with O(log n) add and remove."""

    def __init__(self, key: QueueKey) -> None:
        self._key = key
        self._seq = itertools.count()
        self._entries: SortedKeyList = SortedKeyList(key=lambda e: (e[0], e[1]))
        self._by_id: dict[str, tuple[Any, int, Request]] = {}

    def add(self, request: Request, preempted: bool = False) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"request {request.request_id!r} is already queued")
        entry = (self._key(request, preempted), next(self._seq), request)
        self._entries.add(entry)
        self._by_id[request.request_id] = entry

    def remove(self, request_id: str) -> Request | None:
        entry = self._by_id.pop(request_id, None)
        if entry is None:
            return None
        self._entries.remove(entry)
        return entry[2]

    def rekey(self, request: Request, preempted: bool = False) -> None:
        """Recompute a queued request's key (a policy changed its mind about it)."""
        if self.remove(request.request_id) is not None:
            self.add(request, preempted)

    def key_of(self, request_id: str) -> Any:
        """The key a queued request is ordered by."""
        return self._by_id[request_id][0]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Request]:
        """Requests in priority order. Do not add or remove while iterating."""
        return (e[2] for e in self._entries)

    def head(self, n: int) -> list[Request]:
        return [e[2] for e in self._entries.islice(0, n)]


def fcfs_key(request: Request, preempted: bool) -> tuple[int, float]:
    """vLLM's FCFS: preempted requests go back to the front, others by arrival."""
    return (0 if preempted else 1, request.arrival_s)
