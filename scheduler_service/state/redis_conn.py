"""Connections to Redis, and which of its failures are worth retrying.

``connect(url)`` gives a ``redis.asyncio.Redis`` for ``redis://``, ``rediss://``, ``unix://`` and a
Sentinel URL ``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE_NAME[/DB]``; every kind
gets the same pool (blocking: a burst beyond ``max_connections`` waits for a connection instead of
failing) and the same retry policy.

**Why a deadline, not a count.** After a Redis restart or a failover every pooled connection is
dead, and for a while Redis refuses connections, answers ``LOADING`` (replaying its AOF) or, on a
demoted master, ``READONLY``. redis-py retries a command on a fresh connection; with a fixed count
(it was 3 retries, about 0.35 s) a command sent in the first second of a restart failed although
Redis was back a moment later, and ``READONLY`` / ``MASTERDOWN`` / ``TRYAGAIN`` were not retried at
all. Here every such failure is retried with backoff until ``retry_s`` has passed since the first
attempt of the command (nested retries — connect, health-check PING, the command — share that one
deadline), so a restart or failover shorter than ``retry_s`` is a pause, not an error.

**Sentinel.** redis-py re-resolves the master only when a connection is taken from the pool; a
retry inside one command reconnected to the old address (the dead or demoted master) until it
gave up. ``_MasterConnection`` asks the sentinels for the master on every (re)connect, so a retry
lands on the new master.

``is_transient`` is the one classification the committer, the Submit path and the error mapping
use: worth retrying (the server is restarting, failing over, loading, out of memory for now) or
permanent (a wrong-typed key, a script error, a permission, ``LeaseLost``).
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rx
import structlog
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff

T = TypeVar("T")
log = structlog.get_logger("scheduler.redis")

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_RETRY_S = 2.0

# Retried by the connection itself, on a fresh connection. BusyLoadingError (LOADING) is a
# ConnectionError; READONLY from a Sentinel-managed connection is turned into one by redis-py.
_RETRY_ON: tuple[type[Exception], ...] = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError,
                                          rx.TryAgainError, rx.MasterDownError)
# ConnectionErrors that no retry fixes: the configuration is wrong.
_PERMANENT_CONNECTION_ERRORS: tuple[type[Exception], ...] = (rx.AuthenticationError, rx.AuthorizationError)
# Error replies that mean "not now": the first word of the reply.
_TRANSIENT_REPLIES = frozenset({"LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "OOM", "NOSCRIPT", "BUSY",
                                "CLUSTERDOWN", "NOREPLICAS"})
_REPLY_CODE = re.compile(r"([A-Z]{2,})\b")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("redis_retry_deadline", default=None)


class NotReplicated(Exception):
    """Fewer replicas than ``redis_min_replicas`` confirmed a write in time."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(f"the write reached the Redis master but only {acked} of {wanted} replica(s) "
                         f"confirmed it within {timeout_ms} ms, so it might not survive a failover; a Submit is "
                         f"not accepted (retry), an iteration's tokens wait")
        self.acked, self.wanted = acked, wanted


def is_lease_lost(exc: BaseException) -> bool:
    """The scheduler's fencing check failed (``store.LeaseLost``), by name: no import cycle."""
    return any(cls.__name__ == "LeaseLost" for cls in type(exc).__mro__)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same write later may succeed: the connection failed or timed out,
    or Redis answered that it is loading, read-only (a failover), without a master, out of memory,
    busy, or lost its script cache (a restart). False for everything else: ``LeaseLost``, a wrong
    password, WRONGTYPE, NOPERM, a script's own error, a bug in the caller."""
    if is_lease_lost(exc):
        return False
    if isinstance(exc, _PERMANENT_CONNECTION_ERRORS):
        return False
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, rx.WatchError, ConnectionError, TimeoutError,
                        asyncio.TimeoutError, OSError)):
        return True
    if isinstance(exc, (rx.ReadOnlyError, rx.TryAgainError, rx.ClusterDownError, rx.OutOfMemoryError,
                        rx.NoScriptError, NotReplicated)):
        return True
    if isinstance(exc, rx.ResponseError):  # an error reply redis-py has no class for ("BUSY ...")
        return reply_code(exc) in _TRANSIENT_REPLIES
    return False


def reply_code(exc: BaseException) -> str:
    """The error reply's code ("WRONGTYPE", "BUSY", ...), also inside a pipeline's
    "Command # N (...) of pipeline caused error: ..." wrapping; "" when there is none."""
    text = str(exc)
    _, sep, rest = text.partition("caused error: ")
    match = _REPLY_CODE.match(rest if sep else text)
    return match.group(1) if match else ""


class DeadlineRetry(Retry):
    """redis-py's retry, bounded by time since the command's first attempt instead of a count.
    Nested calls (connect inside a command) share the outermost deadline."""

    def __init__(self, retry_s: float = DEFAULT_RETRY_S, base_s: float = 0.05, cap_s: float = 0.5) -> None:
        super().__init__(ExponentialBackoff(cap=cap_s, base=base_s), retries=1_000_000, supported_errors=_RETRY_ON)
        self.retry_s = retry_s

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, DeadlineRetry) and other.retry_s == self.retry_s and super().__eq__(other)

    __hash__ = Retry.__hash__

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                              is_retryable: Callable[[Exception], bool] | None = None,
                              with_failure_count: bool = False) -> T:
        outer = _deadline.get()
        deadline = outer if outer is not None else time.monotonic() + self.retry_s
        token = _deadline.set(deadline) if outer is None else None
        self._backoff.reset()
        failures = 0
        try:
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    if (is_retryable and not is_retryable(error)) or isinstance(error, _PERMANENT_CONNECTION_ERRORS):
                        raise
                    failures += 1
                    await (fail(error, failures) if with_failure_count else fail(error))
                    delay = self._backoff.compute(failures)
                    if time.monotonic() + delay > deadline:
                        raise error
                    await asyncio.sleep(delay)
        finally:
            if token is not None:
                _deadline.reset(token)


class _MasterConnection(SentinelManagedConnection):
    """A connection to the current master: asks the sentinels on every (re)connect, including the
    reconnect inside a retried command (redis-py's own class reused the old address there)."""

    async def _connect(self) -> None:
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool with the blocking pool's ``get_connection`` (waits for a free connection),
    which also asks the sentinels for the master at most every ``MASTER_CHECK_S``.

    Why: after a failover the old master, if still reachable, stays a master until the sentinels
    reconfigure it (up to ~10 s, their INFO period), and redis-py keeps using pooled connections
    to it — measured: every write of those 10 s was acknowledged by the old master and lost when
    it became a replica. Now a changed master address drops every connection to the old one (the
    idle ones at once, the busy ones when released), so at most ``MASTER_CHECK_S`` of writes
    reach a demoted master. (A sentinel that cannot be asked is not a reason to fail a command.)"""

    MASTER_CHECK_S = 0.5

    _checked_at = 0.0
    _checking = False

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() - self._checked_at > self.MASTER_CHECK_S and not self._checking:
            await self._check_master()
        return await super().get_connection(*args, **kwargs)

    async def _check_master(self) -> None:
        self._checking = True
        try:
            address = await self.sentinel_manager.discover_master(self.service_name)
        except Exception as exc:  # noqa: BLE001 - sentinels unreachable: keep the connections we have
            log.warning("redis_sentinel_check_failed", service=self.service_name, error=str(exc))
            return
        finally:
            self._checked_at = time.monotonic()
            self._checking = False
        known = self.master_address
        self.master_address = address
        if known is not None and address != known:
            log.warning("redis_master_changed", service=self.service_name, old=f"{known[0]}:{known[1]}",
                        new=f"{address[0]}:{address[1]}")
            for conn in list(self._in_use_connections):
                conn.mark_for_reconnect()  # disconnected when released
            await self.disconnect(inuse_connections=False)


def parse_sentinel_url(url: str) -> dict[str, Any]:
    """``redis+sentinel://[[USER]:PASSWORD@]H:P[,H:P...]/SERVICE[/DB][?sentinel_password=...]`` ->
    sentinels, service, db, username, password, sentinel_password. ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a sentinel URL (scheme {SENTINEL_SCHEME}://): {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for item in filter(None, hosts.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"sentinel URL {url!r}: expected HOST:PORT, got {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"sentinel URL {url!r}: expected {SENTINEL_SCHEME}://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")
    username, _, password = userinfo.partition(":") if ":" in userinfo else ("", "", userinfo)
    query = parse_qs(parts.query)
    return {"sentinels": sentinels, "service": unquote(path[0]), "db": int(path[1]) if len(path) == 2 else 0,
            "username": unquote(username) or None, "password": unquote(password) or None,
            "sentinel_password": (query.get("sentinel_password") or [None])[0]}


def connect(url: str, *, max_connections: int = 64, retry_s: float = DEFAULT_RETRY_S, socket_timeout_s: float = 5.0,
            connect_timeout_s: float = 2.0, pool_timeout_s: float = 5.0) -> aioredis.Redis:
    """A client for ``url`` (see the module docstring) with the retry policy above. A connection
    idle for a second is PINGed before use, so a dead one is replaced before a command is lost on it."""
    common: dict[str, Any] = {
        "max_connections": max_connections, "timeout": pool_timeout_s, "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s, "health_check_interval": 1.0, "retry": DeadlineRetry(retry_s)}
    if url.startswith(SENTINEL_SCHEME + "://"):
        spec = parse_sentinel_url(url)
        sentinel = Sentinel(spec["sentinels"], sentinel_kwargs={
            "socket_timeout": min(socket_timeout_s, 1.0), "socket_connect_timeout": min(connect_timeout_s, 1.0),
            "password": spec["sentinel_password"]})
        return sentinel.master_for(spec["service"], redis_class=aioredis.Redis,
                                   connection_pool_class=_BlockingSentinelPool, connection_class=_MasterConnection,
                                   db=spec["db"], username=spec["username"], password=spec["password"], **common)
    pool = BlockingConnectionPool.from_url(url, **common)
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it


# -- durability ---------------------------------------------------------------------------------
async def durability(client: aioredis.Redis, sentinel: bool, min_replicas: int) -> dict[str, Any]:
    """What an acknowledged Submit survives, from Redis's own settings (CONFIG GET may be disabled
    or renamed: then "unknown"). Redis 7.0 has no WAITAOF (7.2): an fsync is never waited for."""
    settings: dict[str, str] = {}
    try:
        for key in ("appendonly", "appendfsync"):
            reply = await client.config_get(key)
            settings.update({_text(k): _text(v) for k, v in reply.items()})
    except rx.ResponseError as exc:
        settings = {"error": str(exc)}
    aof = settings.get("appendonly", "unknown")
    fsync = settings.get("appendfsync", "unknown")
    try:
        replicas = int((await client.info("replication")).get("connected_slaves", 0))
    except rx.ResponseError:
        replicas = -1
    return {
        "appendonly": aof, "appendfsync": fsync, "connected_replicas": replicas, "sentinel": sentinel,
        "redis_min_replicas": min_replicas, "waitaof": "not used (Redis < 7.2 has no WAITAOF)",
        "survives_redis_kill": "yes" if aof == "yes" else ("no" if aof == "no" else "unknown"),
        "survives_machine_crash": ("yes" if aof == "yes" and fsync == "always" else
                                   "up to ~1 s of writes lost" if aof == "yes" and fsync == "everysec" else
                                   "unknown" if "unknown" in (aof, fsync) else "no"),
        "survives_failover": ("yes (replicated to >= %d replica(s) before the ack)" % min_replicas if min_replicas
                              else "no guarantee (asynchronous replication; set redis_min_replicas >= 1)"),
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def log_durability(client: aioredis.Redis, sentinel: bool, min_replicas: int) -> dict[str, Any]:
    """One ``durability`` log line at start-up (see ``durability``); never fails the start."""
    try:
        report = await durability(client, sentinel, min_replicas)
    except Exception as exc:  # noqa: BLE001 - only a report
        report = {"error": f"{type(exc).__name__}: {exc}"}
    log.info("durability", **report)
    return report
