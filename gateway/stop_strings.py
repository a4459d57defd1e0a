"""A request's output text as vLLM makes it: incremental detokenisation, stop strings, hold-back.

Stop strings are text, so they are found where the text is made: here, in the gateway, token by
token as the scheduler delivers them. The rules are vLLM's (``vllm/v1/engine/detokenizer.py``,
``BaseIncrementalDetokenizer`` and ``check_stop_strings``), so a client sees the same output
from AccelGen as from ``vllm serve``:

* the text is checked after every batch of new tokens, for the stop string that completes
  earliest in it (ties: the first in the client's list), which is what appending one token at
  a time would find;
* the output is cut before the stop string (or after it with ``include_stop_str_in_output``);
  the token that completed the stop string is the output's last token (it is counted in
  ``completion_tokens``), tokens delivered after it in the same batch are dropped;
* a token that ended the request at the scheduler (EOS or one of ``stop_token_ids``) stays in
  the token ids but adds no text, unless ``include_stop_str_in_output``;
* while streaming, the last ``max(len(stop)) - 1`` characters are held back (they could be the
  start of a stop string) until more text arrives or the request finishes;
* an incomplete character at the very end (the output ended inside a multi-byte character) is
  left out, as vLLM's detokenizers leave it out (before, the gateway ended the text with U+FFFD).

``OutputText`` is pure (no I/O): ``gateway.generation`` feeds it the token batches and, when a
stop string ended the request, finishes it at the scheduler as "stop" with its output up to the
token that completed the string (a Cancel with ``finish_reason`` "stop"), so the scheduler's state
and metrics say finished, not cancelled. The stop strings are stored with the request, so an
Attach through any gateway cuts the output at the same token.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from dataclasses import dataclass
from typing import Sequence

from gateway.tokenizer import IncrementalDetokenizer

MAX_STOP_STRINGS = 16      # a request's stop strings at most (each is searched after every token)
MAX_STOP_CHARS = 256       # characters of one stop string at most (the stream holds back that many)


def check_stop_strings(output_text: str, new_char_count: int, stop: Sequence[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """vLLM's ``check_stop_strings``: ``(stop string, offset to cut the text to)`` when one of
    ``stop`` completes in the last ``new_char_count`` characters of ``output_text`` (offset -1:
    no cut), else None. The stop string that completes earliest wins; ties go to list order."""
    if not new_char_count or not stop:
        return None
    best_stop_str: str | None = None
    best_stop_index = 0
    best_end = sys.maxsize
    for stop_str in stop:
        stop_index = output_text.find(stop_str, 1 - new_char_count - len(stop_str))  # only new text
        if stop_index == -1:
            continue
        end = stop_index + len(stop_str)
        if end < best_end:
            best_stop_str, best_stop_index, best_end = stop_str, stop_index, end
    if best_stop_str is None:
        return None
    if include_in_output:
        return (best_stop_str, -1) if best_end >= len(output_text) else (best_stop_str, best_end)
    return best_stop_str, best_stop_index


@dataclass(frozen=True)
class Update:
    """What one batch of tokens did: how many of them stay in the output (all of them unless a
    stop string ended it) and the stop string that ended it, if one did."""

    kept: int
    stop_string: str | None


class OutputText:
    """The output text of one request and its stop strings (module doc)."""

    def __init__(self, detok: IncrementalDetokenizer, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        self._detok = detok
        self.stop = list(stop)
        self.include_stop = include_stop_str_in_output
        # vLLM's stop_buffer_length: what a stream holds back while a stop string may be starting.
        self.buffer = max(len(s) for s in self.stop) - 1 if self.stop and not self.include_stop else 0
        self.text = ""
        self._sent = 0  # characters of ``text`` already handed out by ``next_text``

    def update(self, new_ids: Sequence[int], stop_terminated: bool) -> Update:
        """Add ``new_ids``; ``stop_terminated``: the last of them ended the request at the
        scheduler (EOS or a stop token id), so it adds no text unless stop strings are kept."""
        if not new_ids:
            return Update(0, None)
        decoded = list(new_ids[:-1]) if stop_terminated and not self.include_stop else list(new_ids)
        offsets = [len(self.text)]  # the text's length after each new token
        for token in decoded:
            self.text += self._detok.add([token])
            offsets.append(len(self.text))
        if len(decoded) < len(new_ids):
            offsets.append(len(self.text))
        found = check_stop_strings(self.text, len(self.text) - offsets[0], self.stop, self.include_stop)
        if found is None:
            return Update(len(new_ids), None)
        stop_string, truncate_to = found
        stop_end = len(self.text) if truncate_to == -1 else truncate_to
        if not self.include_stop:
            stop_end += len(stop_string)
        kept = bisect_left(offsets, stop_end, lo=1)  # up to the token that completed the stop string
        if truncate_to != -1:
            self.text = self.text[:truncate_to]
        return Update(kept, stop_string)

    def next_text(self, finished: bool) -> str:
        """The text not handed out yet, less the hold-back while the request is not finished
        (vLLM's ``get_next_output_text`` in delta mode)."""
        end = len(self.text) - (0 if finished else self.buffer)
        if self._sent < end:
            out, self._sent = self.text[self._sent:end], end
            return out
        return ""
