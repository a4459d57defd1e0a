"""The scheduler's one error type: a failure with the gRPC status a client should see."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with a gRPC status name ("INVALID_ARGUMENT", ...); mapped in server.py only."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s  # sent as trailing metadata "retry-after-ms"
