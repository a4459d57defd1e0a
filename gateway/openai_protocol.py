"""OpenAI request bodies -> ``GenerateRequest``, and the response bodies vLLM's server writes.

Parsing is by hand rather than with pydantic models: every bad field must become a 400 whose
message names that field (pydantic's 422 lists locations in its own format), and fields the
OpenAI clients send with default values (``logprobs: null``, ``repetition_penalty: 1.0`` from
vLLM's benchmark) must pass while the same fields with values we cannot honour are refused
rather than silently ignored. Response shapes follow vLLM's OpenAI server, so ``openai`` and
``vllm bench serve`` read them unchanged (``openai_responses`` writes them, ``openai_logprobs``
their logprobs); the JSON itself is parsed by ``openai_json``.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any, Mapping

import grpc

from accelgen.core.logprobs import MAX_LOGPROBS
from accelgen.core.request import MAX_STOP_TOKEN_IDS
from accelgen.v1 import common_pb2, gateway_pb2
from gateway.convert import MAX_N, FieldNames, too_long
from gateway.errors import GatewayError, invalid
from gateway.openai_json import HugeNumber, shown as _shown, unicode_text
from gateway.openai_responses import Format, Kind
from gateway.stop_strings import MAX_STOP_STRINGS

# Field names as an HTTP client wrote them (see convert.FieldNames).
HTTP_NAMES: dict[str, str] = {
    "request_id": "x-request-id", "prompt": "prompt", "temperature": "temperature", "top_p": "top_p",
    "top_k": "top_k", "max_new_tokens": "max_tokens", "app_class": "app_class",
    "ttft_ms": "slo_ttft_ms", "tbt_ms": "slo_tbt_ms", "jct_ms": "slo_jct_ms",
    "logprobs": "logprobs", "seed": "seed", "stop": "stop", "n": "n",
}

# Extra body field -> header carrying the same value (the body wins when both are present).
SLO_HEADERS = {
    "app_class": "x-accelgen-app-class",
    "slo_ttft_ms": "x-accelgen-slo-ttft-ms",
    "slo_tbt_ms": "x-accelgen-slo-tbt-ms",
    "slo_jct_ms": "x-accelgen-slo-jct-ms",
}

# Fields we cannot honour, with the values that mean "feature not used" (accepted silently).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "logit_bias": (None, {}), "tools": (None, []), "min_tokens": (None, 0),
    "response_format": (None, {"type": "text"}), "min_p": (None, 0), "tool_choice": (None, "none"),
    "structured_outputs": (None,), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "bad_words": (None, []),
    "skip_special_tokens": (None, True), "prompt_logprobs": (None, 0), "parallel_tool_calls": (None, False),
    # OpenAI's legacy function calling, and vLLM fields that change the output or the prompt:
    # refused rather than ignored, so a client never gets something other than what it asked for.
    "functions": (None, []), "function_call": (None, "none"), "use_beam_search": (None, False),
    "length_penalty": (None, 1), "allowed_token_ids": (None,), "truncate_prompt_tokens": (None,),
    "add_generation_prompt": (None, True), "chat_template": (None,), "return_tokens_as_token_ids": (None, False),
    "spaces_between_special_tokens": (None, True), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,),
}

# Integer fields and the range their protobuf field can carry (a larger value is a 400 here,
# not a ValueError when the message is built).
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UNSUPPORTED_HINT = {"best_of": "; n samples are supported (n), the best of several is not"}


# A role names a speaker ("system", "user", "assistant", "tool", ...); the chat template puts it
# into the prompt, so it is bounded like the contents are (and the templated text is checked too).
MAX_ROLE_CHARS = 64
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class OpenAIRequest:
    """A parsed body: the requests for the pipeline (one per prompt of a completions prompt
    list, each to run ``fmt.n`` times) plus what shapes the HTTP answer."""

    kind: Kind
    prompts: list[gateway_pb2.GenerateRequest]
    names: FieldNames
    messages: list[dict[str, str]] | None
    stream: bool
    fmt: Format

    @property
    def generate(self) -> gateway_pb2.GenerateRequest:
        """The first (a chat's only) prompt's request."""
        return self.prompts[0]

    @property
    def include_usage(self) -> bool:
        return self.fmt.include_usage


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: Mapping[str, Any], name: str) -> float | None:
    """A finite number that a protobuf ``float`` (32 bits) carries without becoming infinite."""
    v = body.get(name)
    if v is None:
        return None
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and abs(float(v)) <= _FLOAT32_MAX
    except OverflowError:  # an integer literal too large for a float
        ok = False
    if not ok:
        raise invalid(f"{name} must be a finite number (at most {_FLOAT32_MAX:.4g} in size), got {_shown(v)}",
                      name)
    return float(v)


def _int(body: Mapping[str, Any], name: str, bounds: tuple[int, int] = _INT32) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, HugeNumber):
        raise invalid(f"{name} = {_shown(v)} is out of range (at most {bounds[1]})", name)
    if not _is_int(v):
        raise invalid(f"{name} must be an integer, got {_shown(v)}", name)
    if not bounds[0] <= v <= bounds[1]:
        raise invalid(f"{name} = {v} is out of range (at most {bounds[1]})", name)
    return int(v)


def _bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"{name} must be true or false, got {_shown(v)}", name)
    return v


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    # True == 1 in Python; "n": true is not "n": 1, so compare bool-ness too.
    return any((type(value) is bool) == (type(d) is bool) and value == d for d in defaults)


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for name, defaults in _UNSUPPORTED.items():
        if name in body and not _is_default(body[name], defaults):
            raise invalid(f"{name} = {_shown(body[name])} is not supported by this server; remove it"
                          f"{_UNSUPPORTED_HINT.get(name, '')}", name)


def _token_ids(value: list[Any], name: str) -> list[int]:
    for i, t in enumerate(value):
        if not _is_int(t) or not 0 <= t < 2**32:
            raise invalid(f"{name}[{i}] must be a token id (an integer >= 0), got {_shown(t)}", name)
    return list(value)


def _prompts(body: Mapping[str, Any], max_chars: int | None = None) -> list[Any]:
    """``prompt``: a string, a list of token ids, or a list of either (one request each, as in
    vLLM); at most ``MAX_N`` prompts."""
    p = body.get("prompt")
    if p is None:
        raise invalid("prompt is required: a string or a list of token ids (or a list of those)", "prompt")
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        if len(p) > MAX_N:
            raise invalid(f"prompt is a list of {len(p)} prompts; at most {MAX_N} per request", "prompt")
        return list(p)
    return [p]


def _prompt(p: Any, req: gateway_pb2.GenerateRequest, max_chars: int | None = None, where: str = "prompt") -> None:
    """One prompt (``where``: which, in a list): a string (of at most ``max_chars`` characters) or a
    list of token ids."""
    if isinstance(p, str):
        if max_chars is not None and len(p) > max_chars:
            raise too_long("prompt", len(p), max_chars, "" if where == "prompt" else f" ({where})")
        req.text = unicode_text(p, "prompt")
    elif isinstance(p, list):
        try:
            req.tokenized.input_ids.extend(_token_ids(p, where))
        except GatewayError as exc:
            raise invalid(exc.message, "prompt") from None
        req.tokenized.SetInParent()  # an empty list still selects token input (and fails as empty)
    else:
        raise invalid(f"{where} must be a string or a list of token ids, got {type(p).__name__}", "prompt")


def _messages(body: Mapping[str, Any], max_messages: int | None = None,
              max_chars: int | None = None) -> list[dict[str, str]]:
    """``messages`` as role/content string pairs (text parts of a content list joined by newlines):
    at most ``max_messages`` of them, whose contents hold at most ``max_chars`` characters in all
    and whose roles at most ``MAX_ROLE_CHARS`` each (checked before the chat template and the
    tokenizer see them; the templated text is held to ``max_chars`` again once made)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages is required: a non-empty list of {role, content} objects", "messages")
    if max_messages is not None and len(msgs) > max_messages:
        raise invalid(f"messages has {len(msgs)} messages; this gateway accepts at most {max_messages} "
                      "(max_messages)", "messages")
    out, chars = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string role", "messages")
        if len(m["role"]) > MAX_ROLE_CHARS:
            raise invalid(f"messages[{i}].role has {len(m['role'])} characters; a role (a speaker such as 'user') "
                          f"may have at most {MAX_ROLE_CHARS}", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise invalid(f"messages[{i}].content[{j}] of type {_shown(kind)} is not supported; "
                                  "only text parts",
                                  "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts", "messages")
        chars += len(content)
        if max_chars is not None and chars > max_chars:
            raise too_long("messages", chars, max_chars, " (their contents together)")
        out.append({"role": m["role"], "content": unicode_text(content, f"messages[{i}].content")})
    return out


def _slo(body: Mapping[str, Any], headers: Mapping[str, str], req: gateway_pb2.GenerateRequest) -> None:
    def value(name: str) -> Any:
        if body.get(name) is not None:
            return body[name], name
        raw = headers.get(SLO_HEADERS[name])
        return (raw, SLO_HEADERS[name]) if raw is not None else (None, name)

    app_class, where = value("app_class")
    if app_class is not None:
        if not isinstance(app_class, str):
            raise invalid(f"{where} must be a string, got {_shown(app_class)}", where)
        req.app_class = app_class.strip()
    for kind in ("ttft", "tbt", "jct"):
        raw, where = value(f"slo_{kind}_ms")
        if raw is None:
            continue
        try:
            ms = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            ms = math.nan
        if not math.isfinite(ms):
            raise invalid(f"{where} must be a number of milliseconds, got {_shown(raw)}", where)
        setattr(req.slo, f"{kind}_ms", ms)


def _sampling(body: Mapping[str, Any], kind: Kind, names: dict[str, str]) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams()
    temperature = _number(body, "temperature")
    sp.temperature = 1.0 if temperature is None else temperature  # OpenAI's default is 1, not greedy
    top_p = _number(body, "top_p")
    # 0 means "unset" in the protobuf, so a 0 (or a value float32 rounds to 0) would silently
    # become 1.0: refused here, as vLLM does.
    if top_p is not None and not (0 < top_p <= 1 and array("f", [top_p])[0] > 0):
        raise invalid(f"top_p must be in (0, 1], got {_shown(top_p)}", "top_p")
    sp.top_p = 1.0 if top_p is None else top_p
    top_k = _int(body, "top_k")
    sp.top_k = 0 if top_k in (None, -1) else top_k  # vLLM's -1 and our 0 both mean "disabled"
    max_name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    names["max_new_tokens"] = max_name
    max_tokens = _int(body, max_name)
    if max_tokens is None and kind == "completion" and "max_tokens" not in body:
        max_tokens = 16  # the OpenAI (and vLLM) default for completions; chat runs to the context
    if max_tokens is not None:
        sp.max_new_tokens = max_tokens
    seed = _int(body, "seed", _INT64)
    if seed is not None:
        sp.seed = seed
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            raise invalid(f"stop_token_ids must be a list of token ids, got {_shown(stop_ids)}", "stop_token_ids")
        if len(stop_ids) > MAX_STOP_TOKEN_IDS:  # before each is checked and copied
            raise invalid(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(stop_ids)}",
                          "stop_token_ids")
        sp.stop_token_ids.extend(_token_ids(stop_ids, "stop_token_ids"))
    sp.ignore_eos = _bool(body, "ignore_eos")
    return sp


def check_model(model: Any, served: set[str]) -> None:
    """``model`` may be left out (the served model is meant) or name it; another name is a 404
    and a non-string a 400, as in vLLM's server."""
    if model is None:
        return
    if not isinstance(model, str):
        raise invalid(f"model must be a string, got {_shown(model)}", "model")
    if model not in served:
        raise GatewayError(grpc.StatusCode.NOT_FOUND, f"The model `{_shown(model)[1:-1]}` does not exist; "
                           "this server serves "
                           f"{', '.join(sorted(served))}", "model")


def _stop(body: Mapping[str, Any], req: gateway_pb2.GenerateRequest) -> None:
    """``stop``: a string or a list of strings (checked further by ``convert.check_stop``)."""
    req.include_stop_str_in_output = _bool(body, "include_stop_str_in_output")
    stop = body.get("stop")
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"stop must be a string or a list of strings, got {_shown(stop)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:  # before each is copied
        raise invalid(f"stop may hold at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    req.stop.extend(unicode_text(s, "stop") for s in stops)


def _logprobs(body: Mapping[str, Any], kind: Kind, names: dict[str, str]) -> int | None:
    """How many top tokens to return with each token (None: no logprobs). Completions:
    ``logprobs: k``; chat: ``logprobs: true`` with ``top_logprobs: k`` (vLLM's rules: k in
    0..20, and top_logprobs needs logprobs)."""
    bounds = (0, MAX_LOGPROBS)
    if kind == "completion":
        if body.get("logprobs") is False:  # what some clients send for "none"
            return None
        return _int(body, "logprobs", bounds)
    names["logprobs"] = "top_logprobs"
    top = _int(body, "top_logprobs", bounds)
    if not _bool(body, "logprobs"):
        if top:
            raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
        return None
    return top or 0


def parse_request(kind: Kind, body: Any, headers: Mapping[str, str], max_prompt_chars: int | None = None,
                  max_messages: int | None = None) -> OpenAIRequest:
    """Validate an OpenAI body's shape and types, and its text's size (``max_prompt_chars``:
    each prompt, or all message contents together; ``max_messages``); ranges are checked later
    by ``convert``. ``x-request-id`` is the client's label for the request, not its id."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _check_unsupported(body)
    names = dict(HTTP_NAMES, prompt="prompt" if kind == "completion" else "messages")
    req = gateway_pb2.GenerateRequest(request_id=headers.get("x-request-id", ""))
    messages, prompts = None, [None]
    if kind == "completion":
        prompts = _prompts(body, max_prompt_chars)
    else:
        messages = _messages(body, max_messages, max_prompt_chars)
    req.sampling_params.CopyFrom(_sampling(body, kind, names))
    logprobs = _logprobs(body, kind, names)
    if logprobs is not None:
        req.sampling_params.logprobs = logprobs
    _stop(body, req)
    n = _int(body, "n", (1, MAX_N)) or 1
    if n * len(prompts) > MAX_N:
        raise invalid(f"n = {n} is out of range for {len(prompts)} prompts: {n * len(prompts)} choices, at most "
                      f"{MAX_N} per request", "n")
    req.n = n
    _slo(body, headers, req)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid(f"stream_options must be an object, got {_shown(options)}", "stream_options")
    if options is not None and not stream:
        raise invalid("stream_options can only be set when stream is true", "stream_options")
    include_usage = bool(options and _bool(options, "include_usage"))
    continuous = include_usage and bool(options and _bool(options, "continuous_usage_stats"))
    req.stream = stream
    reqs = []
    for i, p in enumerate(prompts):
        one = gateway_pb2.GenerateRequest()
        one.CopyFrom(req)
        if p is not None:
            _prompt(p, one, max_prompt_chars, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        reqs.append(one)
    return OpenAIRequest(kind=kind, prompts=reqs, names=names, messages=messages, stream=stream,
                         fmt=Format(kind=kind, logprobs=logprobs, n=n, include_usage=include_usage,
                                    continuous_usage=continuous))


# ---- responses (vLLM's OpenAI server shapes) ------------------------------------------------

_ID_PREFIXES: dict[Kind, str] = {"completion": "cmpl-", "chat": "chatcmpl-"}


def response_id(kind: Kind, request_id: str) -> str:
    return _ID_PREFIXES[kind] + request_id


def request_id_of(value: str) -> str:
    """The request id in an OpenAI response id (``response_id``'s inverse), or the id itself."""
    for prefix in _ID_PREFIXES.values():
        if value.startswith(prefix):
            return value[len(prefix):]
    return value


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def models_body(model: str, max_model_len: int, created: int) -> dict[str, Any]:
    card = {"id": model, "object": "model", "created": created, "owned_by": "accelgen", "root": model,
            "parent": None, "max_model_len": max_model_len, "permission": []}
    return {"object": "list", "data": [card]}
