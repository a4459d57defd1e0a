"""OpenAI request bodies as JSON, parsed so that no body can make parsing or an error message costly.

Split from ``openai_protocol`` (which reads the fields): integers too long to convert cheaply,
NaN/Infinity, nesting too deep for a recursive walk, and strings that are no Unicode text are
each refused (or kept as ``HugeNumber`` for the field to refuse by name) here, and ``shown``
quotes a client's value in a message at bounded size.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

from gateway.errors import invalid

# Bounds on what a JSON body may hold, so parsing and every message that quotes a value stay
# cheap: Python refuses int() of more than 4,300 digits with a ValueError (a 500, before), and
# repr() of a value nested ~1,000 deep raises RecursionError. No OpenAI field needs more.
MAX_INT_DIGITS = 64
MAX_JSON_DEPTH = 64

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 8
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """A client's value quoted in an error message: bounded in size and always encodable."""
    return _REPR.repr(value).encode("utf-8", "backslashreplace").decode("utf-8")


class HugeNumber:
    """An integer literal of more than ``MAX_INT_DIGITS`` digits, kept as its size: converting
    it could cost quadratic time (or a ValueError past 4,300 digits), and no field takes one,
    so each field's own check refuses it by name."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))
        self.head = text[:12]

    def __repr__(self) -> str:
        return f"{self.head}... (an integer of {self.digits} digits)"


def _parse_int(text: str) -> int | HugeNumber:
    return HugeNumber(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _parse_constant(name: str) -> float:
    raise invalid(f"the request body contains {name}, which is not valid JSON (numbers must be finite)")


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or INVALID_ARGUMENT saying why not: malformed or not UTF-8, NaN or
    Infinity, nesting deeper than ``MAX_JSON_DEPTH``, or a string that is no Unicode text (a
    lone surrogate such as \\ud800). Integers of more than ``MAX_INT_DIGITS`` digits become
    ``HugeNumber`` and numbers beyond a double's range ``inf``: valid JSON, refused by the
    field that holds them (so the message names it)."""
    try:
        body = json.loads(raw, parse_int=_parse_int, parse_constant=_parse_constant)
    except RecursionError:
        raise invalid(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise invalid(f"the request body is not valid JSON: {shown(str(exc))}") from None
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    """Depth and Unicode of every value, iteratively (a recursive walk is what must not fail).
    Paths are built only for a message: a 4 MiB body holds up to 2 million values."""
    stack: list[tuple[Any, Any, int]] = [(body, None, 0)]  # value, where ((parent's where, key) or None), depth

    def path(where: Any) -> str:
        keys = []
        while where is not None:
            where, key = where
            keys.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        return "".join(reversed(keys)).lstrip(".") or "the request body"

    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise invalid(f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels at "
                          f"{shown(path(where)[:80])})")
        if isinstance(value, str):
            if not value.isascii():
                unicode_text(value, path(where))
        elif isinstance(value, list):
            stack.extend((v, (where, i), depth + 1) for i, v in enumerate(value) if isinstance(v, (str, list, dict)))
        elif isinstance(value, dict):
            for k, v in value.items():
                if not k.isascii():
                    unicode_text(k, f"the key {shown(path((where, k)))}")
                if isinstance(v, (str, list, dict)):
                    stack.append((v, (where, k), depth + 1))


def unicode_text(text: str, name: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that are no Unicode text and cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"{name} is not valid Unicode text: {exc.reason} at character {exc.start}", name) from None
    return text
