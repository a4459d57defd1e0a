"""Protobuf <-> core dataclasses for the scheduler, in one place. The core never sees *_pb2.

Validation of what clients send happens here too, raising ``InvalidInput`` with the field's
name, so every bad input becomes INVALID_ARGUMENT the same way (``intake``).
"""

from __future__ import annotations

import re

from accelgen.core.fields import FieldError
from accelgen.v1 import scheduler_pb2, worker_pb2
from accelgen.wire.logprobs import logprobs_map_from_proto
from accelgen.wire.sampling import sampling_from_proto, sampling_to_proto
from accelgen.wire.slo import slo_from_proto
from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.request import PENDING_TOKEN, Request
from accelgen.core.slo import SLOCatalog
from accelgen.core.worker_info import WorkerInfo
from accelgen.wire.worker_info import worker_info_from_proto, worker_info_problem

# Every text a peer sends is bounded: each is kept in memory, in Redis, or quoted in errors and logs.
MAX_REQUEST_ID_CHARS = 256
MAX_TAG_CHARS = 128  # tenant, label
MAX_OWNER_CHARS = 256  # a gateway's instance id
MAX_WORKER_ID_CHARS = 128
MAX_ADDRESS_CHARS = 256
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # a Submit's stop strings (the gateway's own bounds)
LABEL_CHARS = re.compile(r"[A-Za-z0-9._:-]*")  # the gateway's check of a client's request id
WORKER_ID_CHARS = re.compile(r"[A-Za-z0-9._:@-]+")  # hostname-pid by default


class InvalidInput(ValueError):
    """A request field is malformed or out of range (-> INVALID_ARGUMENT)."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= 64 else text[:64] + "...")


def check_length(name: str, text: str, most: int, least: int = 0) -> None:
    if not least <= len(text) <= most:
        raise InvalidInput(f"{name} must have {least} to {most} characters, got {len(text)}")


def check_request_id(request_id: str, name: str = "request_id") -> None:
    """Present and at most ``MAX_REQUEST_ID_CHARS``: quoted back in later errors, an unbounded id
    would overflow gRPC's metadata limit."""
    check_length(name, request_id, MAX_REQUEST_ID_CHARS, least=1)


def check_printable(name: str, text: str, most: int) -> None:
    """At most ``most`` characters, printable, no white space."""
    check_length(name, text, most)
    if not text.isprintable() or any(c.isspace() for c in text):
        raise InvalidInput(f"{name} must be printable characters without spaces, got {_shown(text)}")


def submit_tags(msg: scheduler_pb2.SubmitRequest) -> tuple[str, str]:
    """The Submit's (tenant, label), checked (and its owner): stored with the request."""
    check_printable("tenant", msg.tenant, MAX_TAG_CHARS)
    check_length("label", msg.label, MAX_TAG_CHARS)
    if not LABEL_CHARS.fullmatch(msg.label):
        raise InvalidInput(f"label may use only letters, digits and . _ : -, got {_shown(msg.label)}")
    check_printable("owner", msg.owner, MAX_OWNER_CHARS)
    return msg.tenant, msg.label


def submit_stop(msg: scheduler_pb2.SubmitRequest) -> tuple[str, ...]:
    """The Submit's stop strings, checked: kept in the request's record for Attach."""
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise InvalidInput(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(msg.stop)}")
    for i, s in enumerate(msg.stop):
        check_length(f"stop[{i}]", s, MAX_STOP_CHARS, least=1)
    return tuple(msg.stop)


def check_worker_id(worker_id: str) -> None:
    check_length("worker_id", worker_id, MAX_WORKER_ID_CHARS, least=1)
    if not WORKER_ID_CHARS.fullmatch(worker_id):
        raise InvalidInput(f"worker_id may use only letters, digits and . _ : @ -, got {_shown(worker_id)}")


def worker_from_register(msg: scheduler_pb2.RegisterWorkerRequest) -> tuple[str, str, WorkerInfo]:
    """(worker id, address, description) of a RegisterWorker, every field checked before anything
    is built from it: a lane's block accounting is sized by ``num_blocks``."""
    check_worker_id(msg.worker_id)
    check_printable("address", msg.address, MAX_ADDRESS_CHARS)
    if not msg.address:
        raise InvalidInput("address is required (host:port of the worker's Worker service)")
    problem = worker_info_problem(msg.description)
    if problem is not None:
        raise InvalidInput(problem)
    return msg.worker_id, msg.address, worker_info_from_proto(msg.description)


def request_from_submit(msg: scheduler_pb2.SubmitRequest, catalog: SLOCatalog, max_model_len: int,
                        now: float, vocab_size: int | None = None) -> Request:
    check_request_id(msg.request_id)
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
        shown = app_class if len(app_class) <= 64 else app_class[:64] + "..."
        raise InvalidInput(f"app_class {shown!r} is unknown; known classes: {', '.join(catalog.names)}")
    try:
        sampling = sampling_from_proto(msg.sampling_params, default_max_tokens=max_model_len - n)
        slo = slo_from_proto(msg.slo) or catalog.get(app_class).slo
    except FieldError as exc:
        raise InvalidInput(str(exc)) from None
    return Request(
        request_id=msg.request_id,
        prompt_token_ids=list(msg.prompt_token_ids),
        sampling=sampling,
        slo=slo,
        app_class=app_class,
        arrival_s=now,
        eos_token_id=msg.eos_token_id if msg.has_eos_token_id else None,
    )


def plan_to_proto(plan: BatchPlan, requests: dict[str, Request], epoch: str, fence: int = 0) -> worker_pb2.BatchPlan:
    """The worker's view of a plan: token ids to run, blocks, full state for new requests, and
    the leader's fence (0: unfenced), by which a worker tells a deposed scheduler's plans apart.

    Call it right after ``step`` (before ``dispatch``, or after: the token this plan samples is
    not counted as an output either way). A decode whose input token an earlier plan still in
    flight samples is sent as ``sampled_input``: the worker feeds the token it holds."""
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
        sampled_input = False
        if r.num_pending_outputs and PENDING_TOKEN in token_ids:
            if c.is_new or token_ids != [PENDING_TOKEN]:  # the core never plans this
                raise ValueError(f"plan {plan.iteration}: request {c.request_id!r} would send an unknown token")
            token_ids, sampled_input = [], True
        # Outputs before this chunk's own sample (a dispatched plan counts that one already).
        outputs = len(r.output_token_ids) - (1 if plan.dispatched and c.samples else 0)
        chunk = worker_pb2.ScheduledChunk(
            request_id=c.request_id, num_computed_tokens=start, token_ids=token_ids,
            new_block_ids=list(c.new_block_ids), is_new=c.is_new, samples=c.samples,
            num_output_tokens=outputs, sampled_input=sampled_input)
        if c.is_new:
            chunk.block_table.extend(c.block_table)
            chunk.sampling_params.CopyFrom(sampling_to_proto(r.sampling))
            chunk.prompt_len = np_
        chunks.append(chunk)
    return worker_pb2.BatchPlan(iteration=plan.iteration, epoch=epoch, chunks=chunks, fence=fence,
                                freed_request_ids=plan.freed_request_ids, predicted_time_s=plan.predicted_time_s)


def result_from_proto(msg: worker_pb2.IterationResult) -> IterationResult:
    return IterationResult(iteration=msg.iteration, sampled_token_ids=dict(msg.sampled_token_ids),
                           elapsed_s=msg.elapsed_s, logprobs=logprobs_map_from_proto(msg.logprobs))
