"""The cost-model executor: a worker without a model, timed by the device profile.

It sleeps for the profile's predicted time of the exact batch (``batch_time_s`` over
``(new tokens, computed tokens)`` per chunk), scaled by ``time_scale`` (0 = no sleep, so an
overhead benchmark measures the scheduler and gRPC alone). Sampled tokens are a hash of
(request id, output index): deterministic across runs, iterations and recomputation, so a
request preempted and recomputed produces the same output, as greedy decoding would. They
are never below 10, hence never EOS; requests end by length, as in the paper's traces.

Logprobs (a request with ``sampling.logprobs`` = k) come from a fake distribution, as
deterministic as the tokens (``sim_logprob``): the tokens at one output position are ranked
consecutive ids around the sampled one, and the token of rank r has probability 2^-r (so every
logprob is -r ln 2 < 0 and the probabilities of any listed tokens sum to < 1). The sampled token
has rank 1 when the request is greedy (temperature 0), else rank 1..3 by a hash of (request id,
index); the top k are ranks 1..k, most likely first.

It checks plans like vLLM's runner would (``RequestTable``), so the sim catches the same
scheduler bugs the real worker would.

``fail_after`` (the worker's ``sim_fail_after``) injects a device failure: after that many
successful iterations every iteration raises ``SimulatedDeviceError``, so the worker's handling
of a failed device (answer INTERNAL, then exit with status 4) is tested on a real process.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from typing import TYPE_CHECKING

from accelgen.core.logprobs import TokenLogprob
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import SamplingParams
from accelgen.profiles import DEFAULT_PROFILE, load_profile
from worker_service.executors.base import Executor
from worker_service.executors.request_table import RequestTable
from worker_service.plan import ExecResult, WorkerPlan
from accelgen.core.worker_info import WorkerInfo

if TYPE_CHECKING:
    from worker_service.config import WorkerConfig

DEFAULT_VOCAB_SIZE = 50272  # OPT's vocabulary
DEFAULT_EOS_TOKEN_ID = 2  # OPT's </s>
FIRST_SAMPLED_TOKEN = 10  # sampled ids start here: never EOS or another special token


class SimulatedDeviceError(RuntimeError):
    """What the sim raises once ``fail_after`` iterations have run: a device that broke."""


def sim_token(request_id: str, index: int, vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """The token the sim samples as output number ``index`` of ``request_id``."""
    return FIRST_SAMPLED_TOKEN + zlib.crc32(f"{request_id}:{index}".encode()) % (vocab_size - FIRST_SAMPLED_TOKEN)


def sim_logprob(request_id: str, index: int, sampling: SamplingParams | None,
                vocab_size: int = DEFAULT_VOCAB_SIZE) -> TokenLogprob | None:
    """The logprobs of output ``index`` of ``request_id`` (the token ``sim_token`` samples there)
    under the sim's fake distribution (module docstring); None if the request did not ask."""
    if sampling is None or sampling.logprobs is None:
        return None
    token = sim_token(request_id, index, vocab_size)
    span = vocab_size - FIRST_SAMPLED_TOKEN
    rank = 1 if sampling.temperature == 0 else 1 + zlib.crc32(f"{request_id}:{index}:rank".encode()) % 3
    rank = min(rank, span)

    def ranked(r: int) -> int:  # the token of rank r: consecutive ids, the sampled one at ``rank``
        return FIRST_SAMPLED_TOKEN + (token - FIRST_SAMPLED_TOKEN + r - rank) % span

    top = tuple((ranked(r), -r * math.log(2)) for r in range(1, min(sampling.logprobs, span) + 1))
    return TokenLogprob(token_id=token, logprob=-rank * math.log(2), rank=rank, top=top)


class SimExecutor(Executor):
    name = "sim"

    def __init__(
        self,
        profile: DeviceProfile | str = DEFAULT_PROFILE,
        time_scale: float = 1.0,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        eos_token_id: int = DEFAULT_EOS_TOKEN_ID,
        fail_after: int = 0,
    ) -> None:
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0 (0 = no sleep), got {time_scale}")
        if vocab_size <= FIRST_SAMPLED_TOKEN:
            raise ValueError(f"vocab_size must be > {FIRST_SAMPLED_TOKEN}, got {vocab_size}")
        self.profile = profile if isinstance(profile, DeviceProfile) else load_profile(profile)
        self.time_scale = time_scale
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        if fail_after < 0:
            raise ValueError(f"fail_after must be >= 0 (0 = never), got {fail_after}")
        self.fail_after = fail_after
        self.iterations_run = 0
        self.requests = RequestTable(self.profile.num_blocks, self.profile.block_size,
                                     self.profile.max_model_len, vocab_size)
        self._info = WorkerInfo(
            model=self.profile.name,
            executor=self.name,
            block_size=self.profile.block_size,
            num_blocks=self.profile.num_blocks,
            max_model_len=self.profile.max_model_len,
            profile_json=json.dumps(self.profile.to_dict(), sort_keys=True),
            eos_token_id=eos_token_id,
            vocab_size=vocab_size,
        )

    @classmethod
    def from_config(cls, config: "WorkerConfig") -> "SimExecutor":
        return cls(profile=config.profile, time_scale=config.time_scale, vocab_size=config.vocab_size,
                   eos_token_id=config.eos_token_id, fail_after=config.sim_fail_after)

    def describe(self) -> WorkerInfo:
        return self._info

    def execute(self, plan: WorkerPlan) -> ExecResult:
        if self.fail_after and self.iterations_run >= self.fail_after:
            raise SimulatedDeviceError(f"simulated device failure (sim_fail_after={self.fail_after})")
        prepared = self.requests.prepare(plan)  # raises before anything "runs"
        self._check_decode_tokens(plan, prepared.states)
        elapsed = 0.0
        if plan.chunks and self.time_scale > 0:
            modeled = self.profile.batch_time_s((len(c.token_ids), c.num_computed_tokens) for c in plan.chunks)
            start = time.perf_counter()
            time.sleep(modeled * self.time_scale)
            elapsed = time.perf_counter() - start
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprob] = {}
        for c, state in zip(plan.chunks, prepared.states):
            if not c.samples:
                continue
            index = c.num_computed_tokens + len(c.token_ids) - state.prompt_len
            sampled[c.request_id] = sim_token(c.request_id, index, self.vocab_size)
            lp = sim_logprob(c.request_id, index, state.sampling, self.vocab_size)
            if lp is not None:
                logprobs[c.request_id] = lp
        self.requests.commit(prepared)
        self.iterations_run += 1
        return ExecResult(iteration=plan.iteration, sampled_token_ids=sampled, elapsed_s=elapsed, logprobs=logprobs)

    def _check_decode_tokens(self, plan: WorkerPlan, states) -> None:
        """A decode feeds back tokens this worker sampled; vLLM's runner refuses others, and so
        does the sim (its samples are a function of request and index, so it needs no memory)."""
        for i, (c, state) in enumerate(zip(plan.chunks, states)):
            if c.is_new or c.sampled_input or c.num_computed_tokens < state.known_len:
                continue  # a sampled_input decode runs the token this worker sampled (RequestTable)
            expected = [sim_token(c.request_id, p - state.prompt_len, self.vocab_size)
                        for p in range(c.num_computed_tokens, state.num_computed_tokens)]
            if list(c.token_ids) != expected:
                raise ValueError(f"chunks[{i}] (request {c.request_id!r}): token_ids {list(c.token_ids)[:8]} are not "
                                 f"the tokens this worker sampled there ({expected[:8]}); resend it with is_new")

    def reset(self) -> None:
        self.requests.reset()
