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
permanent (a wrong-typed key, a script error, a permission, a refused password or TLS certificate,
``LeaseLost``).

**Credentials and TLS.** A URL carries the ACL user and password (``redis://accelgen:PW@host:6379/0``;
see ``redis_acl`` and ``deploy/users.acl``) and, for TLS, ``rediss://`` with the files as query
options: ``?ssl_ca_certs=CA.crt&ssl_certfile=CLIENT.crt&ssl_keyfile=CLIENT.key`` (plus
``ssl_cert_reqs=required|optional|none`` and ``ssl_check_hostname=false`` — the server's cert
must name the host dialled unless that is off). A Sentinel URL takes ``ssl=true`` and the same
options, used for the sentinels and the master alike, and ``sentinel_username`` /
``sentinel_password`` for the sentinels' own ACL. ``check_url`` refuses options that would be
ignored or fail later (TLS files on a plaintext URL, a file that cannot be read); ``redact_url`` is
the only form of a URL that may be logged or printed.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import time
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rx
import structlog
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection
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
# A TLS handshake that failed on a certificate: the configuration, not a restart (redis-py wraps
# the ssl error's text into a ConnectionError).
_TLS_REFUSED = re.compile(r"CERTIFICATE_VERIFY_FAILED|ALERT_UNKNOWN_CA|ALERT_BAD_CERTIFICATE|"
                          r"ALERT_CERTIFICATE_REQUIRED|WRONG_VERSION_NUMBER|certificate verify failed")
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
    if isinstance(exc, _PERMANENT_CONNECTION_ERRORS) or is_tls_refused(exc):
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


def is_tls_refused(exc: BaseException) -> bool:
    """A TLS handshake failed on a certificate (unknown CA, none sent, wrong name, TLS to a
    plaintext port): retrying the same files cannot succeed."""
    return isinstance(exc, (rx.ConnectionError, OSError)) and bool(_TLS_REFUSED.search(str(exc)))


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
                    if ((is_retryable and not is_retryable(error)) or isinstance(error, _PERMANENT_CONNECTION_ERRORS)
                            or is_tls_refused(error)):
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


class _MasterSSLConnection(_MasterConnection, SSLConnection):
    """``_MasterConnection`` over TLS (``ssl=true`` in a Sentinel URL)."""


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


# -- URLs: credentials, TLS options, redaction ----------------------------------------------------
_SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)
# Query options that are secrets: redacted like the URL's password.
_SECRET_OPTIONS = frozenset({"password", "sentinel_password", "ssl_password"})
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")
_TLS_OPTIONS = frozenset({*_TLS_FILES, "ssl_cert_reqs", "ssl_check_hostname", "ssl_password", "ssl_ciphers",
                          "ssl_min_version", "ssl_ca_data", "ssl_include_verify_flags", "ssl_exclude_verify_flags"})
_CERT_REQS = ("none", "optional", "required")


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret query option) replaced by ``***``: the only form of
    a Redis URL that may be logged, printed or put in an error message."""
    # The user part ends at the *last* "@": a password with an unescaped "#", "?" or "/" would end
    # urlsplit's netloc early and leave the rest of the password in the path or the fragment.
    scheme, sep, rest = url.partition("://")
    userinfo, at, rest = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if any(c in user for c in "/?#"):
            user = ""
        # "user:password@" keeps the user; a bare "x@" may be a password (Sentinel URLs read it so).
        userinfo = f"{user}:***@" if colon else "***@"
    try:
        parts = urlsplit(f"{scheme}{sep}{rest}")
    except ValueError:
        return "<a Redis URL that does not parse>"
    query = "&".join(f"{key}=***" if key in _SECRET_OPTIONS and sep_ else f"{key}{sep_}{value}"
                     for key, sep_, value in (item.partition("=") for item in parts.query.split("&") if item))
    head = f"{parts.scheme}{sep}{userinfo if at else ''}{parts.netloc}"
    return head + urlunsplit(("", "", parts.path, query, parts.fragment))


def _options(query: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on", "y")


def check_url(url: str) -> None:
    """ValueError, naming the URL redacted, when ``url`` cannot work: an unknown scheme, TLS
    options on a plaintext URL (redis-py would fail at the first connection, or ignore them), a
    certificate or key file that cannot be read, a bad ``ssl_cert_reqs``, a Sentinel URL that
    does not parse. Called by the scheduler's config, so a mistake is a config error at start."""
    shown = redact_url(url)
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in _SCHEMES:
        raise ValueError(f"redis_url {shown!r}: the scheme must be one of "
                         f"{', '.join(s + '://' for s in _SCHEMES)}")
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    options = _options(urlsplit(url).query)
    tls = scheme == "rediss" or (scheme == SENTINEL_SCHEME and _truthy(options.get("ssl", "")))
    given = sorted(_TLS_OPTIONS.intersection(options))
    if given and not tls:
        raise ValueError(f"redis_url {shown!r}: TLS options ({', '.join(given)}) need a TLS URL: rediss://"
                         + (" (or ssl=true on a Sentinel URL)" if scheme == SENTINEL_SCHEME else ""))
    for name in _TLS_FILES:
        path = options.get(name)
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"redis_url {shown!r}: {name} {path!r} " +
                             ("does not exist" if not os.path.exists(path) else "cannot be read by this user"))
    reqs = options.get("ssl_cert_reqs")
    if reqs is not None and reqs not in _CERT_REQS:
        raise ValueError(f"redis_url {shown!r}: ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {reqs!r}")
    if ("ssl_certfile" in options) != ("ssl_keyfile" in options):
        raise ValueError(f"redis_url {shown!r}: a client certificate needs both ssl_certfile and ssl_keyfile")


def _tls_kwargs(options: dict[str, str]) -> dict[str, Any]:
    """redis-py's SSLConnection arguments from a Sentinel URL's query (``rediss://`` URLs are
    parsed by redis-py itself)."""
    kwargs: dict[str, Any] = {name: options[name] for name in (*_TLS_FILES, "ssl_cert_reqs", "ssl_password",
                                                                 "ssl_ciphers") if name in options}
    if "ssl_check_hostname" in options:
        kwargs["ssl_check_hostname"] = _truthy(options["ssl_check_hostname"])
    return kwargs


def parse_sentinel_url(url: str) -> dict[str, Any]:
    """``redis+sentinel://[[USER]:PASSWORD@]H:P[,H:P...]/SERVICE[/DB][?sentinel_password=...]`` ->
    sentinels, service, db, username, password, sentinel_username, sentinel_password and ``tls``
    (redis-py's SSL arguments, or None without ``ssl=true``). ValueError says what is wrong (the
    URL redacted: it may hold passwords)."""
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a sentinel URL (scheme {SENTINEL_SCHEME}://): {shown!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for item in filter(None, hosts.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"sentinel URL {shown!r}: expected HOST:PORT, got {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"sentinel URL {shown!r}: expected {SENTINEL_SCHEME}://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")
    username, _, password = userinfo.partition(":") if ":" in userinfo else ("", "", userinfo)
    options = _options(parts.query)
    return {"sentinels": sentinels, "service": unquote(path[0]), "db": int(path[1]) if len(path) == 2 else 0,
            "username": unquote(username) or None, "password": unquote(password) or None,
            "sentinel_username": options.get("sentinel_username") or None,
            "sentinel_password": options.get("sentinel_password") or None,
            "tls": _tls_kwargs(options) if _truthy(options.get("ssl", "")) else None}


def connect(url: str, *, max_connections: int = 64, retry_s: float = DEFAULT_RETRY_S, socket_timeout_s: float = 5.0,
            connect_timeout_s: float = 2.0, pool_timeout_s: float = 5.0) -> aioredis.Redis:
    """A client for ``url`` (see the module docstring) with the retry policy above. A connection
    idle for a second is PINGed before use, so a dead one is replaced before a command is lost on it.
    ValueError (``check_url``) for a URL that cannot work."""
    check_url(url)
    common: dict[str, Any] = {
        "max_connections": max_connections, "timeout": pool_timeout_s, "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s, "health_check_interval": 1.0, "retry": DeadlineRetry(retry_s)}
    if url.startswith(SENTINEL_SCHEME + "://"):
        spec = parse_sentinel_url(url)
        tls = spec["tls"]
        sentinel = Sentinel(spec["sentinels"], sentinel_kwargs={
            "socket_timeout": min(socket_timeout_s, 1.0), "socket_connect_timeout": min(connect_timeout_s, 1.0),
            "username": spec["sentinel_username"], "password": spec["sentinel_password"],
            **({"ssl": True, **tls} if tls is not None else {})})
        return sentinel.master_for(spec["service"], redis_class=aioredis.Redis,
                                   connection_pool_class=_BlockingSentinelPool,
                                   connection_class=_MasterConnection if tls is None else _MasterSSLConnection,
                                   db=spec["db"], username=spec["username"], password=spec["password"],
                                   **(tls or {}), **common)
    pool = BlockingConnectionPool.from_url(url, **common)
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it


# -- durability ---------------------------------------------------------------------------------
async def durability(client: aioredis.Redis, sentinel: bool, min_replicas: int) -> dict[str, Any]:
    """What an acknowledged Submit survives, from Redis's own settings. CONFIG GET may be refused
    (the scheduler's ACL user may not run it: ``redis_acl``) or renamed away: then ``appendonly``
    comes from INFO and ``appendfsync`` is "unknown", with the reason in ``config_get``. Redis 7.0
    has no WAITAOF (7.2): an fsync is never waited for."""
    settings: dict[str, str] = {}
    try:
        for key in ("appendonly", "appendfsync"):
            reply = await client.config_get(key)
            settings.update({_text(k): _text(v) for k, v in reply.items()})
    except rx.ResponseError as exc:  # CONFIG refused (the ACL user may not run it) or renamed away
        settings = {"error": str(exc)}
        try:  # INFO says whether the AOF is on, not how often it is fsynced
            enabled = (await client.info("persistence")).get("aof_enabled")
            if enabled is not None:
                settings["appendonly"] = "yes" if int(enabled) else "no"
        except rx.ResponseError:
            pass
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
                                   "no" if aof == "no" else "unknown" if "unknown" in (aof, fsync) else "no"),
        "survives_failover": ("yes (replicated to >= %d replica(s) before the ack)" % min_replicas if min_replicas
                              else "no guarantee (asynchronous replication; set redis_min_replicas >= 1)"),
        **({"config_get": settings["error"]} if "error" in settings else {}),
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
