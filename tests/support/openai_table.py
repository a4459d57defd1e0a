"""The README's "OpenAI API: supported parameters" table, read at test time, and the gateway
stack the tests of its rows share (tests/integration/test_openai_readme_table.py: the supported
rows; test_openai_refused_params.py: the refused ones).

The gateway talks to ``SamplerScheduler``, a scripted stand-in for the scheduler and its workers
that keeps their side of the contract: it ends a request at ``max_new_tokens`` ("length"), at a
token of ``stop_token_ids`` or at EOS unless ``ignore_eos`` ("stop"), attaches ``k`` logprobs when
asked, and samples as vLLM would be observed to: greedy (temperature 0, or top_k 1) is always
"Hello, world!", a seeded sample is a function of (seed, prompt, temperature, top_p, top_k), an
unseeded one is random. (The sim executor could not show seeds or greedy decoding: its tokens are
a hash of the gateway's request id, whatever the sampling parameters.) What the gateway owns --
parsing, forwarding to the scheduler, `n`/seed + i, stop strings, stop reasons, usage, logprobs and
stream shapes, 400s -- is real."""

from __future__ import annotations

import os
import random
import re
import string
from pathlib import Path
from typing import Any, AsyncGenerator, Iterator

import openai
import pytest

from accelgen.v1 import common_pb2, scheduler_pb2
from tests.support.gateway_stack import FakeScheduler, GatewayStack, scripted_logprobs

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## OpenAI API: supported parameters"
MODEL = "fake-model"
GREEDY = "Hello, world!"
EOS = 2  # the byte tokenizer's EOS, which the gateway sends with every request


def enc(text: str) -> list[int]:
    return [3 + b for b in text.encode()]


# ---- the README table ---------------------------------------------------------------------------

def readme_table() -> dict[str, set[str]]:
    """Parameter names by what the AccelGen column says: "supported" (yes..., accepted),
    "accelgen" (AccelGen only), "refused" (no (400)). A name is the backticked text up to a colon
    or space (`logprobs: true` is `logprobs`)."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) > 2 and set(rows[1].replace("|", "").split()) == {"---"}, "no markdown table under " + SECTION
    out: dict[str, set[str]] = {"supported": set(), "accelgen": set(), "refused": set()}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        params, status = cells[0], cells[1]
        names = {re.split(r"[:\s]", p.strip())[0] for p in re.findall(r"`([^`]+)`", params)}
        assert names, f"README row names no parameter in backticks: {row}"
        if status.startswith("yes") or status == "accepted":
            out["supported"] |= names
        elif status == "AccelGen only":
            out["accelgen"] |= names
        elif status == "no (400)":
            out["refused"] |= names
        else:
            raise AssertionError(f"README row with an AccelGen column this test does not know ({status!r}): {row}")
    return out


TABLE = readme_table()


# ---- the stack ----------------------------------------------------------------------------------

class SamplerScheduler(FakeScheduler):
    """The scheduler and a worker as the gateway sees them (module docstring)."""

    finishes: dict[str, str] = {}

    def sample(self, request: scheduler_pb2.SubmitRequest) -> list[int]:
        sp = request.sampling_params
        prompt = list(request.prompt_token_ids)
        limit = sp.max_new_tokens if sp.HasField("max_new_tokens") else self.max_model_len - len(prompt)
        if sp.temperature == 0 or sp.top_k == 1:
            body = enc(GREEDY)
        else:
            key: Any = (sp.seed, prompt, round(sp.temperature, 5), round(sp.top_p, 5), sp.top_k) \
                if sp.HasField("seed") else os.urandom(16)
            rng = random.Random(repr(key))
            body = enc("".join(rng.choice(string.ascii_lowercase) for _ in range(len(GREEDY))))
        tokens = (body * (limit // len(body) + 1))[:limit] if sp.ignore_eos else body + [EOS]
        reason = "length" if sp.ignore_eos else "stop"
        for i, t in enumerate(tokens):
            if t in sp.stop_token_ids:
                tokens, reason = tokens[:i + 1], "stop"
                break
        if len(tokens) > limit:
            tokens, reason = tokens[:limit], "length"
        self.finishes[request.request_id] = reason
        return tokens

    async def _batches(self, request_id: str, start: int) -> AsyncGenerator[scheduler_pb2.TokenBatch, None]:
        rec = self._requests.get(request_id)
        k = rec.submit.sampling_params if rec is not None else None
        async for batch in super()._batches(request_id, start):
            if batch.finished and batch.finish_reason != "abort":
                batch.finish_reason = self.finishes.get(request_id, "stop")
            if k is not None and k.HasField("logprobs"):  # t: -0.25 at rank 2; its top: t+1, t, t+2
                batch.logprobs.extend(scripted_logprobs(batch.token_ids, k.logprobs))
            yield batch


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    s = GatewayStack(SamplerScheduler(), reconnect_timeout_s=3.0)
    yield s
    s.close()


@pytest.fixture
def fresh(stack: GatewayStack) -> GatewayStack:
    stack.reset()
    stack.fake.tokens_for = stack.fake.sample  # type: ignore[attr-defined]
    return stack


@pytest.fixture
def client(fresh: GatewayStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=fresh.http_base + "/v1", api_key="x", max_retries=0, timeout=10)


USER = [{"role": "user", "content": "hi"}]


def _sp(fresh: GatewayStack, i: int = -1) -> common_pb2.SamplingParams:
    return fresh.fake.submits[i].sampling_params


def _reason(choice: Any) -> Any:
    return choice.model_extra["stop_reason"]
