"""Every refused parameter of the README's "OpenAI API: supported parameters" table ("no (400)"):
with the official `openai` client each is a 400 naming it and reaches no scheduler, sent with its
default value it is accepted, and the table and the gateway's list of refused fields agree."""

from __future__ import annotations

import inspect
from typing import Any

import openai
import pytest

from tests.support.gateway_stack import GatewayStack
from tests.support.openai_table import MODEL, TABLE, USER
from tests.support.openai_table import client, fresh, stack  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.integration


# A value that uses each refused feature, and (README: "sent with its default value it is
# accepted") the default a client may send. `guided_*` stands for the four vLLM fields.
GUIDED = {"guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["a", "b"],
          "guided_grammar": "root ::= \"a\""}
REFUSED: dict[str, dict[str, Any]] = {
    "best_of": {"best_of": 2}, "echo": {"echo": True}, "suffix": {"suffix": "!"},
    "prompt_logprobs": {"prompt_logprobs": 1},
    "presence_penalty": {"presence_penalty": 0.5}, "frequency_penalty": {"frequency_penalty": 0.5},
    "repetition_penalty": {"repetition_penalty": 1.2}, "logit_bias": {"logit_bias": {"50": 10}},
    "min_p": {"min_p": 0.1}, "min_tokens": {"min_tokens": 2}, "bad_words": {"bad_words": ["x"]},
    "response_format": {"response_format": {"type": "json_object"}},
    "structured_outputs": {"structured_outputs": {"choice": ["a", "b"]}},
    "guided_*": GUIDED,
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    "tool_choice": {"tool_choice": "auto"},
    "skip_special_tokens": {"skip_special_tokens": False},
    "parallel_tool_calls": {"parallel_tool_calls": True},
    "functions": {"functions": [{"name": "f", "parameters": {"type": "object"}}]},
    "function_call": {"function_call": "auto"},
    "use_beam_search": {"use_beam_search": True}, "length_penalty": {"length_penalty": 0.5},
    "allowed_token_ids": {"allowed_token_ids": [5, 6]}, "truncate_prompt_tokens": {"truncate_prompt_tokens": 4},
    "return_tokens_as_token_ids": {"return_tokens_as_token_ids": True},
    "spaces_between_special_tokens": {"spaces_between_special_tokens": False},
    "add_generation_prompt": {"add_generation_prompt": False}, "chat_template": {"chat_template": "{{ 1 }}"},
    "modalities": {"modalities": ["text", "audio"]}, "audio": {"audio": {"voice": "alloy", "format": "wav"}},
    "prediction": {"prediction": {"type": "content", "content": "x"}},
}
DEFAULTS: dict[str, Any] = {
    "best_of": 1, "echo": False, "suffix": "", "prompt_logprobs": 0, "presence_penalty": 0,
    "frequency_penalty": 0, "repetition_penalty": 1.0, "logit_bias": {}, "min_p": 0, "min_tokens": 0,
    "bad_words": [], "response_format": {"type": "text"}, "structured_outputs": None, "tools": [],
    "tool_choice": "none", "skip_special_tokens": True, **{k: None for k in GUIDED},
    "parallel_tool_calls": False, "functions": [], "function_call": "none", "use_beam_search": False,
    "length_penalty": 1.0, "allowed_token_ids": None, "truncate_prompt_tokens": None,
    "return_tokens_as_token_ids": False, "spaces_between_special_tokens": True, "add_generation_prompt": True,
    "chat_template": None, "modalities": ["text"], "audio": None, "prediction": None,
}


def _send(client: openai.OpenAI, endpoint: str, fields: dict[str, Any]) -> Any:
    """One call with ``fields`` as the client's own keyword arguments where it has them, else in
    ``extra_body``."""
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    known = inspect.signature(create).parameters
    kwargs = {k: v for k, v in fields.items() if k in known}
    extra = {k: v for k, v in fields.items() if k not in known}
    base = {"prompt": "hi"} if endpoint == "completions" else {"messages": USER}
    return create(model=MODEL, temperature=0, max_tokens=2, **base, **kwargs, extra_body=extra or None)


def test_every_field_the_server_refuses_is_in_the_table() -> None:
    """The README table and the parser's list of refused fields say the same."""
    from gateway.openai_protocol import _UNSUPPORTED
    guided = {k for k in _UNSUPPORTED if k.startswith("guided_")}
    assert set(_UNSUPPORTED) - guided == TABLE["refused"] - {"guided_*"}


def test_registry_covers_every_refused_row() -> None:
    missing = TABLE["refused"] - REFUSED.keys()
    assert not missing, f"README 'no (400)' parameters with no value in REFUSED: {sorted(missing)}"
    assert not {k for k in REFUSED if k != "guided_*"} - DEFAULTS.keys()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("name", sorted(TABLE["refused"]))
def test_refused_parameter_is_a_400_naming_it(name: str, endpoint: str, fresh: GatewayStack,
                                              client: openai.OpenAI) -> None:
    if name not in REFUSED:
        pytest.fail(f"{name}: in the README table as 'no (400)', no value in REFUSED")
    for field, value in REFUSED[name].items():
        with pytest.raises(openai.BadRequestError) as err:
            _send(client, endpoint, {field: value})
        assert err.value.status_code == 400 and field in err.value.message
        assert err.value.body["param"] == field, err.value.body
    assert fresh.fake.submits == []


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_refused_parameter_with_its_default_is_accepted(name: str, fresh: GatewayStack,
                                                        client: openai.OpenAI) -> None:
    for endpoint in ("completions", "chat"):
        reply = _send(client, endpoint, {name: DEFAULTS[name]})
        assert reply.choices and reply.usage.completion_tokens == 2
    assert len(fresh.fake.submits) == 2
