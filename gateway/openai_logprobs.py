"""Logprobs in the shapes vLLM's OpenAI server writes them, from ``Delta``/``Outcome.logprobs``.

vLLM keeps, for each output position, a dict ``{token id: Logprob}`` that starts with the
sampled token and goes on with the top-k in rank order (a sampled token that is among the top-k
appears once, at the front: ``append_logprobs_for_next_position``). The two APIs read it
differently, and we reproduce both exactly (``vllm/entrypoints/openai/*/serving.py``):

* completions (``logprobs: k``): ``{tokens, token_logprobs, top_logprobs, text_offset}``, where
  each ``top_logprobs`` entry is a dict *token string -> logprob* of that whole dict (up to
  k + 1 entries: the sampled token and the top k; equal strings collapse into one key), and
  ``text_offset`` counts characters of the token strings from where the previous chunk ended;
* chat (``logprobs: true, top_logprobs: k``): ``{content: [{token, logprob, bytes,
  top_logprobs}]}``, where ``top_logprobs`` is the dict's first k entries (so a sampled token
  outside the top k takes the first place and the k-th most likely is left out, as in vLLM).

Logprobs are floored at -9999.0 (JSON has no -inf). A token's string is the tokenizer's decoding
of that token alone (vLLM's ``convert_ids_list_to_tokens`` less its SentencePiece leading-space
repair). A position without logprobs (a scheduler that sent none) gets vLLM's fallback: the
token string with no logprob.
"""

from __future__ import annotations

from typing import Any, Sequence

from gateway.logprobs import TokenLogprobInfo
from gateway.tokenizer import Tokenizer

FLOOR = -9999.0


def _floored(logprob: float) -> float:
    return max(float(logprob), FLOOR)


def ranked(entry: TokenLogprobInfo, k: int) -> list[tuple[int, float]]:
    """vLLM's per-position dict as ``(token id, logprob)`` pairs: the sampled token, then the top
    ``k`` by rank, each token once (at its first place)."""
    out: dict[int, float] = {entry.token_id: entry.logprob}
    for token_id, logprob in entry.top[:k]:
        out.setdefault(token_id, logprob)
    return list(out.items())


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _entry(logprobs: Sequence[TokenLogprobInfo], i: int, token_id: int) -> TokenLogprobInfo | None:
    entry = logprobs[i] if i < len(logprobs) else None
    return entry if entry is not None and entry.token_id == token_id else None


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobInfo], k: int,
                        tokenizer: Tokenizer, initial_text_offset: int = 0) -> dict[str, Any]:
    """The ``logprobs`` of a completion choice (or of one streamed chunk, from
    ``initial_text_offset``: where the previous chunk's tokens ended)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    last_len = 0
    for i, token_id in enumerate(token_ids):
        entry = _entry(logprobs, i, token_id)
        token = token_text(tokenizer, token_id)
        tokens.append(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(_floored(entry.logprob))
            top_logprobs.append({token_text(tokenizer, t): _floored(lp) for t, lp in ranked(entry, k)})
        text_offset.append(initial_text_offset if not text_offset else text_offset[-1] + last_len)
        last_len = len(token)
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}


def next_text_offset(formatted: dict[str, Any], current: int) -> int:
    """Where the next streamed chunk's ``text_offset`` starts (vLLM's ``next_text_offsets``)."""
    if not formatted["tokens"]:
        return current
    return int(formatted["text_offset"][-1]) + len(formatted["tokens"][-1])


def _chat_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _floored(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobInfo], k: int,
                  tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``logprobs`` of a chat choice (or of one streamed chunk)."""
    content = []
    for i, token_id in enumerate(token_ids):
        entry = _entry(logprobs, i, token_id)
        token = token_text(tokenizer, token_id)
        if entry is None:
            item = _chat_logprob(token, FLOOR)
            item["top_logprobs"] = []
        else:
            item = _chat_logprob(token, entry.logprob)
            item["top_logprobs"] = [_chat_logprob(token_text(tokenizer, t), lp) for t, lp in ranked(entry, k)[:k]]
        content.append(item)
    return {"content": content}
