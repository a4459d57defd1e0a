"""The KV growth reserve: admit a request only if what is already running can still grow.

A prompt admitted into the last free blocks forces a preemption a few iterations later, when
the running requests need blocks for their next tokens, and the victim's prefill is wasted.
So an SLO-aware policy reserves, at admission, the blocks each running request is still
expected to grow by (its prompt plus ``headroom_tokens`` of output, or more once it has
produced more), and admits a prompt only if all of it plus its own headroom fits beside that
reserve. AccelGen and EDF share this rule; vLLM and Sarathi-Serve keep their own (none).
"""

from __future__ import annotations

from typing import Callable, Iterable

from accelgen.core.kv_blocks import KVBlockManager, blocks_for_tokens
from accelgen.core.request import Request

ExpectedFinal = Callable[[Request], int]
"""Tokens a request is expected to hold in KV when it finishes."""


def headroom_final_tokens(request: Request, headroom_tokens: int, max_model_len: int) -> int:
    """Prompt plus the headroom, or what it holds now plus one if it already produced more."""
    expected = max(request.num_tokens + 1, request.num_prompt_tokens + headroom_tokens)
    return min(expected, max_model_len)


def growth_blocks(kv: KVBlockManager, requests: Iterable[Request], expected_final: ExpectedFinal) -> int:
    """Blocks the given (running) requests are still expected to grow by."""
    bs = kv.block_size
    total = 0
    for r in requests:
        grow = blocks_for_tokens(expected_final(r), bs) - kv.num_blocks_of(r.request_id)
        if grow > 0:
            total += grow
    return total


def headroom_growth_blocks(kv: KVBlockManager, running: Iterable[Request], headroom_tokens: int,
                           max_model_len: int) -> int:
    """``growth_blocks`` with ``headroom_final_tokens``, inlined: AccelGen runs it over every
    running request on every iteration that admits, the hot path of its decision."""
    bs = kv.block_size
    tables = kv._tables
    total = 0
    for r in running:
        n = r.num_prompt_tokens + len(r.output_token_ids) + 1
        expected = r.num_prompt_tokens + headroom_tokens
        if n > expected:
            expected = n
        if expected > max_model_len:
            expected = max_model_len
        table = tables.get(r.request_id)
        grow = -(-expected // bs) - (len(table) if table else 0)
        if grow > 0:
            total += grow
    return total


def admission_reserve_blocks(request: Request, kv: KVBlockManager, tokens_left: int,
                             expected_final: ExpectedFinal, reserved_growth: int) -> int:
    """Blocks that must stay free beyond a waiting request's first chunk for it to be admitted:
    the rest of its prompt and headroom, plus the growth reserved for the running requests."""
    whole = blocks_for_tokens(expected_final(request), kv.block_size)
    first = blocks_for_tokens(min(request.num_tokens, max(1, tokens_left)), kv.block_size)
    return max(0, whole - first) + reserved_growth
