"""The scheduler's one error type, and the one mapping from any failure to a gRPC status.

``ServiceError`` is a failure with the status a client should see. ``status_of`` turns any
exception into (code, message, retry-after): the servicer aborts a call with it, and a WatchMany
stream reports a request it cannot watch with it, so both say the same thing for the same failure.
"""

from __future__ import annotations

import grpc
import structlog

log = structlog.get_logger("scheduler.errors")


class ServiceError(Exception):
    """A failure with the gRPC status a client should see."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s  # sent as trailing metadata "retry-after-ms"


def store_unavailable(exc: BaseException) -> ServiceError:
    """The state store failed: retrying (once Redis is back) may succeed."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"the state store (Redis) is unavailable: {exc}")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    """(code, message, retry_after_s) for any failure: a ``ServiceError`` as it says, a failed
    connection (Redis, the network) UNAVAILABLE, anything else INTERNAL (and logged: a bug)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc), exc.retry_after_s
    if isinstance(exc, (ConnectionError, OSError)) or type(exc).__module__.startswith("redis"):
        err = store_unavailable(exc)
        return err.code, str(err), None
    log.error("internal_error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {exc}", None
