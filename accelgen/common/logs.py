"""Structured logging for every service: structlog over stdlib logging.

JSON lines when stderr is not a terminal (systemd, CI), readable key=value lines when it is.
Bind the request id with ``structlog.contextvars.bind_contextvars(request_id=...)`` so every
event logged while handling it carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog


def setup_logging(service: str, level: str = "INFO", json_logs: bool | None = None) -> structlog.stdlib.BoundLogger:
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger(service=service)
