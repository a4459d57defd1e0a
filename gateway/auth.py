"""Who is calling the gateway: API keys, the tenant each one names, and what a key may do.

Keys come from ``--api-key KEY`` (repeatable; ``ACCELGEN_GATEWAY_API_KEY`` or
``ACCELGEN_API_KEY``, comma-separated) and ``--api-keys FILE``: one key per line, ``#``
comments, optional settings after the key::

    # KEY                              settings (all optional)
    3b1f0c5e9a7d4e2f8c6b0a9d7e5f3c1a   name=team-a rate=10 burst=20 concurrency=8 classes=chat,code

- ``name``: the tenant the key's requests belong to (keys with one name share their requests);
  default ``key-`` + the first 12 hex digits of the key's SHA-256, so the key itself is never
  stored, logged or sent to the scheduler;
- ``rate`` (calls/s), ``burst``, ``concurrency`` (streams in flight): this key's limits
  (``gateway.limits``), else the gateway-wide ``key_rate_per_s``/``key_burst``/
  ``key_max_concurrent``; 0 = unlimited. The rate counts *every* authenticated call, not only
  new requests: gRPC Generate, Attach, GetRequest and Cancel, and every HTTP route behind the
  key (completions, chat, ``/v1/models``, ``/v1/requests/{id}`` and its ``/events``). Reads
  cost the scheduler a store read each (and ``/v1/requests/{id}`` a detokenised prompt), so a
  key polling them is held to the same budget as one submitting. One bucket, not a separate one
  for reads: size ``rate``/``burst`` for a key's requests plus its polls and cancels;
- ``classes``: the application classes the key may use (PERMISSION_DENIED / HTTP 403 for
  another), and an explicit SLO may not be tighter than the tightest of them.

No key configured: the gateway is open (every caller is tenant ""), and says so at start-up
when it listens beyond loopback. Keys are compared as SHA-256 digests with
``hmac.compare_digest`` against every configured key, so the time taken says nothing about
how much of a guess matched.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import grpc
import structlog

from accelgen.core.slo import SLO, SLOCatalog
from accelgen.wire.slo import KINDS
from gateway.errors import GatewayError
from gateway.limits import NO_LEASE, KeyLimits, Lease

log = structlog.get_logger("gateway.auth")

MIN_KEY_CHARS = 16
TENANT_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_KEY_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what fits an HTTP header
_COMMENT_RE = re.compile(r"(^|\s)#.*$")
_SETTINGS = ("name", "rate", "burst", "concurrency", "classes")


@dataclass(frozen=True)
class KeyPolicy:
    """One key's own settings (None: the gateway-wide default)."""

    rate_per_s: float | None = None
    burst: int | None = None
    concurrency: int | None = None
    classes: tuple[str, ...] = ()  # empty: every class


@dataclass(frozen=True)
class ApiKey:
    """A configured key, as its digest: the key's text is not kept."""

    digest: bytes = field(repr=False)
    tenant: str
    policy: KeyPolicy
    where: str  # for messages: "--api-key #2", "keys.txt line 3"


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def default_tenant(key: str) -> str:
    """A key without ``name=``: its tenant is named by its hash, never by the key."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def make_key(key: str, where: str, settings: Mapping[str, str] | None = None) -> ApiKey:
    """A checked key; ValueError naming ``where`` (never quoting the key) when it is unusable."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"{where}: an API key must be printable ASCII without spaces")
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{where}: an API key must have at least {MIN_KEY_CHARS} characters (it has {len(key)}); "
                         "make one with: python -c 'import secrets; print(secrets.token_hex(16))'")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"{where}: unknown key setting {unknown[0]!r}; known: {', '.join(_SETTINGS)}")
    name = settings.get("name", "")
    if name and not TENANT_RE.fullmatch(name):
        raise ValueError(f"{where}: name={name!r} must be 1 to 64 characters of [A-Za-z0-9._:-]")
    classes = tuple(c.strip() for c in settings.get("classes", "").split(",") if c.strip())
    if "classes" in settings and not classes:
        raise ValueError(f"{where}: classes= must name at least one application class (comma-separated)")
    policy = KeyPolicy(rate_per_s=_number(settings, "rate", where, float),
                       burst=_number(settings, "burst", where, int),
                       concurrency=_number(settings, "concurrency", where, int), classes=classes)
    return ApiKey(digest=digest_of(key), tenant=name or default_tenant(key), policy=policy, where=where)


def _number(settings: Mapping[str, str], name: str, where: str, kind: Callable[[str], float]) -> int | float | None:
    raw = settings.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if not (math.isfinite(value) and value >= 0):
        what = "a number of requests per second" if kind is float else "a whole number"
        raise ValueError(f"{where}: {name}={raw!r} must be {what} >= 0 (0 = unlimited)")
    return value


def parse_keys_file(text: str, source: str) -> list[ApiKey]:
    """The keys of a keys file (see the module doc); ValueError naming the file and line."""
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        words = _COMMENT_RE.sub("", line).split()
        if not words:
            continue
        where = f"{source} line {lineno}"
        settings: dict[str, str] = {}
        for word in words[1:]:
            name, sep, value = word.partition("=")
            if not sep:
                raise ValueError(f"{where}: {word!r} is not a setting (write name=value after the key)")
            if name in settings:
                raise ValueError(f"{where}: {name}= is given twice")
            settings[name] = value
        keys.append(make_key(words[0], where, settings))
    return keys


def load_keys(api_key: Sequence[str], api_keys: str | None) -> tuple[ApiKey, ...]:
    """Every configured key: the ``--api-key`` ones, then the file's; a key given twice is an error."""
    keys = [make_key(k, f"api_key #{i}") for i, k in enumerate(api_key, 1)]
    if api_keys:
        try:
            text = Path(api_keys).read_text()
        except OSError as exc:
            raise ValueError(f"api_keys: cannot read {api_keys}: {exc.strerror or exc}") from None
        keys.extend(parse_keys_file(text, api_keys))
    seen: dict[bytes, str] = {}
    for k in keys:
        if k.digest in seen:
            raise ValueError(f"{k.where}: the same API key as {seen[k.digest]}")
        seen[k.digest] = k.where
    return tuple(keys)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the tenant its requests belong to and what its key allows."""

    tenant: str
    classes: tuple[str, ...] = ()  # empty: every class
    limits: KeyLimits | None = None

    def admit(self) -> Lease:
        """A lease for one new stream (Generate, Attach) under this key's limits: a rate token and
        a concurrency place (RESOURCE_EXHAUSTED when over)."""
        return self.limits.admit() if self.limits is not None else NO_LEASE

    def charge(self) -> None:
        """Count one call that starts no stream (GetRequest, Cancel, an HTTP read) against this
        key's rate (RESOURCE_EXHAUSTED when over)."""
        if self.limits is not None:
            self.limits.charge()

    def default_class(self, gateway_default: str) -> str:
        """The class of a request that names none: the gateway's, unless this key may not use it."""
        return gateway_default if not self.classes or gateway_default in self.classes else self.classes[0]

    def check_class(self, app_class: str, explicit: SLO | None, catalog: SLOCatalog,
                    names: Mapping[str, str]) -> None:
        """PERMISSION_DENIED when this key may not use ``app_class``, or asks for an SLO tighter
        than its tightest allowed class in any of TTFT, TBT or JCT (a kind none of its classes
        sets may not be asked for at all: a batch-only key claiming a 5 ms TBT)."""
        if not self.classes:
            return
        if app_class not in self.classes:
            raise _denied(f"{names['app_class']} {app_class!r} is not allowed for this API key; it may use: "
                          f"{', '.join(self.classes)}", names["app_class"])
        if explicit is None:
            return
        allowed = [catalog.get(c).slo for c in self.classes if c in catalog]
        for kind in KINDS:
            value = getattr(explicit, f"{kind}_s")
            if value is None:
                continue
            name = names[f"{kind}_ms"]
            floors = [s for s in (getattr(slo, f"{kind}_s") for slo in allowed) if s is not None]
            if not floors:
                raise _denied(f"{name}: this API key's classes ({', '.join(self.classes)}) set no {kind} SLO, so "
                              "it may not ask for one; leave it unset or use the class's default", name)
            if value < min(floors):
                raise _denied(f"{name} = {value * 1000:g} ms is tighter than this API key may ask for: at least "
                              f"{min(floors) * 1000:g} ms (its tightest class)", name)


OPEN = Caller(tenant="")  # an open gateway's callers (no keys configured)


def _denied(message: str, param: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.PERMISSION_DENIED, message, param)


def unauthenticated(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAUTHENTICATED, message)


@dataclass(frozen=True)
class LimitDefaults:
    """The gateway-wide limits of keys without their own (0 = unlimited)."""

    rate_per_s: float = 0.0
    burst: int = 0
    concurrency: int = 0


class KeyRing:
    """The configured keys, each with its ``Caller`` (and so its own limits), and the one check
    of a presented key."""

    def __init__(self, keys: Iterable[ApiKey], defaults: LimitDefaults = LimitDefaults(),
                 clock: Callable[[], float] | None = None) -> None:
        self._entries: list[tuple[bytes, Caller]] = []
        for k in keys:
            p = k.policy
            limits = KeyLimits(
                k.tenant, defaults.rate_per_s if p.rate_per_s is None else p.rate_per_s,
                defaults.burst if p.burst is None else p.burst,
                defaults.concurrency if p.concurrency is None else p.concurrency,
                **({"clock": clock} if clock is not None else {}))
            self._entries.append((k.digest, Caller(tenant=k.tenant, classes=p.classes,
                                                   limits=None if limits.unlimited else limits)))

    @property
    def open(self) -> bool:
        """No key configured: every caller is let in as tenant ""."""
        return not self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller a ``Bearer KEY`` credential names; UNAUTHENTICATED (never quoting what was
        sent) when it is missing, malformed or no configured key."""
        if self.open:
            return OPEN
        if not authorization:
            raise unauthenticated("an API key is required: send it as `authorization: Bearer KEY`")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthenticated("the authorization must be `Bearer KEY` (an API key)")
        digest = digest_of(key.strip())
        found: Caller | None = None
        for known, caller in self._entries:  # every entry, match or not: no early exit to time
            if hmac.compare_digest(known, digest):
                found = caller
        if found is None:
            raise unauthenticated("the API key is not valid")
        return found


def warn_if_open(ring: KeyRing, host: str, is_loopback: Callable[[str], bool]) -> bool:
    """Log a warning (and say True) when no key is configured and ``host`` is beyond loopback."""
    if not ring.open or is_loopback(host):
        return False
    log.warning("gateway_open_without_api_keys", host=host,
                effect="any client that reaches this address can submit, read and cancel requests",
                fix="set --api-key KEY or --api-keys FILE, or listen on 127.0.0.1")
    return True
