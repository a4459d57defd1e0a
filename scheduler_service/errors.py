"""The scheduler's one error type, and the one mapping from any failure to a gRPC status.

``ServiceError`` is a failure with the status a client should see. ``status_of`` turns any
exception into (code, message, retry-after): the servicer aborts a call with it, and a WatchMany
stream reports a request it cannot watch with it, so both say the same thing for the same failure.

A failed Redis call maps by what retrying would do (``redis_conn.is_transient``):

- transient (Redis restarting, failing over, loading, out of memory, a dropped connection):
  UNAVAILABLE "Redis unavailable, retry";
- the scheduler lost its leader lease (``LeaseLost``, raised by a fenced write): UNAVAILABLE too,
  since another scheduler serves; clients configured with several scheduler addresses reconnect;
- fewer replicas than ``redis_min_replicas`` confirmed a Submit: UNAVAILABLE, saying so;
- anything else Redis refused (WRONGTYPE, NOPERM, a script error): INTERNAL with Redis's own
  text; retrying the same call would fail the same way, and an operator has to look.
"""

from __future__ import annotations

import grpc
import structlog

from scheduler_service.state.redis_conn import NotReplicated, is_lease_lost, is_transient

log = structlog.get_logger("scheduler.errors")

NOT_LEADER = ("this scheduler is no longer the leader; retry (clients with several scheduler addresses "
              "reconnect to the new one)")


class ServiceError(Exception):
    """A failure with the gRPC status a client should see."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s  # sent as trailing metadata "retry-after-ms"


def store_unavailable(exc: BaseException) -> ServiceError:
    """The state store failed: the status a client should see (see the module docstring)."""
    if isinstance(exc, ServiceError):
        return exc
    if is_lease_lost(exc):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, NOT_LEADER)
    if isinstance(exc, NotReplicated):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if is_transient(exc):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"the state store (Redis) is unavailable: {exc}; retry")
    log.error("store_failed_permanent", error=f"{type(exc).__name__}: {exc}")
    return ServiceError(grpc.StatusCode.INTERNAL,
                        f"the state store (Redis) refused the operation (not retryable): {type(exc).__name__}: {exc}")


store_error = store_unavailable  # the same mapping, named for what it does


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    """(code, message, retry_after_s) for any failure: a ``ServiceError`` as it says, a failure of
    Redis (or of the connection to it) as ``store_unavailable`` maps it, anything else INTERNAL
    (and logged: a bug)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc), exc.retry_after_s
    if (isinstance(exc, (ConnectionError, OSError, NotReplicated)) or is_lease_lost(exc)
            or type(exc).__module__.startswith("redis")):
        err = store_unavailable(exc)
        return err.code, str(err), None
    log.error("internal_error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {exc}", None
