"""Client request -> scheduler ``SubmitRequest``, with every check the gateway makes.

Pure functions, no I/O: the caller passes the tokenised prompt, the model's context length and
the config. Every failure is INVALID_ARGUMENT naming the field and saying what to change, and
happens *before* anything reaches the scheduler.

Field names differ between front ends (``sampling_params.max_new_tokens`` over gRPC,
``max_tokens`` over HTTP), so messages are written with a ``FieldNames`` table the caller
chooses; the rules themselves exist once.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from accelgen.core.fields import FieldError
from accelgen.core.slo import SLO, SLOCatalog, SLOClass
from accelgen.v1 import common_pb2, gateway_pb2, scheduler_pb2
from accelgen.wire.sampling import sampling_from_proto
from accelgen.wire.slo import KINDS, slo_from_proto, slo_to_proto
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, invalid
from gateway.stop_strings import MAX_STOP_CHARS, MAX_STOP_STRINGS

FieldNames = Mapping[str, str]

# Canonical key -> the name the gRPC client wrote.
GRPC_NAMES: FieldNames = {
    "request_id": "request_id",
    "prompt": "text or tokenized.input_ids",
    "temperature": "sampling_params.temperature",
    "top_p": "sampling_params.top_p",
    "top_k": "sampling_params.top_k",
    "max_new_tokens": "sampling_params.max_new_tokens",
    "app_class": "app_class",
    "ttft_ms": "slo.ttft_ms",
    "tbt_ms": "slo.tbt_ms",
    "jct_ms": "slo.jct_ms",
    "logprobs": "sampling_params.logprobs",
    "seed": "sampling_params.seed",
    "stop": "stop",
    "n": "n",
}

MAX_N = 128  # samples of one request at most (an OpenAI prompt list: prompts x n together)
_INT64_MAX = 2**63 - 1

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_label(given: str, names: FieldNames = GRPC_NAMES) -> str:
    """A client's own id for a new request, kept as its label ("" when it gave none); the
    request id itself is always the gateway's. A malformed label is an error (it is logged and
    returned in GetRequest, so it is held to the id format)."""
    if given and not REQUEST_ID_RE.fullmatch(given):
        shown = given if len(given) <= 40 else given[:40] + "..."
        raise invalid(f"{names['request_id']} (your own label for the request) must be 1 to 128 characters of "
                      f"[A-Za-z0-9._:-], got {shown!r} ({len(given)} characters); or leave it empty",
                      names["request_id"])
    return given


def check_prompt_chars(req: gateway_pb2.GenerateRequest, max_chars: int, names: FieldNames = GRPC_NAMES) -> None:
    """A text prompt of at most ``max_chars`` characters, checked before it is tokenised (which
    costs time in proportion to its length)."""
    if req.WhichOneof("input") == "text" and len(req.text) > max_chars:
        raise too_long(names["prompt"], len(req.text), max_chars)


def too_long(name: str, chars: int, max_chars: int, what: str = "") -> GatewayError:
    """INVALID_ARGUMENT for a text over ``max_prompt_chars`` (``what`` says which text of ``name``)."""
    return invalid(f"{name}{what} has {chars} characters; this gateway accepts at most {max_chars} "
                   "(max_prompt_chars); shorten it", name)


def check_request_id(given: str, name: str = "request_id") -> str:
    """The id of an existing request a client names (Cancel, GetRequest, Attach, /v1/requests/ID):
    refused before any scheduler call when malformed. Unchecked, a 1 MB id came back quoted in the
    scheduler's NOT_FOUND, past gRPC's metadata limit: RESOURCE_EXHAUSTED, which HTTP clients
    retry as a 429 (found by bench/fuzz.py)."""
    if not REQUEST_ID_RE.fullmatch(given):
        shown = given if len(given) <= 40 else given[:40] + "..."
        raise invalid(f"{name} must be 1 to 128 characters of [A-Za-z0-9._:-], got {shown!r} "
                      f"({len(given)} characters)", name)
    return given


def validate_sampling(sp: common_pb2.SamplingParams, names: FieldNames = GRPC_NAMES) -> common_pb2.SamplingParams:
    """The core's range checks (``accelgen.wire.sampling``) under the client's field names; returns
    a copy with top_p's "unset" 0 made explicit (1.0). An unset max_new_tokens stays unset: the
    scheduler fills in the room left in the context."""
    core_names = {"max_tokens": names["max_new_tokens"], "temperature": names["temperature"],
                  "top_p": names["top_p"], "top_k": names["top_k"],
                  "logprobs": names.get("logprobs", GRPC_NAMES["logprobs"])}
    try:
        sampling_from_proto(sp, names=core_names)
    except FieldError as exc:
        raise invalid(str(exc), exc.field) from None
    out = common_pb2.SamplingParams()
    out.CopyFrom(sp)
    if out.top_p == 0:
        out.top_p = 1.0
    return out


def resolve_slo(app_class: str, spec: common_pb2.SLOSpec, config: GatewayConfig,
                catalog: SLOCatalog, names: FieldNames = GRPC_NAMES) -> tuple[str, common_pb2.SLOSpec]:
    """(class, SLO) the request is held to: explicit fields win, else the class's default.
    An unnamed class is the config's default class. Explicit values must lie within the
    configured bounds (``accelgen.wire.slo`` checks them with the rest of the SLO).
    """
    if not app_class and config.default_app_class not in catalog:
        raise invalid(f"{names['app_class']} is empty and the gateway's default_app_class "
                      f"{config.default_app_class!r} is not a class of the scheduler; name one of: "
                      f"{', '.join(catalog.names)}", names["app_class"])
    app_class = app_class or config.default_app_class
    if app_class not in catalog:
        raise invalid(f"{names['app_class']} {app_class!r} is unknown; known classes: {', '.join(catalog.names)}",
                      names["app_class"])
    try:
        slo = slo_from_proto(spec, names={kind: names[f"{kind}_ms"] for kind in KINDS}, bounds=config.slo_bounds)
    except FieldError as exc:
        raise invalid(str(exc), exc.field) from None
    return app_class, slo_to_proto(slo if slo is not None else catalog.get(app_class).slo)


def catalog_from_info(info: scheduler_pb2.ServerInfo) -> SLOCatalog:
    """The scheduler's application classes; the defaults if it reports none (an older scheduler)."""
    classes = []
    for c in info.classes:
        slo = spec_to_slo(c.slo)
        if slo is not None:
            classes.append(SLOClass(name=c.name, slo=slo))
    return SLOCatalog(tuple(classes)) if classes else SLOCatalog()


def spec_to_slo(spec: common_pb2.SLOSpec) -> SLO | None:
    """The core SLO of a spec, or None when the spec is empty or not a valid SLO."""
    try:
        return slo_from_proto(spec)
    except ValueError:
        return None


def check_prompt(prompt_ids: Sequence[int], max_model_len: int | None, vocab_size: int | None,
                 names: FieldNames = GRPC_NAMES, max_new_tokens: int | None = None) -> None:
    """Non-empty, fits the context with room for one output token (for all ``max_new_tokens``
    when the client set it, as vLLM's server requires), ids inside the vocabulary."""
    name = names["prompt"]
    if not prompt_ids:
        raise invalid(f"{name}: the prompt is empty; send at least one token of text", name)
    n = len(prompt_ids)
    if max_model_len and n >= max_model_len:
        raise invalid(f"{name}: the prompt has {n} tokens but the model's context is {max_model_len} tokens "
                      f"(at most {max_model_len - 1} leave room for one output token); shorten the prompt", name)
    if max_model_len and max_new_tokens is not None and n + max_new_tokens > max_model_len:
        field = names["max_new_tokens"]
        raise invalid(f"the model's context is {max_model_len} tokens, but {n + max_new_tokens} were requested "
                      f"({n} in the prompt, {field} = {max_new_tokens}); reduce the prompt or {field} "
                      f"(at most {max_model_len - n} here)", field)
    if vocab_size is not None:
        for i, tok in enumerate(prompt_ids):
            if tok >= vocab_size:
                raise invalid(f"{name}[{i}] = {tok} is outside the vocabulary (size {vocab_size})", name)


def has_prompt(req: gateway_pb2.GenerateRequest) -> bool:
    which = req.WhichOneof("input")
    return (which == "text" and bool(req.text)) or (which == "tokenized" and bool(req.tokenized.input_ids))


def to_submit_request(request_id: str, prompt_ids: Sequence[int], sampling: common_pb2.SamplingParams,
                      app_class: str, slo: common_pb2.SLOSpec, eos_token_id: int | None, tenant: str = "",
                      label: str = "", stop: Sequence[str] = (), include_stop: bool = False
                      ) -> scheduler_pb2.SubmitRequest:
    """The Submit; the stop strings go along so that an Attach anywhere re-applies them."""
    msg = scheduler_pb2.SubmitRequest(request_id=request_id, prompt_token_ids=list(prompt_ids),
                                      sampling_params=sampling, app_class=app_class, slo=slo, tenant=tenant,
                                      label=label, stop=list(stop), include_stop_str_in_output=include_stop)
    if eos_token_id is not None:
        msg.eos_token_id = eos_token_id
        msg.has_eos_token_id = True
    return msg


def validate_request(req: gateway_pb2.GenerateRequest, config: GatewayConfig, catalog: SLOCatalog,
                     names: FieldNames = GRPC_NAMES) -> tuple[str, common_pb2.SamplingParams, str, common_pb2.SLOSpec]:
    """Every check that needs no tokenizer and no scheduler: (label, sampling, class, SLO)."""
    label = check_label(req.request_id, names)
    if not has_prompt(req):
        raise invalid(f"{names['prompt']}: the prompt is empty; send text or token ids", names["prompt"])
    sampling = validate_sampling(req.sampling_params, names)
    check_stop(req.stop, names)
    check_n(req.n, sampling, names)
    app_class, slo = resolve_slo(req.app_class, req.slo, config, catalog, names)
    return label, sampling, app_class, slo


def check_stop(stop: Sequence[str], names: FieldNames = GRPC_NAMES) -> None:
    """At most ``MAX_STOP_STRINGS`` stop strings of 1 to ``MAX_STOP_CHARS`` characters (vLLM
    refuses an empty one; each is searched after every token, and the longest sets how much
    text a stream holds back)."""
    name = names.get("stop", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid(f"{name} may hold at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", name)
    for i, s in enumerate(stop):
        if not s:
            raise invalid(f"{name}[{i}] is empty; a stop string needs at least one character", name)
        if len(s) > MAX_STOP_CHARS:
            raise invalid(f"{name}[{i}] has {len(s)} characters; a stop string may have at most {MAX_STOP_CHARS}",
                          name)


def check_n(n: int, sampling: common_pb2.SamplingParams, names: FieldNames = GRPC_NAMES, prompts: int = 1) -> None:
    """``n`` samples (0 = 1) of each of ``prompts`` prompts: at most ``MAX_N`` together; more
    than one needs random sampling (vLLM refuses n > 1 with temperature 0: the samples would be
    the same); with a seed, sample i uses seed + i, which must stay a 64-bit integer."""
    name = names.get("n", "n")
    n = max(1, n)
    if n * prompts > MAX_N:
        many = f"{prompts} prompts x n = {n}" if prompts > 1 else f"n = {n}"
        raise invalid(f"{name} = {n} is out of range: {many} samples, at most {MAX_N} per request", name)
    if n > 1 and sampling.temperature == 0:
        raise invalid(f"{name} must be 1 when using greedy sampling (temperature 0), got {n}", name)
    if n > 1 and sampling.HasField("seed") and sampling.seed + n - 1 > _INT64_MAX:
        seed = names.get("seed", "seed")
        raise invalid(f"{seed} = {sampling.seed} is too large for n = {n} (sample i uses seed + i)", seed)
