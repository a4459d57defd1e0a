"""Logprobs formatted as vLLM's OpenAI server formats them: ``gateway.openai_logprobs`` against
vLLM's own ``_create_completion_logprobs`` / ``_create_chat_logprobs`` on the same numbers."""

from __future__ import annotations

import inspect
import random
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.logprobs import TokenLogprobInfo
from gateway.openai_logprobs import chat_logprobs, completion_logprobs, next_text_offset
from gateway.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
A, B, C = (TOK.encode(c)[0] for c in "abc")


def lp(token: int, logprob: float, rank: int, *top: tuple[int, float]) -> TokenLogprobInfo:
    return TokenLogprobInfo(token_id=token, logprob=logprob, rank=rank, top=list(top))


def test_completion_shape_with_the_sampled_token_outside_the_top_k() -> None:
    out = completion_logprobs([A, B], [lp(A, -2.0, 3, (B, -0.5), (C, -1.0)), lp(B, -0.1, 1, (B, -0.1), (A, -3.0))],
                              2, TOK, initial_text_offset=5)
    assert out == {"tokens": ["a", "b"], "token_logprobs": [-2.0, -0.1], "text_offset": [5, 6],
                   "top_logprobs": [{"a": -2.0, "b": -0.5, "c": -1.0}, {"b": -0.1, "a": -3.0}]}
    assert next_text_offset(out, 5) == 7


def test_chat_shape_takes_the_first_k_of_sampled_then_top() -> None:
    out = chat_logprobs([A], [lp(A, float("-inf"), 3, (B, -0.5), (C, -1.0))], 2, TOK)
    assert out == {"content": [{"token": "a", "logprob": -9999.0, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -9999.0, "bytes": [97]}, {"token": "b", "logprob": -0.5, "bytes": [98]}]}]}
    assert chat_logprobs([A], [lp(A, -1.0, 2, (B, -0.5))], 0, TOK)["content"][0]["top_logprobs"] == []


def test_tokens_without_logprobs_get_vllms_fallback() -> None:
    assert completion_logprobs([A], [], 1, TOK)["top_logprobs"] == [None]
    assert chat_logprobs([A], [], 1, TOK)["content"] == [{"token": "a", "logprob": -9999.0, "bytes": [97],
                                                         "top_logprobs": []}]


# ---- the same numbers through vLLM's own formatting ------------------------------------------

def _vllm_positions(entries: list[TokenLogprobInfo], k: int) -> list[dict[int, Any]]:
    logprobs_mod = pytest.importorskip("vllm.logprobs")
    positions: list[dict[int, Any]] = []
    for e in entries:
        top = e.top[:k]
        token_ids = [e.token_id] + [t for t, _ in top]
        values = [e.logprob] + [v for _, v in top]
        logprobs_mod.append_logprobs_for_next_position(positions, token_ids, values,
                                                       [TOK.decode([t]) for t in token_ids], e.rank, k)
    return positions


def _fake_serving(cls: Any) -> Any:
    fake = SimpleNamespace(return_tokens_as_token_ids=False)
    for name in ("_get_decoded_token", "_get_top_logprobs"):
        if hasattr(cls, name):
            static = isinstance(inspect.getattr_static(cls, name), staticmethod)
            setattr(fake, name, getattr(cls, name) if static else getattr(cls, name).__get__(fake))
    return fake


def _random_entries(rng: random.Random, n: int, k: int) -> list[TokenLogprobInfo]:
    vocab = TOK.encode("abcdefgh é")
    out = []
    for _ in range(n):
        top_ids = rng.sample(vocab, k)
        top = sorted(((t, -rng.random() * 5) for t in top_ids), key=lambda p: -p[1])
        if rng.random() < 0.5 and top:
            rank = rng.randint(1, k)
            token, value = top[rank - 1]
        else:
            token, value, rank = rng.choice(vocab), -5 - rng.random() * 20, k + 1 + rng.randint(0, 5)
            if token in top_ids:
                rank = top_ids.index(token) + 1
                value = dict(top)[token]
        out.append(lp(token, value, rank, *top))
    return out


@pytest.mark.vllm
def test_completion_and_chat_match_vllm() -> None:
    completion = pytest.importorskip("vllm.entrypoints.openai.completion.serving").OpenAIServingCompletion
    chat = pytest.importorskip("vllm.entrypoints.openai.chat_completion.serving").OpenAIServingChat
    rng = random.Random(7)
    for _ in range(100):
        k = rng.randint(0, 4)
        entries = _random_entries(rng, rng.randint(1, 6), k)
        token_ids = [e.token_id for e in entries]
        positions = _vllm_positions(entries, k)
        theirs = completion._create_completion_logprobs(
            _fake_serving(completion), token_ids=token_ids, top_logprobs=positions, num_output_top_logprobs=k,
            tokenizer=TOK, initial_text_offset=3)
        assert completion_logprobs(token_ids, entries, k, TOK, 3) == theirs.model_dump()
        theirs_chat = chat._create_chat_logprobs(
            _fake_serving(chat), token_ids=token_ids, top_logprobs=positions, tokenizer=TOK,
            num_output_top_logprobs=k, return_as_token_id=False)
        assert chat_logprobs(token_ids, entries, k, TOK) == theirs_chat.model_dump()
