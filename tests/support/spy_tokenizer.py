"""A tokenizer that remembers what it was given: tests of the gateway's size caps check that a
refused prompt never reached it (a cap checked after tokenising protects nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from gateway.tokenizer import ByteTokenizer, Message

if TYPE_CHECKING:
    from tests.support.gateway_stack import GatewayStack


class SpyTokenizer(ByteTokenizer):
    """The byte tokenizer, remembering the length of every text it was given (class-wide: the
    gateway builds its own instance; clear ``seen`` before each test)."""

    seen: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.seen.append(len(text))
        return super().encode(text)

    def apply_chat(self, messages: Sequence[Message]) -> str:
        self.seen.append(sum(len(m["content"]) for m in messages))
        return super().apply_chat(messages)


def gateway_with_spy(**config: Any) -> "GatewayStack":
    """A ``GatewayStack`` (fake scheduler) whose gateway tokenises with a ``SpyTokenizer``."""
    import pytest

    from tests.support.gateway_stack import GatewayStack

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gateway.main.load_tokenizer", lambda _path: SpyTokenizer())
        return GatewayStack(**config)


def fresh_spied(stack: "GatewayStack") -> "GatewayStack":
    """``stack`` (from ``gateway_with_spy``) reset for a test: its fake scheduler's record and what
    the spy has seen."""
    stack.reset()
    SpyTokenizer.seen.clear()
    return stack
