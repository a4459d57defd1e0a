"""WatchMany requests as a gateway sends them: never more ids in one message than a scheduler takes.

A scheduler refuses a ``WatchManyRequest`` carrying more than its ``watch_max_ids_per_message``
ids (INVALID_ARGUMENT, the whole stream), which may not be set below
``WATCH_IDS_PER_GATEWAY_MESSAGE``; a gateway re-watching thousands of requests after a restart
splits them with ``watch_messages`` so its stream is never refused.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from accelgen.v1 import scheduler_pb2

WATCH_IDS_PER_GATEWAY_MESSAGE = 256


def watch_messages(watch: Sequence[scheduler_pb2.WatchRequest], unwatch: Sequence[str], owner: str = "",
                   per_message: int = WATCH_IDS_PER_GATEWAY_MESSAGE) -> Iterator[scheduler_pb2.WatchManyRequest]:
    """``watch`` and ``unwatch`` as messages of at most ``per_message`` ids each (at least one
    message, even when both are empty: it carries the owner). Each id must appear once in all."""
    items: list[tuple[scheduler_pb2.WatchRequest | None, str]] = [(w, w.request_id) for w in watch]
    items += [(None, rid) for rid in unwatch]
    for start in range(0, max(1, len(items)), per_message):
        part = items[start:start + per_message]
        yield scheduler_pb2.WatchManyRequest(watch=[w for w, _ in part if w is not None],
                                             unwatch=[rid for w, rid in part if w is None], owner=owner)
