"""``FieldError``: a value outside its allowed range, named by the field it came from.

The core types check their own invariants (``SamplingParams``, ``SLO``) and raise this with
their own field names; the converters in ``accelgen.wire`` rename the field to what the client
wrote (``sampling_params.max_new_tokens`` over gRPC, ``max_tokens`` over HTTP), so one rule has
one implementation and every front end reports it in its own words.
"""

from __future__ import annotations

from typing import Mapping

_UNSET = object()


class FieldError(ValueError):
    """``field`` breaks ``rule``; ``str()`` is the whole message, e.g. "top_p must be in (0, 1], got 2"."""

    def __init__(self, field: str, rule: str, value: object = _UNSET) -> None:
        self.field = field
        self.rule = rule
        self.value = value
        shown = "" if value is _UNSET else f", got {value}"
        super().__init__(f"{field} {rule}{shown}")

    def renamed(self, names: Mapping[str, str]) -> "FieldError":
        """The same error under the name the client used for the field (unchanged if unmapped)."""
        return FieldError(names.get(self.field, self.field), self.rule, self.value)
