"""How the ``accelgen`` command fails: one line on stderr that says what to change, never a traceback.

``guarded`` runs a subcommand. An error the user can act on (a bad value or file, a service that
does not answer, a refusal from a service) prints ``accelgen <command>: error: <message>`` and
exits 2; anything else is a bug, still one line, exit 1, with the way to see the traceback:
``accelgen --debug <command> ...`` (or ``ACCELGEN_DEBUG=1``), which lets every error through.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import grpc

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
DEBUG_ENV = "ACCELGEN_DEBUG"


class CliError(Exception):
    """A mistake the user can fix, already said in one line."""


# ConfigError is a ValueError; FileNotFoundError, PermissionError, ConnectionError and
# TimeoutError are OSErrors.
EXPECTED: tuple[type[BaseException], ...] = (CliError, ValueError, OSError, grpc.RpcError)


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` before the subcommand (removed from ``argv``), or ``ACCELGEN_DEBUG=1``."""
    if argv and argv[0] == "--debug":
        del argv[0]
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def guarded(command: str, run: Callable[[], int], debug: bool = False) -> int:
    """``run()``'s exit status; its errors as one line on stderr (module doc)."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"accelgen {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED as exc:
        if debug:
            raise
        print(f"accelgen {command}: error: {message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        print(f"accelgen {command}: error: {type(exc).__name__}: {message(exc)} (unexpected; run "
              f"`accelgen --debug {command} ...` for the traceback)", file=sys.stderr)
        return EXIT_BUG


def message(exc: BaseException) -> str:
    """The error in one line."""
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        text = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
