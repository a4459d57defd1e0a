"""Every supported parameter of the README's "OpenAI API: supported parameters" table, with the
official `openai` client, against a real gateway (tests/support/openai_table.py: the table and the
stack).

Each parameter in backticks of a row whose AccelGen column says "yes" / "accepted" / "AccelGen
only" must have an entry in ``SUPPORTED`` (a function that sends it and checks the documented
behaviour), so a row added to the table without a test fails ``test_registry_covers_*``. The
refused rows: test_openai_refused_params.py."""

from __future__ import annotations

from typing import Callable

import httpx
import openai
import pytest

from tests.support.gateway_stack import GatewayStack
from tests.support.openai_table import GREEDY, MODEL, TABLE, USER, _reason, _sp, enc
from tests.support.openai_table import client, fresh, stack  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.integration


# ---- what each supported parameter does -----------------------------------------------------------

def check_prompt(fresh: GatewayStack, client: openai.OpenAI) -> None:
    one = client.completions.create(model=MODEL, prompt="hi", temperature=0)
    assert one.choices[0].text == GREEDY and list(fresh.fake.submits[0].prompt_token_ids) == enc("hi")
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], temperature=0)
    assert ids.usage.prompt_tokens == 3 and list(fresh.fake.submits[1].prompt_token_ids) == [5, 6, 7]
    listed = client.completions.create(model=MODEL, prompt=["ab", "cde"], n=2, seed=1, max_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in listed.choices] == [0, 1, 2, 3]  # prompt_index * n + i
    assert [list(s.prompt_token_ids) for s in fresh.fake.submits[2:]] == [enc("ab")] * 2 + [enc("cde")] * 2
    assert (listed.usage.prompt_tokens, listed.usage.completion_tokens) == (5, 16)
    tok_lists = client.completions.create(model=MODEL, prompt=[[5, 6], [7]], temperature=0)
    assert [c.text for c in tok_lists.choices] == [GREEDY, GREEDY] and tok_lists.usage.prompt_tokens == 3
    assert [list(s.prompt_token_ids) for s in fresh.fake.submits[-2:]] == [[5, 6], [7]]
    with pytest.raises(openai.BadRequestError, match="n"):  # at most 128 choices per call
        client.completions.create(model=MODEL, prompt=["a"] * 65, n=2)


def check_messages(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == GREEDY and reply.choices[0].message.role == "assistant"
    parts = client.chat.completions.create(model=MODEL, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert parts.choices[0].message.content == GREEDY
    prompts = [bytes(t - 3 for t in s.prompt_token_ids).decode() for s in fresh.fake.submits]
    assert prompts == ["system: be brief\nuser: hi\nassistant:", "user: a\nb\nassistant:"]
    with pytest.raises(openai.BadRequestError, match="image_url"):  # images are refused
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert len(fresh.fake.submits) == 2


def check_max_tokens(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="hi", max_tokens=5, extra_body={"ignore_eos": True})
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (5, "length")
    assert _sp(fresh).max_new_tokens == 5 and _reason(reply.choices[0]) is None
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == GREEDY[:4] and chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 4
    client.completions.create(model=MODEL, prompt="hi")
    assert _sp(fresh).max_new_tokens == 16  # the OpenAI default for completions; chat runs to the context


def check_max_completion_tokens(fresh: GatewayStack, client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=3, temperature=0)
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (GREEDY[:3], "length")
    assert chat.usage.completion_tokens == 3 and _sp(fresh).max_new_tokens == 3
    both = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=2, max_tokens=9,
                                          temperature=0)
    assert both.usage.completion_tokens == 2  # max_completion_tokens wins, as in vLLM
    unset = client.chat.completions.create(model=MODEL, messages=USER, temperature=0)
    assert not _sp(fresh).HasField("max_new_tokens") and unset.choices[0].finish_reason == "stop"


def check_temperature(fresh: GatewayStack, client: openai.OpenAI) -> None:
    greedy = [client.completions.create(model=MODEL, prompt="hi", temperature=0).choices[0].text for _ in range(2)]
    assert greedy == [GREEDY, GREEDY] and _sp(fresh).temperature == 0
    hot = [client.completions.create(model=MODEL, prompt="hi", temperature=0.7).choices[0].text for _ in range(2)]
    assert hot[0] != hot[1] and GREEDY not in hot and _sp(fresh).temperature == pytest.approx(0.7)
    client.completions.create(model=MODEL, prompt="hi")
    assert _sp(fresh).temperature == 1.0  # OpenAI's default, not greedy
    chat = client.chat.completions.create(model=MODEL, messages=USER, temperature=0)
    assert chat.choices[0].message.content == GREEDY and _sp(fresh).temperature == 0


def check_top_p(fresh: GatewayStack, client: openai.OpenAI) -> None:
    a = client.completions.create(model=MODEL, prompt="hi", seed=4, top_p=0.5)
    assert _sp(fresh).top_p == 0.5
    b = client.completions.create(model=MODEL, prompt="hi", seed=4, top_p=0.5)
    c = client.completions.create(model=MODEL, prompt="hi", seed=4)
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text and _sp(fresh).top_p == 1.0
    client.chat.completions.create(model=MODEL, messages=USER, top_p=0.25)
    assert _sp(fresh).top_p == 0.25
    with pytest.raises(openai.BadRequestError, match="top_p"):  # 0 would mean "unset" downstream
        client.completions.create(model=MODEL, prompt="hi", top_p=0)


def check_top_k(fresh: GatewayStack, client: openai.OpenAI) -> None:
    one = client.completions.create(model=MODEL, prompt="hi", temperature=1, extra_body={"top_k": 1})
    assert one.choices[0].text == GREEDY and _sp(fresh).top_k == 1  # top_k 1 samples greedily
    client.chat.completions.create(model=MODEL, messages=USER, extra_body={"top_k": 40})
    assert _sp(fresh).top_k == 40
    client.completions.create(model=MODEL, prompt="hi", extra_body={"top_k": -1})
    assert _sp(fresh).top_k == 0  # vLLM's -1: disabled


def check_seed(fresh: GatewayStack, client: openai.OpenAI) -> None:
    def text(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="hi", temperature=0.8, seed=seed).choices[0].text

    assert text(11) == text(11) != text(12) and _sp(fresh).seed == 12
    chat = [client.chat.completions.create(model=MODEL, messages=USER, seed=3).choices[0].message.content
            for _ in range(2)]
    assert chat[0] == chat[1] and _sp(fresh).seed == 3
    n = client.completions.create(model=MODEL, prompt="hi", temperature=0.8, seed=11, n=2)
    assert [c.text for c in n.choices] == [text(11), text(12)]  # sample i uses seed + i


def check_ignore_eos(fresh: GatewayStack, client: openai.OpenAI) -> None:
    ends = client.completions.create(model=MODEL, prompt="hi", max_tokens=30, temperature=0)
    assert (ends.choices[0].text, ends.choices[0].finish_reason) == (GREEDY, "stop")
    assert ends.usage.completion_tokens == len(GREEDY) + 1 and _reason(ends.choices[0]) is None  # EOS counted
    on = client.completions.create(model=MODEL, prompt="hi", max_tokens=30, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert on.choices[0].finish_reason == "length" and on.usage.completion_tokens == 30
    assert on.choices[0].text == (GREEDY * 3)[:30] and _sp(fresh).ignore_eos


def check_stop_token_ids(fresh: GatewayStack, client: openai.OpenAI) -> None:
    comma = enc(",")[0]
    reply = client.completions.create(model=MODEL, prompt="hi", temperature=0, extra_body={"stop_token_ids": [comma]})
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason, _reason(choice)) == ("Hello", "stop", comma)
    assert reply.usage.completion_tokens == len("Hello,") and list(_sp(fresh).stop_token_ids) == [comma]
    chat = client.chat.completions.create(model=MODEL, messages=USER, temperature=0,
                                          extra_body={"stop_token_ids": [enc("w")[0], comma]})
    assert chat.choices[0].message.content == "Hello" and _reason(chat.choices[0]) == comma


def check_stop_reason(fresh: GatewayStack, client: openai.OpenAI) -> None:
    bang = enc("!")[0]
    by_id = client.completions.create(model=MODEL, prompt="hi", temperature=0, extra_body={"stop_token_ids": [bang]})
    assert (by_id.choices[0].finish_reason, _reason(by_id.choices[0])) == ("stop", bang)
    by_eos = client.completions.create(model=MODEL, prompt="hi", temperature=0, extra_body={"stop_token_ids": [5]})
    assert (by_eos.choices[0].finish_reason, _reason(by_eos.choices[0])) == ("stop", None)
    by_len = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert (by_len.choices[0].finish_reason, _reason(by_len.choices[0])) == ("length", None)
    by_str = client.completions.create(model=MODEL, prompt="hi", temperature=0, stop="wor")
    assert _reason(by_str.choices[0]) == "wor"
    chunks = list(client.completions.create(model=MODEL, prompt="hi", temperature=0, stream=True,
                                            extra_body={"stop_token_ids": [bang]}))
    assert [_reason(c.choices[0]) for c in chunks if c.choices[0].finish_reason] == [bang]


def check_n(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="hi", n=3, max_tokens=4, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(fresh.fake.submits) == 3
    assert len({c.text for c in reply.choices}) == 3  # n independent (unseeded) samples
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 12)  # the prompt counted once
    chat = client.chat.completions.create(model=MODEL, messages=USER, n=2, seed=5)
    assert [c.index for c in chat.choices] == [0, 1] and [s.sampling_params.seed for s in fresh.fake.submits[3:]] \
        == [5, 6]
    with pytest.raises(openai.BadRequestError, match="n"):  # n > 1 needs temperature > 0
        client.completions.create(model=MODEL, prompt="hi", n=2, temperature=0)


def check_stop(fresh: GatewayStack, client: openai.OpenAI) -> None:
    fresh.fake.batch_size = 4
    reply = client.completions.create(model=MODEL, prompt="hi", temperature=0, stop=[", w", "zz"], max_tokens=20)
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason, _reason(choice)) == ("Hello", "stop", ", w")
    assert reply.usage.completion_tokens == len("Hello, w")  # the token that completed it is the last counted
    assert fresh.wait_for(lambda: fresh.fake.submits[0].request_id in fresh.fake.cancels)  # cut at the scheduler
    one = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, stop="d")
    assert (one.choices[0].message.content, _reason(one.choices[0])) == ("Hello, worl", "d")
    streamed = list(client.chat.completions.create(model=MODEL, messages=USER, temperature=0, stop="world",
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "Hello, "  # never sent
    assert [_reason(c.choices[0]) for c in streamed if c.choices[0].finish_reason] == ["world"]
    fresh.fake.batch_size = 1  # a token a chunk: streams hold back max(len(stop)) - 1 = 3 characters
    held = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="hi", temperature=0,
                                                                 stop=["q", "zzzz"], stream=True)]
    assert held[:4] == ["", "", "", "H"] and "".join(held) == GREEDY
    for bad in (["x"] * 17, [""], "x" * 257):  # at most 16 strings of 1..256 characters
        with pytest.raises(openai.BadRequestError, match="stop"):
            client.completions.create(model=MODEL, prompt="hi", stop=bad)


def check_include_stop_str_in_output(fresh: GatewayStack, client: openai.OpenAI) -> None:
    keep = {"include_stop_str_in_output": True}
    kept = client.completions.create(model=MODEL, prompt="hi", temperature=0, stop="o, ", extra_body=keep)
    assert kept.choices[0].text == "Hello, " and _reason(kept.choices[0]) == "o, "
    bang = enc("!")[0]
    tok = client.completions.create(model=MODEL, prompt="hi", temperature=0,
                                    extra_body={**keep, "stop_token_ids": [bang]})
    assert tok.choices[0].text == GREEDY and _reason(tok.choices[0]) == bang  # the stop token's text too
    chat = list(client.chat.completions.create(model=MODEL, messages=USER, temperature=0, stop="wor", stream=True,
                                               extra_body=keep))
    assert "".join(c.choices[0].delta.content or "" for c in chat) == "Hello, wor"


def check_logprobs(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="hi", temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.tokens == list(GREEDY) + [""] and lp.token_logprobs == [-0.25] * 14  # EOS's too, with no text
    assert lp.text_offset == list(range(14)) and _sp(fresh).logprobs == 2 and reply.usage.completion_tokens == 14
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # up to k + 1: the sampled token, then the top k
    assert lp.top_logprobs[0] == {"H": -0.25, "I": -0.125}
    zero = client.completions.create(model=MODEL, prompt="hi", temperature=0, logprobs=0)
    assert zero.choices[0].logprobs.top_logprobs[0] == {"H": -0.25}
    chunks = list(client.completions.create(model=MODEL, prompt="hi", temperature=0, logprobs=1, stream=True))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == list(GREEDY) + [""]
    plain = client.completions.create(model=MODEL, prompt="hi")
    assert plain.choices[0].logprobs is None
    for bad in (21, -1):  # k in 0..20; -1 (all) refused
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(model=MODEL, prompt="hi", logprobs=bad)


def check_top_logprobs(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == list(GREEDY) + [""] and all(c.logprob == -0.25 for c in content)
    assert len(content) == reply.usage.completion_tokens  # one per token, EOS included
    assert content[0].bytes == [ord("H")] and _sp(fresh).logprobs == 2
    # vLLM's order: the sampled token's entry first, then the top ones, k in all
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("H", -0.25), ("I", -0.125)]
    bare = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content) and _sp(fresh).logprobs == 0
    for extra in ({"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2}):  # k in 0..20; needs logprobs
        with pytest.raises(openai.BadRequestError, match="top_logprobs"):
            client.chat.completions.create(model=MODEL, messages=USER, **extra)


def check_stream(fresh: GatewayStack, client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="hi", temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == GREEDY
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in chunks)
    chat = list(client.chat.completions.create(model=MODEL, messages=USER, temperature=0, n=1, stream=True))
    assert (chat[0].choices[0].delta.role, chat[0].choices[0].delta.content) == ("assistant", "")
    assert "".join(c.choices[0].delta.content or "" for c in chat) == GREEDY
    two = list(client.chat.completions.create(model=MODEL, messages=USER, n=2, seed=1, stream=True))
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in two[:2]] == [(0, "assistant"), (1, "assistant")]


def check_include_usage(fresh: GatewayStack, client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="hi", temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (2, 14, 16)
    chat = list(client.chat.completions.create(model=MODEL, messages=USER, n=2, stream=True, max_tokens=3,
                                               stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError, match="stream_options"):  # only with stream: true
        client.completions.create(model=MODEL, prompt="hi", stream_options={"include_usage": True})


def check_continuous_usage_stats(fresh: GatewayStack, client: openai.OpenAI) -> None:
    fresh.fake.batch_size = 5
    chunks = list(client.completions.create(model=MODEL, prompt="hi", temperature=0, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))  # type: ignore[typeddict-unknown-key]
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 14 and len(counts) >= 4
    assert all(c.usage.prompt_tokens == 2 for c in chunks) and chunks[-1].choices == []


def check_user(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="hi", temperature=0, user="alice")
    chat = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, user="alice")
    assert reply.choices[0].text == chat.choices[0].message.content == GREEDY and len(fresh.fake.submits) == 2


def check_model(fresh: GatewayStack, client: openai.OpenAI) -> None:
    served = client.models.list().data[0].id
    assert served == MODEL and client.completions.create(model=served, prompt="hi").choices
    r = httpx.post(fresh.http_base + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert r.status_code == 200, r.text  # left out: the served model
    for call in (lambda: client.completions.create(model="gpt-4", prompt="hi"),
                 lambda: client.chat.completions.create(model="gpt-4", messages=USER)):
        with pytest.raises(openai.NotFoundError, match="gpt-4"):
            call()
    assert len(fresh.fake.submits) == 2


def check_app_class(fresh: GatewayStack, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="hi", extra_body={"app_class": "code"})
    assert fresh.fake.submits[-1].app_class == "code"
    client.chat.completions.create(model=MODEL, messages=USER, extra_headers={"x-accelgen-app-class": "batch"})
    assert fresh.fake.submits[-1].app_class == "batch"
    with pytest.raises(openai.BadRequestError, match="app_class"):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"app_class": "poetry"})


def check_slo(fresh: GatewayStack, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="hi", extra_body={
        "app_class": "chat", "slo_ttft_ms": 900, "slo_tbt_ms": 150, "slo_jct_ms": 60_000})
    slo = fresh.fake.submits[-1].slo
    assert (slo.ttft_ms, slo.tbt_ms, slo.jct_ms) == (900, 150, 60_000)
    client.chat.completions.create(model=MODEL, messages=USER, extra_headers={
        "x-accelgen-slo-ttft-ms": "800", "x-accelgen-slo-tbt-ms": "120"}, extra_body={"slo_tbt_ms": 110})
    slo = fresh.fake.submits[-1].slo
    assert (slo.ttft_ms, slo.tbt_ms) == (800, 110)  # the body wins over a header


SUPPORTED: dict[str, Callable[[GatewayStack, openai.OpenAI], None]] = {
    "prompt": check_prompt, "messages": check_messages,
    "max_tokens": check_max_tokens, "max_completion_tokens": check_max_completion_tokens,
    "temperature": check_temperature, "top_p": check_top_p, "top_k": check_top_k, "seed": check_seed,
    "ignore_eos": check_ignore_eos, "stop_token_ids": check_stop_token_ids, "stop_reason": check_stop_reason,
    "n": check_n, "stop": check_stop, "include_stop_str_in_output": check_include_stop_str_in_output,
    "logprobs": check_logprobs, "top_logprobs": check_top_logprobs, "stream": check_stream,
    "stream_options.include_usage": check_include_usage,
    "stream_options.continuous_usage_stats": check_continuous_usage_stats,
    "user": check_user, "model": check_model,
    # AccelGen only
    "app_class": check_app_class, "x-accelgen-*": check_app_class,
    "slo_ttft_ms": check_slo, "slo_tbt_ms": check_slo, "slo_jct_ms": check_slo,
}


# ---- the tests ----------------------------------------------------------------------------------

def test_readme_table_is_parsed() -> None:
    assert {"prompt", "messages", "n", "stop", "logprobs", "top_logprobs", "user", "model"} <= TABLE["supported"]
    assert {"best_of", "echo", "tools", "skip_special_tokens"} <= TABLE["refused"]
    assert not TABLE["supported"] & TABLE["refused"]


def test_registry_covers_every_supported_row() -> None:
    missing = (TABLE["supported"] | TABLE["accelgen"]) - SUPPORTED.keys()
    assert not missing, f"README parameters with no test in SUPPORTED: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(TABLE["supported"] | TABLE["accelgen"]))
def test_supported_parameter(name: str, fresh: GatewayStack, client: openai.OpenAI) -> None:
    if name not in SUPPORTED:
        pytest.fail(f"{name}: in the README table, no test in SUPPORTED")
    SUPPORTED[name](fresh, client)
