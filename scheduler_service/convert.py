"""Protobuf <-> core dataclasses for the scheduler, in one place. The core never sees *_pb2.

Validation of what clients send happens here too, raising ``InvalidInput`` with the field's
name, so the servicer maps every bad input to INVALID_ARGUMENT the same way.
"""

from __future__ import annotations

import math

from accelgen.v1 import common_pb2, scheduler_pb2, worker_pb2
from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.request import Request, SamplingParams
from accelgen.core.slo import SLO, SLOCatalog


class InvalidInput(ValueError):
    """A request field is malformed or out of range (-> INVALID_ARGUMENT)."""


def sampling_from_proto(sp: common_pb2.SamplingParams, max_tokens_default: int) -> SamplingParams:
    max_tokens = sp.max_new_tokens if sp.HasField("max_new_tokens") else max_tokens_default
    if max_tokens < 1:
        raise InvalidInput(f"sampling_params.max_new_tokens must be >= 1, got {max_tokens}")
    if not (sp.temperature >= 0 and math.isfinite(sp.temperature)):
        raise InvalidInput(f"sampling_params.temperature must be >= 0, got {sp.temperature}")
    top_p = sp.top_p or 1.0
    if not 0 < top_p <= 1:
        raise InvalidInput(f"sampling_params.top_p must be in (0, 1], got {sp.top_p}")
    if sp.top_k < 0:
        raise InvalidInput(f"sampling_params.top_k must be >= 0 (0 disables it), got {sp.top_k}")
    return SamplingParams(max_tokens=max_tokens, temperature=sp.temperature, top_p=top_p, top_k=sp.top_k,
                          seed=sp.seed if sp.HasField("seed") else None,
                          stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos)


def sampling_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                    max_new_tokens=sp.max_tokens, stop_token_ids=list(sp.stop_token_ids),
                                    ignore_eos=sp.ignore_eos)
    if sp.seed is not None:
        out.seed = sp.seed
    return out


def slo_from_proto(spec: common_pb2.SLOSpec, app_class: str, catalog: SLOCatalog) -> SLO:
    for name in ("ttft_ms", "tbt_ms", "jct_ms"):
        value = getattr(spec, name)
        if value < 0 or not math.isfinite(value):
            raise InvalidInput(f"slo.{name} must be a positive number of milliseconds, got {value}")
    if spec.ttft_ms == spec.tbt_ms == spec.jct_ms == 0:
        return catalog.get(app_class).slo
    try:
        return SLO(ttft_s=spec.ttft_ms / 1000 or None, tbt_s=spec.tbt_ms / 1000 or None, jct_s=spec.jct_ms / 1000 or None)
    except ValueError as exc:
        raise InvalidInput(f"slo: {exc}") from None


def slo_to_proto(slo: SLO) -> common_pb2.SLOSpec:
    return common_pb2.SLOSpec(ttft_ms=(slo.ttft_s or 0) * 1000, tbt_ms=(slo.tbt_s or 0) * 1000,
                              jct_ms=(slo.jct_s or 0) * 1000)


def request_from_submit(msg: scheduler_pb2.SubmitRequest, catalog: SLOCatalog, max_model_len: int,
                        now: float, vocab_size: int | None = None) -> Request:
    if not msg.request_id:
        raise InvalidInput("request_id must not be empty")
    if not msg.prompt_token_ids:
        raise InvalidInput("prompt_token_ids must not be empty")
    n = len(msg.prompt_token_ids)
    if n >= max_model_len:
        raise InvalidInput(f"prompt_token_ids has {n} tokens but the model context is {max_model_len} "
                           f"(at most {max_model_len - 1} leaves room for one output token)")
    if vocab_size is not None and max(msg.prompt_token_ids) >= vocab_size:
        i = next(i for i, t in enumerate(msg.prompt_token_ids) if t >= vocab_size)
        raise InvalidInput(f"prompt_token_ids[{i}] = {msg.prompt_token_ids[i]} is outside the model's vocabulary "
                           f"(ids must be below {vocab_size})")
    app_class = msg.app_class or catalog.names[0]
    if app_class not in catalog:
        raise InvalidInput(f"app_class {app_class!r} is unknown; known classes: {', '.join(catalog.names)}")
    sampling = sampling_from_proto(msg.sampling_params, max_tokens_default=max_model_len - n)
    return Request(
        request_id=msg.request_id,
        prompt_token_ids=list(msg.prompt_token_ids),
        sampling=sampling,
        slo=slo_from_proto(msg.slo, app_class, catalog),
        app_class=app_class,
        arrival_s=now,
        eos_token_id=msg.eos_token_id if msg.has_eos_token_id else None,
    )


def plan_to_proto(plan: BatchPlan, requests: dict[str, Request], epoch: str) -> worker_pb2.BatchPlan:
    """The worker's view of a plan: token ids to run, blocks, full state for new requests."""
    chunks = []
    for c in plan.chunks:
        r = requests[c.request_id]
        start, end = c.num_computed_tokens, c.num_computed_tokens + c.num_new_tokens
        np_ = r.num_prompt_tokens
        if end <= np_:
            token_ids = r.prompt_token_ids[start:end]
        elif start >= np_:
            token_ids = r.output_token_ids[start - np_:end - np_]
        else:
            token_ids = r.prompt_token_ids[start:] + r.output_token_ids[:end - np_]
        chunk = worker_pb2.ScheduledChunk(
            request_id=c.request_id, num_computed_tokens=start, token_ids=token_ids,
            new_block_ids=list(c.new_block_ids), is_new=c.is_new, samples=c.samples,
            num_output_tokens=r.num_output_tokens)
        if c.is_new:
            chunk.block_table.extend(c.block_table)
            chunk.sampling_params.CopyFrom(sampling_to_proto(r.sampling))
            chunk.prompt_len = np_
        chunks.append(chunk)
    return worker_pb2.BatchPlan(iteration=plan.iteration, epoch=epoch, chunks=chunks,
                                freed_request_ids=plan.freed_request_ids, predicted_time_s=plan.predicted_time_s)


def result_from_proto(msg: worker_pb2.IterationResult) -> IterationResult:
    return IterationResult(iteration=msg.iteration, sampled_token_ids=dict(msg.sampled_token_ids),
                           elapsed_s=msg.elapsed_s)
