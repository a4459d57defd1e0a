"""Errors of the gateway and their status codes, mapped in exactly one place.

Validation raises ``GatewayError`` with the code and a message that names the field and says
what to change. Errors the scheduler returns (``grpc.aio.AioRpcError``) keep their code and
message: the scheduler already wrote them for the client, and rewording them here would only
hide which side rejected the request. ``status_of`` turns any exception into a (code, message)
pair; both front ends (gRPC and OpenAI HTTP) call it, so a given failure looks the same on both.
"""

from __future__ import annotations

import asyncio

import grpc


class GatewayError(Exception):
    """A request failure with the gRPC status code the client should see.

    ``param`` names the offending field (OpenAI's error ``param``) when there is one;
    ``http_status`` overrides the HTTP status of ``code`` where HTTP has a more precise one
    (413 for a body over the limit: gRPC has no such code, and 429 would invite a retry);
    ``retry_after_ms`` says when a refused request may be retried (a per-key limit), sent as
    the scheduler's own hint is.
    """

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None,
                 http_status: int | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.http_status = http_status
        self.retry_after_ms = retry_after_ms


def invalid(message: str, param: str | None = None) -> GatewayError:
    """INVALID_ARGUMENT: the client must change the request."""
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


def too_large(message: str) -> GatewayError:
    """A request bigger than the gateway accepts: HTTP 413 (RESOURCE_EXHAUSTED over gRPC)."""
    return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, http_status=413)


RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata on a retryable refusal (scheduler's and ours)


def retry_after_ms(exc: BaseException) -> int | None:
    """When the gateway (a per-key limit) or the scheduler says a refused request may be
    retried (None if neither said)."""
    if isinstance(exc, GatewayError):
        return exc.retry_after_ms
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from a failure to the status a client sees."""
    if isinstance(exc, GatewayError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Our own deadline on a scheduler call expired: the scheduler is overloaded or hung.
            return code, f"the scheduler did not answer in time: {details}"
        return code, details
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the scheduler did not answer in time"
    return grpc.StatusCode.INTERNAL, f"internal gateway error: {type(exc).__name__}: {exc}"


def printable(text: str) -> str:
    """``text`` with what cannot be encoded as UTF-8 (lone surrogates a JSON body may carry)
    escaped, so a message that quotes a client's value can always be sent back."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# OpenAI-compatible HTTP statuses and error types for each gRPC code (vLLM's server uses the
# same numbers, so HTTP clients that retry on 429/503 behave as they would against vLLM).
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequestError"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "BadRequestError"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "BadRequestError"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "AuthenticationError"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "PermissionDeniedError"),
    grpc.StatusCode.NOT_FOUND: (404, "NotFoundError"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "ConflictError"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    grpc.StatusCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "TimeoutError"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "NotImplementedError"),
}


def http_status_of(code: grpc.StatusCode) -> tuple[int, str]:
    """HTTP status and OpenAI error ``type`` for a gRPC code (500 for anything unexpected)."""
    return _HTTP.get(code, (500, "InternalServerError"))
