"""Quarantine: a request record the scheduler cannot read is moved aside, not fatal.

One malformed record in ``live`` (a field missing, JSON that does not parse, a key of the wrong
type, an id that is not UTF-8) used to crash every start-up of the scheduler, so a restart loop
never recovered the other requests. ``load_live`` now hands such a record here: its keys are
renamed ``{prefix}quarantine:req:{id}`` (and ``out:``/``tim:``/``lp:``), it leaves ``live``, and its id
goes into the sorted set ``{prefix}quarantine`` (score: when), with one ``record_quarantined``
log line naming the id and the reason. An operator can inspect it with ``redis-cli`` and either
delete it or repair it and put it back (RENAME the keys back, ZADD ``live`` its arrival time).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
import structlog

log = structlog.get_logger("scheduler.store")


async def quarantine(redis: aioredis.Redis, prefix: str, member: bytes | str, reason: str) -> None:
    """Move one live request's keys aside and out of ``live``; log why."""
    raw = member.encode() if isinstance(member, str) else member
    rid = raw.decode("utf-8", errors="backslashreplace")
    keys = [f"{kind}:".encode() + raw for kind in ("req", "out", "tim", "lp")]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(prefix.encode() + key)
        present = await pipe.execute()
    async with redis.pipeline(transaction=True) as pipe:
        for key, there in zip(keys, present):
            if there:
                pipe.rename(prefix.encode() + key, prefix.encode() + b"quarantine:" + key)
        pipe.zrem(prefix + "live", raw)
        pipe.zadd(prefix + "quarantine", {raw: time.time()})
        await pipe.execute()
    log.error("record_quarantined", request=rid, reason=reason, moved_to=f"{prefix}quarantine:req:{rid}",
              set=f"{prefix}quarantine")
