"""Protobuf <-> worker dataclasses, in one place: the only module here that knows ``*_pb2``.

Decoding a ``BatchPlan`` also validates its shape and raises ``ValueError`` naming the field
and the request, so the server can answer ``INVALID_ARGUMENT`` with a message that says what
the scheduler got wrong. Checks that need the worker's state (is the request known, do the
block ids exist) belong to the executor, which holds that state.
"""

from __future__ import annotations

import math

from accelgen.v1 import worker_pb2
from accelgen.wire.logprobs import logprob_to_proto, logprobs_map_from_proto
from accelgen.wire.sampling import UNBOUNDED_MAX_TOKENS, sampling_from_proto, sampling_to_proto
from worker_service.plan import SAMPLED_INPUT, ChunkSpec, ExecResult, WorkerPlan


# -- the plan ------------------------------------------------------------------------------
def _chunk_from_proto(i: int, msg: worker_pb2.ScheduledChunk, default_max_tokens: int) -> ChunkSpec:
    rid = msg.request_id
    where = f"chunks[{i}] (request {rid!r})"
    if not rid:
        raise ValueError(f"chunks[{i}].request_id is empty: every chunk names its request")
    token_ids = list(msg.token_ids)
    if msg.sampled_input:
        if msg.is_new or token_ids:
            raise ValueError(f"{where}: sampled_input is a decode of a request this worker holds: "
                             "is_new must be false and token_ids empty")
        token_ids = [SAMPLED_INPUT]
    elif not token_ids:
        raise ValueError(f"{where}.token_ids is empty: a chunk runs at least one token")
    sampling = None
    if msg.is_new:
        if not msg.HasField("sampling_params"):
            raise ValueError(f"{where}.sampling_params is missing: an is_new chunk carries the full state")
        if msg.prompt_len <= 0:
            raise ValueError(f"{where}.prompt_len must be > 0 for an is_new chunk, got {msg.prompt_len}")
        if not msg.block_table:
            raise ValueError(f"{where}.block_table is empty: an is_new chunk carries the whole table")
        end = msg.num_computed_tokens + len(msg.token_ids)
        if end > msg.prompt_len + msg.num_output_tokens:
            raise ValueError(
                f"{where}: num_computed_tokens + len(token_ids) = {end} exceeds prompt_len + "
                f"num_output_tokens = {msg.prompt_len + msg.num_output_tokens}"
            )
        try:
            sampling = sampling_from_proto(msg.sampling_params, default_max_tokens, names={"max_tokens": "max_new_tokens"})
        except ValueError as exc:
            raise ValueError(f"{where}.sampling_params: {exc}") from None
    return ChunkSpec(
        request_id=rid,
        num_computed_tokens=msg.num_computed_tokens,
        token_ids=token_ids,
        new_block_ids=list(msg.new_block_ids),
        is_new=msg.is_new,
        block_table=list(msg.block_table),
        sampling=sampling,
        samples=msg.samples,
        num_output_tokens=msg.num_output_tokens,
        prompt_len=msg.prompt_len,
        sampled_input=msg.sampled_input,
    )


def plan_from_proto(msg: worker_pb2.BatchPlan, default_max_tokens: int = UNBOUNDED_MAX_TOKENS) -> WorkerPlan:
    """Decode and validate a ``BatchPlan``; ``ValueError`` names the offending field."""
    if not msg.epoch:
        raise ValueError("epoch is empty: the scheduler must name its incarnation so workers can detect restarts")
    if not (math.isfinite(msg.predicted_time_s) and msg.predicted_time_s >= 0):
        raise ValueError(f"predicted_time_s must be a finite number >= 0, got {msg.predicted_time_s}")
    for j, rid in enumerate(msg.freed_request_ids):
        if not rid:
            raise ValueError(f"freed_request_ids[{j}] is empty")
    seen: set[str] = set()
    chunks = []
    for i, c in enumerate(msg.chunks):
        if c.request_id in seen:
            raise ValueError(f"chunks[{i}]: request {c.request_id!r} appears twice in one plan")
        seen.add(c.request_id)
        chunks.append(_chunk_from_proto(i, c, default_max_tokens))
    return WorkerPlan(
        iteration=msg.iteration,
        epoch=msg.epoch,
        chunks=chunks,
        freed_request_ids=list(msg.freed_request_ids),
        predicted_time_s=msg.predicted_time_s,
        fence=msg.fence,
    )


def plan_to_proto(plan: WorkerPlan) -> worker_pb2.BatchPlan:
    """The inverse of ``plan_from_proto`` (tests, tools, and any Python scheduler client)."""
    msg = worker_pb2.BatchPlan(
        iteration=plan.iteration, epoch=plan.epoch, freed_request_ids=list(plan.freed_request_ids),
        predicted_time_s=plan.predicted_time_s, fence=plan.fence,
    )
    for c in plan.chunks:
        chunk = msg.chunks.add(
            request_id=c.request_id, num_computed_tokens=c.num_computed_tokens,
            token_ids=[] if c.sampled_input else c.token_ids, sampled_input=c.sampled_input,
            new_block_ids=c.new_block_ids, is_new=c.is_new, block_table=c.block_table, samples=c.samples,
            num_output_tokens=c.num_output_tokens, prompt_len=c.prompt_len,
        )
        if c.sampling is not None:
            chunk.sampling_params.CopyFrom(sampling_to_proto(c.sampling))
    return msg


# -- results and description ---------------------------------------------------------------
def result_to_proto(result: ExecResult, finished_at: float = 0.0) -> worker_pb2.IterationResult:
    """``finished_at``: this worker's clock when the result was ready (the scheduler measures the
    hop back to it)."""
    msg = worker_pb2.IterationResult(
        iteration=result.iteration, sampled_token_ids=result.sampled_token_ids, elapsed_s=result.elapsed_s,
        finished_at=finished_at,
    )
    for rid, lp in result.logprobs.items():
        msg.logprobs[rid].CopyFrom(logprob_to_proto(lp))
    return msg


def result_from_proto(msg: worker_pb2.IterationResult) -> ExecResult:
    return ExecResult(iteration=msg.iteration, sampled_token_ids=dict(msg.sampled_token_ids),
                      elapsed_s=msg.elapsed_s, logprobs=logprobs_map_from_proto(msg.logprobs))
