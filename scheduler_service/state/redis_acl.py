"""The Redis ACL user a scheduler needs, as rules for ``ACL SETUSER`` / a ``user`` line.

Why an ACL user and not ``requirepass``: a password alone lets whoever has it run every command —
``FLUSHALL``, ``CONFIG SET``, ``REPLICAOF``, ``MODULE LOAD``, read another deployment's keys. The
scheduler's user may touch only keys under its prefix (``~accelgen:*``) and run only the kinds of
command its store uses:

- data: strings, hashes and sorted sets, and the keyspace commands on them (DEL, EXISTS, RENAME,
  EXPIRE, PEXPIRE), ``MULTI``/``EXEC``, and ``TIME`` (the lease script reads Redis's clock);
- its Lua scripts: ``EVALSHA``, ``EVAL`` and ``SCRIPT LOAD``/``SCRIPT EXISTS`` (redis-py loads a
  script when Redis answers NOSCRIPT, e.g. after a restart). Redis checks a script's keys and
  commands against the same ACL, so a script cannot leave the prefix either;
- ``WAIT`` (``redis_min_replicas``), ``INFO`` (the ``durability`` line and replica count), ``PING``
  (connection health checks), ``SELECT`` (a ``/DB`` other than 0).

Everything ``@dangerous`` is refused (KEYS, FLUSHALL, CONFIG, DEBUG, ACL, SHUTDOWN, REPLICAOF,
MIGRATE, RESTORE, SORT, ...), and ``SCAN``/``RANDOMKEY``, which would list other prefixes' key
names. ``CONFIG GET`` is left out on purpose: it would also reveal ``masterauth`` (the replication
password); the durability report falls back to ``INFO persistence`` without it. No Pub/Sub
channels (``resetchannels``). ``AUTH``/``HELLO`` need no rule. On Redis 7.2+ redis-py also sends
``CLIENT SETINFO`` on connect and ignores its refusal; add ``+client|setinfo`` there to keep it out
of ``ACL LOG`` (Redis 7.0 does not know it and would refuse the whole rule). ``deploy/users.acl``
holds the same rules (a test compares them); tests/integration/test_redis_acl.py runs every kind
of store call under them.
"""

from __future__ import annotations

from typing import Sequence

SCHEDULER_USER = "accelgen"

# Order matters: later rules override earlier ones (``-@dangerous`` after the categories it trims).
SCHEDULER_COMMANDS: tuple[str, ...] = (
    "-@all", "+@string", "+@hash", "+@sortedset", "+@keyspace", "+@transaction", "-@dangerous",
    "+time", "+evalsha", "+eval", "+script|load", "+script|exists", "+wait", "+info", "+ping", "+select",
    "-scan", "-randomkey", "-move", "-copy",  # MOVE/COPY ... DB n: nothing leaves this database
)


def scheduler_rules(prefix: str) -> str:
    """The key pattern and command rules of a scheduler using ``redis_prefix = prefix`` (no
    password, no on/off): ``resetkeys ~accelgen:* resetchannels -@all +@string ...``."""
    if not prefix or any(c in prefix for c in " *?[]\\"):
        raise ValueError(f"a Redis key prefix for an ACL pattern must be non-empty, without spaces or glob "
                         f"characters (* ? [ ] \\), got {prefix!r}")
    return " ".join(("resetkeys", f"~{prefix}*", "resetchannels", *SCHEDULER_COMMANDS))


def user_line(passwords: Sequence[str], prefix: str | None, user: str = SCHEDULER_USER) -> str:
    """A ``user`` directive for redis.conf / an ACL file: the scheduler's rules for ``prefix``, or
    every key and command when ``prefix`` is None (tests and benchmarks that use many prefixes and
    inspect Redis: still behind a password). Passwords must not contain spaces."""
    if not passwords or any(not p or any(c.isspace() for c in p) for p in passwords):
        raise ValueError("a Redis ACL user needs at least one password, without whitespace")
    rules = scheduler_rules(prefix) if prefix is not None else "resetkeys ~* resetchannels &* +@all"
    return " ".join(("user", user, "reset", "on", *(f">{p}" for p in passwords), rules))
