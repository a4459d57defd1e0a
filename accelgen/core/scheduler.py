"""The scheduling core: request lifecycle around a pluggable policy. No I/O, no clock.

``step(now)`` asks the policy for the next batch and returns it as a ``BatchPlan``;
``complete(plan, result, now)`` applies what the worker reported: computed tokens, sampled
tokens, finishes. The service calls these with the real clock and a gRPC worker, the simulator
with a virtual clock and the cost model — the same objects either way.

Stops are decided here (EOS, stop ids, ``max_tokens``, model context), never by the worker:
the worker's model runner would happily keep generating.

Pipelining (what vLLM calls async scheduling): a lane that wants plan k+1 decided while the
worker runs plan k calls ``dispatch(plan)`` after ``step``. The core then counts the plan as
run: computed tokens advance, and each token it samples is a ``PENDING_TOKEN`` at the end of
the request's outputs, so the next ``step`` schedules that request's decode with the worker's
own sampled token as input. ``complete`` fills the pending tokens in, in plan order. A request
that stops at step k may already be in plan k+1: its k+1 token is discarded (the request is
done when that result arrives), and its KV blocks, freed at the stop, are reused only by plans
that run after k+1 on the worker. A request whose tokens are still pending is never admitted
(a recompute must send real token ids), and one whose pending tokens already reach
``max_tokens`` or the context is not scheduled again. Without ``dispatch`` none of this
happens: the simulator and unpipelined lanes see exactly the old behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from accelgen.core.batch_builder import BatchBuilder
from accelgen.core.kv_blocks import KVBlockManager
from accelgen.core.logprobs import TokenLogprob
from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import PENDING_TOKEN, FinishReason, Request, RequestStatus
from accelgen.core.request_queue import RequestQueue

if TYPE_CHECKING:
    from accelgen.core.policies.base import Policy


@dataclass(frozen=True, slots=True)
class CoreConfig:
    max_num_seqs: int = 256
    """Most requests running (holding KV) at once; vLLM's default on A100."""
    max_num_batched_tokens: int | None = None
    """Most tokens one plan may carry, whatever the policy's budget: the worker's own limit."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    token_id: int
    index: int  # 0 = first output token
    time_s: float
    logprob: TokenLogprob | None = None  # only when the request asked for logprobs


@dataclass(slots=True)
class StepOutcome:
    """What ``complete`` changed: tokens delivered and requests that ended."""

    tokens: list[TokenEvent] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


class SchedulerCore:
    def __init__(
        self,
        policy: "Policy",
        profile: DeviceProfile,
        kv: KVBlockManager | None = None,
        config: CoreConfig | None = None,
    ) -> None:
        self.policy = policy
        self.profile = profile
        self.kv = kv or KVBlockManager(profile.num_blocks, profile.block_size)
        self.config = config or CoreConfig()
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []  # admission order: vLLM's priority among running
        self.waiting: RequestQueue = RequestQueue(policy.queue_key)
        self.on_worker: set[str] = set()  # requests whose full state the worker holds
        self._to_free: list[str] = []  # ids the worker must forget in the next plan
        self.iteration = 0
        policy.bind(self)

    # -- intake -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens >= self.profile.max_model_len:
            raise ValueError(
                f"prompt of {request.num_prompt_tokens} tokens does not fit the model context of "
                f"{self.profile.max_model_len} (at least one token must be generated)"
            )
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def submit(self, request: Request, now: float) -> None:
        """``add_request`` behind the policy's admission control: raises ``AdmissionRefused``
        (and queues nothing) when the policy refuses the request at this moment."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.policy.check_admission(request, now)
        self.add_request(request)

    def adopt(self, request: Request) -> None:
        """Take over a request that was running elsewhere (a dead worker, a restarted scheduler).

        Its outputs so far are kept; its KV is gone, so everything is recomputed, exactly as
        after a recompute preemption.
        """
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.num_computed_tokens = 0
        resumed = bool(request.output_token_ids)
        request.status = RequestStatus.PREEMPTED if resumed else RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request, preempted=resumed)

    def release_unfinished(self) -> list[Request]:
        """Hand back every unfinished request (this core's worker is gone); the core is then empty."""
        out = [r for r in self.requests.values() if not r.status.is_done]
        for r in out:
            self.kv.free(r.request_id)
            r.drop_pending_outputs()  # never computed anywhere that survives
        self.running.clear()
        for r in list(self.waiting):
            self.waiting.remove(r.request_id)
        self.requests = {rid: r for rid, r in self.requests.items() if r.status.is_done}
        self.on_worker.clear()
        return out

    def take_unstarted(self) -> list[Request]:
        """Remove and return, in queue order, the waiting requests this core never started: no
        token computed, no KV block, no output (pending or known), never in a plan (status still
        WAITING: a preempted one may be in a plan in flight). Another core can run them as new
        requests and lose nothing: a drain hands them to a worker that is staying."""
        out = [r for r in self.waiting if r.status is RequestStatus.WAITING and r.num_computed_tokens == 0
               and not r.output_token_ids and r.num_pending_outputs == 0
               and not self.kv.num_blocks_of(r.request_id) and r.request_id not in self.on_worker]
        for r in out:
            self.waiting.remove(r.request_id)
            del self.requests[r.request_id]
        return out

    def cancel(self, request_id: str, now: float) -> bool:
        """Cancel a live request; returns False if unknown or already done."""
        request = self.requests.get(request_id)
        if request is None or request.status.is_done:
            return False
        self._finish(request, FinishReason.CANCELLED, now, RequestStatus.CANCELLED)
        return True

    def finish_stopped(self, request_id: str, keep: int, now: float) -> bool:
        """Finish a live request as STOP with only its first ``keep`` outputs: a stop string the
        gateway found in the text (the scheduler has no tokenizer) ends it as vLLM would, where
        the token completing the string was sampled. Outputs after ``keep`` (sampled meanwhile,
        or pending in plans in flight) are discarded. False if unknown or already done;
        ``ValueError`` if ``keep`` exceeds the outputs known so far."""
        request = self.requests.get(request_id)
        if request is None or request.status.is_done:
            return False
        if not 0 <= keep <= request.num_known_outputs:
            raise ValueError(f"keep = {keep} is not within the {request.num_known_outputs} outputs of {request_id!r}")
        self._finish(request, FinishReason.STOP, now, RequestStatus.FINISHED)  # drops the pending outputs
        del request.output_token_ids[keep:]
        return True

    # -- transitions used by the batch builder -------------------------------------------
    def admit(self, request: Request) -> None:
        self.waiting.remove(request.request_id)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def preempt(self, request: Request) -> None:
        """Recompute preemption: drop its KV, forget it on the worker, requeue it."""
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        if request.request_id in self.on_worker:
            self.on_worker.discard(request.request_id)
        self.waiting.add(request, preempted=True)

    # -- the iteration -------------------------------------------------------------------
    def step(self, now: float) -> BatchPlan:
        """Form the next batch. An empty plan may still carry ids to free."""
        builder = BatchBuilder(self, now)
        self.policy.fill(builder, now)
        self.iteration += 1
        plan = builder.build(self.iteration)
        # Preempted requests are forgotten by the worker first; the plan's own chunks cannot
        # name them (the builder took them out), so the order on the worker is unambiguous.
        plan.freed_request_ids = self._to_free + plan.preempted_request_ids
        self._to_free = []
        for chunk in plan.chunks:
            self.on_worker.add(chunk.request_id)
        return plan

    def dispatch(self, plan: BatchPlan) -> None:
        """Count ``plan`` as run before its result arrives, so that the next ``step`` can be
        decided while the worker executes it (see the module docstring)."""
        for chunk in plan.chunks:
            request = self.requests[chunk.request_id]
            request.num_computed_tokens = chunk.num_computed_tokens + chunk.num_new_tokens
            if chunk.samples:
                request.output_token_ids.append(PENDING_TOKEN)
                request.num_pending_outputs += 1
        plan.dispatched = True

    def complete(self, plan: BatchPlan, result: IterationResult, now: float) -> StepOutcome:
        """Apply a worker's result for ``plan``; returns the delivered tokens and finishes.
        Results of dispatched plans must come in the order the plans were stepped."""
        outcome = StepOutcome()
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if plan.dispatched:
                # Computed tokens were counted at dispatch. A request preempted by a later plan
                # still gets its token (it is real: recomputing keeps it); a done one does not.
                if request is None or request.status.is_done or not chunk.samples:
                    continue
                index = len(request.output_token_ids) - request.num_pending_outputs
            else:
                if request is None or request.status is not RequestStatus.RUNNING:
                    continue  # cancelled while the iteration ran
                request.num_computed_tokens = chunk.num_computed_tokens + chunk.num_new_tokens
                if not chunk.samples:
                    continue
                index = request.num_output_tokens
            token = result.sampled_token_ids.get(chunk.request_id)
            if token is None:
                raise ValueError(f"worker returned no token for {chunk.request_id!r}, which the plan samples")
            if plan.dispatched:
                request.output_token_ids[index] = token
                request.num_pending_outputs -= 1
            else:
                request.output_token_ids.append(token)
            outcome.tokens.append(TokenEvent(chunk.request_id, token, index, now,
                                             self._logprob(request, token, result)))
            if request.first_token_s is None:
                request.first_token_s = now
            request.last_token_s = now
            reason = self._stop_reason(request, token, index + 1)
            if reason is not None:
                self._finish(request, reason, now, RequestStatus.FINISHED)
                outcome.finished.append(request)
        self.policy.after_iteration(plan, result, now)
        return outcome

    @staticmethod
    def _logprob(request: Request, token: int, result: IterationResult) -> TokenLogprob | None:
        """The token's logprobs if its request asked for them (the worker computed them when it
        sampled the token; a recompute never samples it again, so they are never replaced)."""
        if request.sampling.logprobs is None:
            return None
        lp = result.logprobs.get(request.request_id)
        if lp is None:
            raise ValueError(f"worker returned no logprobs for {request.request_id!r}, which asked for them")
        if lp.token_id != token or len(lp.top) > request.sampling.logprobs:
            raise ValueError(f"worker's logprobs for {request.request_id!r} are for token {lp.token_id} with "
                             f"{len(lp.top)} top tokens; it sampled {token}, and "
                             f"{request.sampling.logprobs} were asked")
        return lp

    def _stop_reason(self, request: Request, token: int, num_outputs: int) -> FinishReason | None:
        """Why the request stops after ``token``, its output number ``num_outputs``."""
        sp = request.sampling
        if not sp.ignore_eos and request.eos_token_id is not None and token == request.eos_token_id:
            return FinishReason.STOP
        if token in sp.stop_token_ids:
            return FinishReason.STOP
        if request.reaches_length_limit(num_outputs, self.profile.max_model_len):
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason, now: float, status: RequestStatus) -> None:
        # Tokens of plans still in flight are never delivered; their results find it done.
        request.drop_pending_outputs()
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request.request_id)
        self.kv.free(request.request_id)
        if request.request_id in self.on_worker:
            self.on_worker.discard(request.request_id)
            self._to_free.append(request.request_id)
        request.status = status
        request.finish_reason = reason
        request.finish_s = now
        self.policy.on_finish(request)

    # -- views ---------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    @property
    def has_ids_to_free(self) -> bool:
        """Whether the next plan must tell the worker to forget requests (finished or cancelled)."""
        return bool(self._to_free)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (the service does this once it is delivered)."""
        request = self.requests.get(request_id)
        if request is not None and request.status.is_done:
            del self.requests[request_id]
