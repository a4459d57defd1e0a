"""Per-key limits at the gateway: a token bucket on every call and a cap on streams in flight.

One client must not take every batch slot, nor flood the scheduler with Submits — nor with
reads: GetRequest, Cancel and ``GET /v1/requests/{id}`` each cost a scheduler call (and a Redis
read), the last a detokenisation of the prompt too, so every authenticated call takes a token
(``admit`` for a call that starts a stream, ``charge`` for one that does not). Each API key
gets a ``KeyLimits`` (its own ``rate=``/``burst=``/``concurrency=`` or the gateway-wide
``key_rate_per_s``/``key_burst``/``key_max_concurrent``). The limits live in this gateway
process: N gateways behind a load balancer allow a key N times as much (documented, as vLLM's
per-server limits are).

A refusal is RESOURCE_EXHAUSTED carrying when to retry (``GatewayError.retry_after_ms``): the
gRPC front end sends it as the ``retry-after-ms`` trailer, HTTP as a 429 with ``Retry-After``
seconds — the same hint the scheduler gives when its queue is full.

Also here: the client-facing gRPC server's options (its receive limit is ``max_message_bytes``),
for ``gateway.main`` to pass when it builds the server.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any, Callable, Iterator

import grpc

from gateway.errors import GatewayError

# A full concurrency cap frees up when some stream ends, which nobody can predict: clients are
# told to come back after this long rather than at once.
CONCURRENCY_RETRY_MS = 1000


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options of the client-facing gRPC server: a message larger than ``max_message_bytes``
    is refused by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed or reaches a handler."""
    return [("grpc.max_receive_message_length", int(max_message_bytes))]


class TokenBucket:
    """``rate`` requests per second on average, up to ``burst`` at once. ``take`` answers 0
    (taken) or how many seconds until a token will be there; a refusal consumes nothing."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)) or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> float:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class Lease:
    """One admitted request's place under its key's concurrency cap, until ``release``.

    Released once, whichever comes first: the request's stream ends, its start fails
    (``until_failure``), or the object is garbage-collected (an HTTP stream whose body was
    never iterated, so no ``finally`` ran)."""

    def __init__(self, limits: "KeyLimits | None") -> None:
        self._limits = limits
        self._places = 1

    def widen(self, extra: int) -> None:
        """Take ``extra`` more places for the same call: each sample of ``n`` and each prompt of a
        list runs as a request of its own, so a call of 8 samples counts as 8 streams, not 1
        (else one call could run any number under a cap of a few). Raises as ``admit`` does."""
        if self._limits is not None and extra > 0:
            self._limits.widen(extra, self._places)
            self._places += extra

    def release(self) -> None:
        limits, self._limits = self._limits, None
        if limits is not None:
            limits._released(self._places)

    @contextlib.contextmanager
    def until_failure(self) -> Iterator["Lease"]:
        """Held past the block when it succeeds (the request took it over), released when it raises."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def __del__(self) -> None:
        self.release()


NO_LEASE = Lease(None)  # an open gateway's: nothing to count


class KeyLimits:
    """The limits of one API key. ``rate_per_s`` 0 and ``concurrency`` 0 mean unlimited; a
    ``burst`` of 0 means ``ceil(rate)`` (one second's worth, at least 1)."""

    def __init__(self, name: str, rate_per_s: float, burst: int, concurrency: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.concurrency = concurrency
        self.bucket = TokenBucket(rate_per_s, burst or max(1, math.ceil(rate_per_s)), clock) if rate_per_s > 0 \
            else None
        self.in_flight = 0
        # A Lease may be released by the garbage collector, in any thread and even inside admit()
        # (a collection it triggers): re-entrant, so that cannot deadlock.
        self._lock = threading.RLock()

    @property
    def unlimited(self) -> bool:
        return self.bucket is None and self.concurrency <= 0

    def admit(self) -> Lease:
        """A lease for one new request, or RESOURCE_EXHAUSTED saying which limit and when to retry.
        The concurrency cap is checked first: a refused request costs no rate token."""
        with self._lock:
            if 0 < self.concurrency <= self.in_flight:
                raise _exhausted(f"API key {self.name!r} has {self.in_flight} requests in flight, its limit "
                                 f"(concurrency); retry when one of them finishes", CONCURRENCY_RETRY_MS)
            if self.bucket is not None:
                wait_s = self.bucket.take()
                if wait_s > 0:
                    raise self._over_rate(wait_s)
            self.in_flight += 1
        return Lease(self)

    def widen(self, extra: int, held: int) -> None:
        """``extra`` more places for a call that holds ``held``: RESOURCE_EXHAUSTED when the cap is
        full now, INVALID_ARGUMENT when the call alone is more than the cap (waiting never helps)."""
        with self._lock:
            if self.concurrency <= 0:
                self.in_flight += extra
                return
            if held + extra > self.concurrency:
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"the call runs {held + extra} requests (n samples of each prompt), more than API "
                                   f"key {self.name!r} may run at once ({self.concurrency}, its concurrency); ask "
                                   "for fewer samples or prompts per call")
            if self.in_flight + extra > self.concurrency:
                raise _exhausted(f"API key {self.name!r} has {self.in_flight} requests in flight, and this call "
                                 f"needs {held + extra} places under its limit of {self.concurrency} (concurrency); "
                                 "retry when some of them finish", CONCURRENCY_RETRY_MS)
            self.in_flight += extra

    def charge(self) -> None:
        """Count one call that starts no stream (Cancel, GetRequest, a read over HTTP) against the
        rate: RESOURCE_EXHAUSTED with when to retry when the bucket is empty. No concurrency
        place is taken: nothing stays in flight."""
        if self.bucket is None:
            return
        with self._lock:
            wait_s = self.bucket.take()
        if wait_s > 0:
            raise self._over_rate(wait_s)

    def _over_rate(self, wait_s: float) -> GatewayError:
        assert self.bucket is not None
        retry_ms = max(1, math.ceil(wait_s * 1000))
        return _exhausted(f"API key {self.name!r} is over its rate limit of {self.bucket.rate:g} calls/s (burst "
                          f"{self.bucket.burst}); retry in {retry_ms / 1000:.3g} s", retry_ms)

    def _released(self, places: int = 1) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - places)


def _exhausted(message: str, retry_after_ms: int) -> GatewayError:
    return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_ms=retry_after_ms)
