"""The response bodies vLLM's OpenAI server writes, for completions and chat, streamed or not.

One client call may hold several choices (``n`` samples of each prompt of a list): choice
``prompt_index * n + i`` is sample i of prompt ``prompt_index``, as in vLLM. ``usage`` counts
each prompt's tokens once (not once per sample) and every choice's completion tokens, as vLLM
does; a choice cut by a stop string counts its tokens up to the one that completed it.

``StreamWriter`` turns ``(index, Delta)`` pairs into SSE payloads and keeps what a stream needs
between chunks: each choice's tokens so far (``continuous_usage_stats``) and where its next
``text_offset`` starts (completions logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from gateway.generation import Delta, Outcome
from gateway.openai_logprobs import chat_logprobs, completion_logprobs, next_text_offset
from gateway.tokenizer import Tokenizer

Kind = Literal["completion", "chat"]
_OBJECTS: dict[Kind, tuple[str, str]] = {"completion": ("text_completion", "text_completion"),
                                         "chat": ("chat.completion", "chat.completion.chunk")}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def total_usage(prompt_tokens: Sequence[int], completion_tokens: Sequence[int], n: int) -> dict[str, int]:
    """Usage of a call whose choice i had ``prompt_tokens[i]`` and ``completion_tokens[i]``: each
    prompt (every ``n``-th choice starts one) counted once, every completion token."""
    return usage(sum(prompt_tokens[::max(1, n)]), sum(completion_tokens))


@dataclass
class Format:
    """What the client asked of the response's shape."""

    kind: Kind
    logprobs: int | None = None        # top-k per token; None: no logprobs
    n: int = 1
    include_usage: bool = False
    continuous_usage: bool = False


def _logprobs(fmt: Format, tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[Any],
              text_offset: int = 0) -> dict[str, Any] | None:
    if fmt.logprobs is None:
        return None
    if fmt.kind == "completion":
        return completion_logprobs(token_ids, logprobs, fmt.logprobs, tokenizer, text_offset)
    return chat_logprobs(token_ids, logprobs, fmt.logprobs, tokenizer)


def full_response(fmt: Format, rid: str, created: int, model: str, outcomes: Sequence[Outcome],
                  tokenizer: Tokenizer) -> dict[str, Any]:
    """The one JSON answer of a non-streaming call."""
    choices = []
    for i, o in enumerate(outcomes):
        lp = _logprobs(fmt, tokenizer, o.output_ids, o.logprobs)
        if fmt.kind == "completion":
            choice: dict[str, Any] = {"index": i, "text": o.text, "logprobs": lp}
        else:
            choice = {"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": lp}
        choice.update(finish_reason=o.finish_reason, stop_reason=o.stop_reason)
        choices.append(choice)
    return {"id": rid, "object": _OBJECTS[fmt.kind][0], "created": created, "model": model, "choices": choices,
            "usage": total_usage([o.prompt_tokens for o in outcomes], [o.completion_tokens for o in outcomes],
                                 fmt.n)}


@dataclass
class StreamWriter:
    """The SSE payloads of one streaming call with ``len(prompt_tokens)`` choices."""

    fmt: Format
    rid: str
    created: int
    model: str
    tokenizer: Tokenizer
    prompt_tokens: list[int]                        # per choice
    completion_tokens: list[int] = field(default_factory=list)
    _text_offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.completion_tokens = [0] * len(self.prompt_tokens)
        self._text_offsets = [0] * len(self.prompt_tokens)

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.rid, "object": _OBJECTS[self.fmt.kind][1], "created": self.created, "model": self.model,
                "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        """Chat's first chunk per choice: the role, with empty content (vLLM sends it before any token)."""
        if self.fmt.kind != "chat":
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(len(self.prompt_tokens))]

    def chunk(self, index: int, d: Delta) -> dict[str, Any] | None:
        """The payload of one delta of choice ``index`` (None: nothing to send, as vLLM skips an
        empty first delta)."""
        if not d.text and not d.token_ids and not self.completion_tokens[index] and not d.finished:
            return None
        self.completion_tokens[index] = d.completion_tokens
        lp = _logprobs(self.fmt, self.tokenizer, d.token_ids, d.logprobs, self._text_offsets[index])
        if lp is not None and self.fmt.kind == "completion":
            self._text_offsets[index] = next_text_offset(lp, self._text_offsets[index])
        finish = d.finish_reason if d.finished else None
        if self.fmt.kind == "completion":
            choice: dict[str, Any] = {"index": index, "text": d.text, "logprobs": lp, "finish_reason": finish,
                                      "stop_reason": d.stop_reason if d.finished else None}
        else:
            choice = {"index": index, "delta": {"content": d.text}, "logprobs": lp, "finish_reason": finish}
            if d.finished:
                choice["stop_reason"] = d.stop_reason
        payload = self._chunk(choice)
        if self.fmt.continuous_usage:
            payload["usage"] = usage(self.prompt_tokens[index], self.completion_tokens[index])
        return payload

    def closing(self) -> dict[str, Any] | None:
        """The usage chunk (no choices) when the client asked for it."""
        if not self.fmt.include_usage:
            return None
        return {"id": self.rid, "object": _OBJECTS[self.fmt.kind][1], "created": self.created, "model": self.model,
                "choices": [], "usage": total_usage(self.prompt_tokens, self.completion_tokens, self.fmt.n)}
