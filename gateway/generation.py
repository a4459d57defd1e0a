"""One request's path through the gateway, shared by the gRPC and the OpenAI front ends.

``prepare`` validates and tokenises (nothing reaches the scheduler if it fails), ``start``
submits, and ``ActiveRequest.deltas`` streams the output as text deltas with timings. A front
end only translates these into its own wire format, so both behave identically: same checks,
same SLO resolution, same resume-after-restart, same cancel-when-abandoned.

A request whose consumer stops reading before it finished (client disconnected, handler
cancelled, stream error) is cancelled at the scheduler: nobody will read its tokens, and its
KV blocks and batch slots belong to requests someone still waits for.

Every call names its ``Caller`` (``gateway.auth``): a new request is admitted under the caller's
key limits, checked against the classes its key may use, and submitted with its tenant and a
request id this gateway makes (``uuid4``: a client's own id is only a label, so nobody can pick,
guess or collide with another's id). A request is read, cancelled or attached to only by its
tenant: anyone else gets the NOT_FOUND an unknown id gets, word for word (``owned_state``).

``attach`` re-attaches a client to a request by id (after its gateway died, through any
gateway): it watches the request from token 0, feeds the tokens before the client's index to the
detokenizer without sending them, and streams the rest — so chunks carry exactly the tokens from
that index, and their text is what those tokens add after the output before it, as Generate
would have sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncGenerator, Callable

import grpc
import structlog

from accelgen.common.tls import is_loopback
from accelgen.v1 import common_pb2, gateway_pb2, scheduler_pb2
from gateway.auth import OPEN, Caller, KeyRing, warn_if_open
from gateway.config import GatewayConfig
from gateway.convert import (GRPC_NAMES, FieldNames, catalog_from_info, check_prompt, check_prompt_chars,
                             check_request_id, spec_to_slo, to_submit_request, validate_request)
from gateway.errors import GatewayError
from gateway.limits import NO_LEASE, Lease
from gateway.metrics import NO_METER, GatewayMetrics, RequestMeter, counts_failures
from gateway.logprobs import TokenLogprobInfo, logprobs_from_proto
from gateway.scheduler_client import DONE_STATES, SchedulerClient
from gateway.stop_strings import OutputText
from gateway.tokenizer import IncrementalDetokenizer, Tokenizer
from accelgen.core.metrics import RequestRecord
from accelgen.core.slo import SLOCatalog

log = structlog.get_logger("gateway.generation")

# Tokenising a long prompt takes milliseconds; off the event loop it does not delay the tokens
# streamed to every other client meanwhile.
_THREAD_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class Prepared:
    """A validated, tokenised request, ready to submit."""

    submit: scheduler_pb2.SubmitRequest
    text_output: bool          # detokenise the output (False for token-id clients over gRPC)
    arrival_s: float           # gateway wall clock when the request arrived (for TTFT)
    stop: tuple[str, ...] = ()  # stop strings, found here in the text (gateway.stop_strings)
    include_stop_str_in_output: bool = False


@dataclass(frozen=True)
class Delta:
    """New output since the previous delta."""

    token_ids: list[int]
    text: str
    emitted_at: list[float]
    completion_tokens: int     # tokens so far, these included
    finished: bool
    finish_reason: str         # "" until finished
    # One per token of ``token_ids`` when the request asked for logprobs; empty otherwise.
    logprobs: list[TokenLogprobInfo] = field(default_factory=list)
    # Once finished with "stop": the stop string that ended it, or the stop token id (None: EOS).
    stop_reason: str | int | None = None


@dataclass
class Outcome:
    """The whole output and how it went, once the request finished."""

    output_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    mean_tbt_ms: float
    slo_met: bool
    logprobs: list[TokenLogprobInfo] = field(default_factory=list)  # aligned with output_ids; empty: not asked
    stop_reason: str | int | None = None  # as Delta.stop_reason


@dataclass
class ActiveRequest:
    """A submitted request whose tokens are being streamed."""

    prepared: Prepared
    slo: common_pb2.SLOSpec  # what the scheduler will hold it to (empty: what we resolved)
    client: SchedulerClient
    tokenizer: Tokenizer
    tbt_tolerance: float
    _output: list[int] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)
    _logprobs: list[TokenLogprobInfo] = field(default_factory=list)
    _text: list[str] = field(default_factory=list)
    _finish_reason: str = ""
    _finish_s: float | None = None
    _detok: OutputText | None = None
    _stop_reason: str | int | None = None
    emit_from: int = 0             # tokens before this index are applied but not streamed (Attach)
    cancel_on_abandon: bool = True
    lease: Lease = NO_LEASE        # its place under its key's concurrency cap, until the stream ends
    on_close: Callable[[], None] | None = None
    meter: RequestMeter = NO_METER  # its outcome and latency in the gateway's metrics (gateway/metrics.py)

    def __post_init__(self) -> None:
        if self.prepared.text_output or self.prepared.stop:  # stop strings need the text
            self._detok = OutputText(IncrementalDetokenizer(self.tokenizer, self.prepared.submit.prompt_token_ids),
                                     self.prepared.stop, self.prepared.include_stop_str_in_output)

    @property
    def request_id(self) -> str:
        return self.prepared.submit.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.submit.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self._finish_s is not None

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        """Stream the output from where this object stands; cancels the request if abandoned."""
        try:
            async with contextlib.aclosing(self.client.watch(self.request_id, len(self._output))) as batches:
                async for batch in batches:
                    hidden = self.emit_from - len(self._output)
                    if hidden > 0:  # an attached client has these: only the detokenizer sees them
                        head, rest = _split(batch, hidden)
                        self._apply(head)
                        if rest is None:
                            continue
                        batch = rest
                    delta = self._apply(batch)
                    yield delta
                    if delta.finished:
                        return
        except Exception as exc:
            self.meter.failed(exc)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Its stream is over, read to the end or not: give back its place under the key's limits,
        and cancel it at the scheduler unless it finished (or is kept running)."""
        self.lease.release()
        if self.on_close is not None:
            self.on_close, on_close = None, self.on_close
            on_close()
        if not self.finished and self.cancel_on_abandon:
            self.cancel_on_abandon = False  # once
            self.meter.abandoned()
            log.info("request_abandoned", request_id=self.request_id, delivered=len(self._output))
            self.client.cancel_in_background(self.request_id)

    async def collect(self) -> Outcome:
        """Read the stream to its end (non-streaming clients)."""
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for _ in deltas:
                pass
        return self.outcome()

    def _apply(self, batch: scheduler_pb2.TokenBatch) -> Delta:
        ids = list(batch.token_ids)
        times = list(batch.emitted_at)[:len(ids)]
        times += [time.time()] * (len(ids) - len(times))  # a scheduler that sent no times
        logprobs = logprobs_from_proto(batch.logprobs)
        finished, stop_string = batch.finished, None
        if self._detok is not None:
            update = self._detok.update(ids, finished and self._stop_token(ids) is not None)
            stop_string = update.stop_string
            if stop_string is not None:  # the output ends with the token that completed it
                ids, times, logprobs = ids[:update.kept], times[:update.kept], logprobs[:update.kept]
        self._output.extend(ids)
        self._times.extend(times)
        self.meter.tokens(len(ids))
        self._logprobs.extend(logprobs)
        if stop_string is not None:
            self._stop_reason = stop_string
            if not finished:  # it would go on: the GPU is someone else's now
                log.info("request_stop_string", request_id=self.request_id, tokens=len(self._output))
                self.client.cancel_in_background(self.request_id, stop_at=len(self._output))  # finished, "stop"
            finished = True
            self._finish_reason = "stop"
        elif finished:
            self._finish_reason = batch.finish_reason or "stop"
            if self._finish_reason == "stop" and self._output and not self._is_eos(self._output[-1]) \
                    and self._output[-1] in self.prepared.submit.sampling_params.stop_token_ids:
                self._stop_reason = self._output[-1]  # vLLM's stop_reason for a stop token id
        if finished:
            self._finish_s = self._times[-1] if self._times else time.time()
            self.meter.finished(self._slo_met())
        text = self._detok.next_text(finished) if self._detok is not None and self.prepared.text_output else ""
        self._text.append(text)
        return Delta(token_ids=ids, text=text, emitted_at=times, completion_tokens=len(self._output),
                     finished=finished, finish_reason=self._finish_reason, logprobs=logprobs,
                     stop_reason=self._stop_reason)

    def _stop_token(self, ids: list[int]) -> int | None:
        """The last of ``ids`` when it is one that ends a request at the scheduler (EOS unless
        ignored, or a stop token id): it adds no text (vLLM's ``stop_terminated``)."""
        if not ids:
            return None
        last = ids[-1]
        return last if self._is_eos(last) or last in self.prepared.submit.sampling_params.stop_token_ids else None

    def _is_eos(self, token: int) -> bool:
        submit = self.prepared.submit
        return submit.has_eos_token_id and not submit.sampling_params.ignore_eos and token == submit.eos_token_id

    def outcome(self) -> Outcome:
        times, arrival = self._times, self.prepared.arrival_s
        ttft_ms = max(0.0, (times[0] - arrival) * 1000) if times else 0.0
        mean_tbt_ms = (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else 0.0
        return Outcome(output_ids=list(self._output), text="".join(self._text), finish_reason=self._finish_reason,
                       prompt_tokens=self.prompt_tokens, completion_tokens=len(self._output), ttft_ms=ttft_ms,
                       mean_tbt_ms=mean_tbt_ms, slo_met=self._slo_met(), logprobs=list(self._logprobs),
                       stop_reason=self._stop_reason)

    def _slo_met(self) -> bool:
        # The scheduler's metrics define attainment; we apply the same rule to what we measured.
        slo = spec_to_slo(self.slo) or spec_to_slo(self.prepared.submit.slo)
        if slo is None or self._finish_s is None:
            return False
        record = RequestRecord(request_id=self.request_id, app_class=self.prepared.submit.app_class, slo=slo,
                               arrival_s=self.prepared.arrival_s, prompt_len=self.prompt_tokens,
                               token_times=list(self._times), finish_s=self._finish_s,
                               finish_reason=self._finish_reason)
        return record.attained(self.tbt_tolerance)


def _split(batch: scheduler_pb2.TokenBatch, n: int
           ) -> tuple[scheduler_pb2.TokenBatch, scheduler_pb2.TokenBatch | None]:
    """``batch``'s first ``n`` tokens (never finished) and the rest (None when nothing is left:
    a finished batch always leaves a rest, if only an empty one that carries the end)."""
    ids, times, lps = list(batch.token_ids), list(batch.emitted_at), list(batch.logprobs)
    if len(ids) < n or (len(ids) == n and not batch.finished):
        return batch, None
    head = scheduler_pb2.TokenBatch(request_id=batch.request_id, token_ids=ids[:n], start_index=batch.start_index,
                                    emitted_at=times[:n], prompt_tokens=batch.prompt_tokens, logprobs=lps[:n])
    rest = scheduler_pb2.TokenBatch(request_id=batch.request_id, token_ids=ids[n:], start_index=batch.start_index + n,
                                    emitted_at=times[n:], finished=batch.finished, finish_reason=batch.finish_reason,
                                    prompt_tokens=batch.prompt_tokens, logprobs=lps[n:])
    return head, rest


class GenerationService:
    """Validation, tokenisation and the scheduler calls, behind both front ends."""

    def __init__(self, client: SchedulerClient, tokenizer: Tokenizer, config: GatewayConfig,
                 catalog: SLOCatalog | None = None) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.config = config
        # Application classes come from the scheduler (its ServerInfo), so a scheduler configured
        # with its own classes needs no matching gateway configuration; ``catalog`` pins them.
        self._pinned_catalog = catalog
        self._catalog = catalog if catalog is not None else SLOCatalog()
        self._catalog_source: scheduler_pb2.ServerInfo | None = None
        self.metrics = GatewayMetrics(lambda: self._catalog.names)  # served at /metrics (gateway/metrics.py)
        self.keys = KeyRing(config.keys, config.limit_defaults)
        warn_if_open(self.keys, config.host, is_loopback)
        # The tenants of the requests this gateway streams now: cancelling one of those needs no
        # GetRequest (which reads the scheduler's store, and must not be what stops a Cancel
        # while Redis is away).
        self._streaming: dict[str, str] = {}

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller a request's ``authorization`` value names (UNAUTHENTICATED when none does;
        everyone is ``OPEN`` on a gateway without keys)."""
        return self.keys.authenticate(authorization)

    def _catalog_for(self, info: scheduler_pb2.ServerInfo | None) -> SLOCatalog:
        if self._pinned_catalog is None and info is not None and info is not self._catalog_source:
            self._catalog = catalog_from_info(info)
            self._catalog_source = info
            if self.config.default_app_class not in self._catalog:
                log.warning("default_app_class_unknown", default_app_class=self.config.default_app_class,
                            scheduler_classes=list(self._catalog.names),
                            effect="requests that name no class are refused")
        return self._catalog

    @property
    def _knows_classes(self) -> bool:
        """Whether the catalog is the scheduler's (or pinned), not the built-in stand-in."""
        return self._pinned_catalog is not None or self._catalog_source is not None

    @counts_failures(lambda service, req: req.app_class or service.config.default_app_class)
    async def prepare(self, req: gateway_pb2.GenerateRequest, names: FieldNames = GRPC_NAMES,
                      text_output: bool | None = None, caller: Caller = OPEN,
                      chars_checked: bool = False) -> Prepared:
        """Validate and tokenise; raises INVALID_ARGUMENT (naming the field) before any Submit,
        PERMISSION_DENIED for a class or SLO the caller's key may not use.

        ``text_output`` defaults to "the client sent text" (a token-id client wants ids back).
        ``chars_checked``: the front end has already held the text to ``max_prompt_chars``
        (a chat's message contents before its template ran, and the templated text after).
        """
        arrival_s = time.time()
        if not chars_checked:
            check_prompt_chars(req, self.config.max_prompt_chars, names)  # before anything costs
        key_default = caller.default_class(self.config.default_app_class)
        if not req.app_class and key_default != self.config.default_app_class:
            req.app_class = key_default  # the gateway's default is not this key's: its first class
        try:
            info: scheduler_pb2.ServerInfo | None = await self.client.server_info()
            info_error = None
        except grpc.aio.AioRpcError as exc:  # bad input is still reported as such, then this
            info, info_error = None, exc
        catalog = self._catalog_for(info)
        try:
            label, sampling, app_class, slo = validate_request(req, self.config, catalog, names)
            caller.check_class(app_class, spec_to_slo(req.slo), catalog, names)
        except GatewayError as exc:
            if info_error is not None and exc.param == names["app_class"] and not self._knows_classes:
                raise info_error from None  # the classes are the scheduler's, and it cannot be asked
            raise
        if req.WhichOneof("input") == "text":
            text = req.text
            if len(text) > _THREAD_TOKENIZE_CHARS:
                prompt_ids = await asyncio.to_thread(self.tokenizer.encode, text)
            else:
                prompt_ids = self.tokenizer.encode(text)
        else:
            prompt_ids = list(req.tokenized.input_ids)
        if info is None:
            assert info_error is not None
            raise info_error
        # The workers' vocabulary bounds every id (a larger one would fail whole iterations);
        # a real tokenizer's own vocabulary bounds them too.
        limits = [info.vocab_size] if info.vocab_size else []
        if self.tokenizer.checks_vocab:
            limits.append(self.tokenizer.vocab_size)
        vocab = min(limits) if limits else None
        max_new = sampling.max_new_tokens if sampling.HasField("max_new_tokens") else None
        check_prompt(prompt_ids, info.max_model_len, vocab, names, max_new)
        submit = to_submit_request(uuid.uuid4().hex, prompt_ids, sampling, app_class, slo,
                                   self.tokenizer.eos_token_id, tenant=caller.tenant, label=label, stop=req.stop,
                                   include_stop=req.include_stop_str_in_output)
        if text_output is None:
            text_output = req.WhichOneof("input") == "text"
        return Prepared(submit=submit, text_output=text_output, arrival_s=arrival_s, stop=tuple(req.stop),
                        include_stop_str_in_output=req.include_stop_str_in_output)

    @counts_failures(lambda service, prepared: prepared.submit.app_class)
    async def start(self, prepared: Prepared, lease: Lease = NO_LEASE) -> ActiveRequest:
        """Submit; once this returns the request is durable at the scheduler (and holds ``lease``
        until its stream ends; a failed Submit releases it)."""
        response: scheduler_pb2.SubmitResponse | None = None
        try:
            response = await self.client.submit(prepared.submit)
        except grpc.aio.AioRpcError as exc:  # the client sees the status; the operator needs the line
            log.warning("submit_failed", request_id=prepared.submit.request_id, code=exc.code().name,
                        details=exc.details())
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                # The scheduler may have accepted it all the same (its write outlives the call),
                # and this client is told it failed: nobody would read or cancel it.
                self.client.cancel_in_background(prepared.submit.request_id)
            raise
        except asyncio.CancelledError:
            # The client left while the Submit was in flight; the scheduler may have accepted it,
            # and nobody would ever read or cancel it. (Cancelling an unknown id is harmless.)
            self.client.cancel_in_background(prepared.submit.request_id)
            raise
        finally:
            if response is None:
                lease.release()
        log.info("request_submitted", request_id=prepared.submit.request_id, tenant=prepared.submit.tenant,
                 label=prepared.submit.label, prompt_tokens=len(prepared.submit.prompt_token_ids),
                 app_class=prepared.submit.app_class)
        return ActiveRequest(prepared=prepared, slo=response.slo, client=self.client, tokenizer=self.tokenizer,
                             tbt_tolerance=self.config.slo_tbt_tolerance, lease=lease,
                             on_close=self._streaming_for(prepared.submit.request_id, prepared.submit.tenant),
                             meter=self.metrics.meter(prepared.submit.app_class, prepared.arrival_s))

    def _streaming_for(self, request_id: str, tenant: str) -> Callable[[], None]:
        """Note that this gateway streams ``request_id`` for ``tenant``; the call undoes it."""
        self._streaming[request_id] = tenant

        def forget() -> None:
            self._streaming.pop(request_id, None)

        return forget

    async def owned_state(self, caller: Caller, request_id: str, include_prompt: bool = False
                          ) -> common_pb2.RequestState:
        """The state of ``caller``'s request ``request_id``. Another tenant's request is NOT_FOUND
        with the very message of an id nobody has (both are written here), so a caller learns
        nothing about ids it does not own — not even that they exist."""
        check_request_id(request_id)
        try:
            state = await self.client.get_request(request_id, include_prompt=include_prompt)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            state = None
        if state is None or state.tenant != caller.tenant:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is unknown (or expired)",
                               "request_id")
        return state

    async def get_request(self, caller: Caller, request_id: str) -> common_pb2.RequestState:
        return await self.owned_state(caller, request_id)

    async def cancel(self, caller: Caller, request_id: str) -> common_pb2.CancelResponse:
        """Cancel ``caller``'s request (NOT_FOUND for anyone else's, as for an unknown id)."""
        check_request_id(request_id)
        if self._streaming.get(request_id) != caller.tenant:  # not one it streams here for this caller
            await self.owned_state(caller, request_id)
        return await self.client.cancel(request_id)

    async def attach(self, request_id: str, from_token_index: int, keep_running: bool = False,
                     caller: Caller = OPEN, lease: Lease = NO_LEASE) -> ActiveRequest:
        """A running or finished (still retained) request of ``caller``'s, to stream from
        ``from_token_index`` (holding ``lease`` until the stream ends; released on failure).

        NOT_FOUND for an unknown or expired id, or another tenant's; OUT_OF_RANGE for an index
        beyond the tokens it has produced (a client was never sent more than the scheduler holds:
        tokens reach a gateway only once durable)."""
        with lease.until_failure():
            return await self._attach(request_id, from_token_index, keep_running, caller, lease)

    async def _attach(self, request_id: str, from_token_index: int, keep_running: bool, caller: Caller,
                      lease: Lease) -> ActiveRequest:
        state = await self.owned_state(caller, request_id, include_prompt=True)
        produced = len(state.output_ids)
        if from_token_index > produced:
            done = " (it has finished)" if state.status in DONE_STATES else " so far"
            raise GatewayError(grpc.StatusCode.OUT_OF_RANGE,
                               f"from_token_index {from_token_index} is beyond the {produced} tokens request "
                               f"{request_id!r} has produced{done}", "from_token_index")
        submit = scheduler_pb2.SubmitRequest(request_id=request_id, prompt_token_ids=state.prompt_token_ids,
                                             app_class=state.app_class, slo=state.slo)
        prepared = Prepared(submit=submit, text_output=True, arrival_s=state.arrival_s or time.time(),
                            stop=tuple(state.stop), include_stop_str_in_output=state.include_stop_str_in_output)
        log.info("request_attached", request_id=request_id, from_token_index=from_token_index,
                 status=state.status, produced=produced)
        return ActiveRequest(prepared=prepared, slo=state.slo, client=self.client, tokenizer=self.tokenizer,
                             tbt_tolerance=self.config.slo_tbt_tolerance, emit_from=from_token_index,
                             cancel_on_abandon=not keep_running, lease=lease,
                             on_close=self._streaming_for(request_id, state.tenant))
