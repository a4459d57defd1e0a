"""The vLLM executor: runs each plan on vLLM's own model runner, one iteration at a time.

vLLM's scheduler is not used. The AccelGen scheduler decides everything (which requests run,
how many tokens each, which KV blocks they own); this module only translates a ``WorkerPlan``
into the ``SchedulerOutput`` vLLM's model runner expects, calls ``execute_model`` /
``sample_tokens`` on an in-process ``UniProcExecutor``, and reads the sampled tokens back.
Every vLLM internal the worker touches lives in this one module, and vLLM is imported only
when a ``VllmExecutor`` is constructed (the sim path never needs it).

Engine start-up (``vllm_startup``) mirrors ``EngineCore._initialize_kv_caches`` (vLLM 0.32.0): KV-cache specs,
layout, memory profile, ``get_kv_cache_configs``, ``initialize_from_config``, warm-up. The
block size and block count vLLM chose are what ``describe()`` reports, so the scheduler's
block accounting is vLLM's (block 0 is vLLM's reserved null block and is never handed out).

How a plan maps onto the runner. The runner caches, per request, its "prompt" token ids,
the tokens it sampled itself, its block table and its sampling parameters:

* A request's runner-side prompt is everything this worker computes before it first samples:
  ``prompt_len + num_output_tokens`` tokens of the ``is_new`` chunk (a recomputed request is
  resent as prompt + outputs so far). The plan carries only one chunk of it per iteration,
  so the runner is given the full-length list with the not-yet-seen tail as placeholders,
  and every later prefill chunk re-sends the request as ``NewRequestData`` for an id the
  runner already holds (vLLM's streaming-input update: prompt, block table and
  ``num_computed_tokens`` replaced, sampling generator kept). The runner reads prompt
  tokens only at positions it is told to compute, so a placeholder is never run.
* A decode chunk is ``CachedRequestData``: new blocks appended, ``num_computed_tokens`` and
  ``num_output_tokens`` given. The runner feeds the token it sampled itself; the chunk's
  token is checked against it (a mismatch is a ``ValueError``: resend with ``is_new``); a
  ``sampled_input`` chunk (pipelined plans) carries no token: the runner's own is the input.
* ``is_new`` for an id the runner already holds (a resync) frees the old copy first
  (``finished_req_ids`` is applied before new requests are added).
* ``freed_request_ids`` become ``finished_req_ids``. The runner never decides stops itself:
  the scheduler does, and frees the request.
* Logprobs: a request's ``sampling.logprobs`` = k goes to ``vllm.SamplingParams.logprobs``; the
  runner's sampler then returns, per row of the batch (a row per request, ``req_id_to_index``;
  ``cu_num_generated_tokens`` offsets rows when a request generates several tokens), the sampled
  token first and the batch's largest k most likely tokens after it, with their raw logprobs
  (vLLM's default ``raw_logprobs``: before temperature, top-p, top-k) and the sampled token's
  rank (``_token_logprob``). Only chunks that sample report them; a prefill chunk that stops
  short of the end samples nothing, and a recomputed request never samples its earlier tokens
  again, so each token's logprobs are those of the moment it was sampled.

Plans are checked before anything runs (``RequestTable``, as the sim does, plus the runner's
own limits), so a rejected plan leaves the worker unchanged. If vLLM itself fails mid-plan,
every request is forgotten (the scheduler's next plan for them is rejected and it resends
them with ``is_new``) and the error is raised as a ``RuntimeError``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from accelgen.core.logprobs import TokenLogprob
from accelgen.core.request import SamplingParams
from worker_service.executors.base import Executor
from worker_service.executors.request_table import RequestTable
from worker_service.executors.vllm_startup import (GiB, eos_token_id, init_kv_cache, measured_profile_json,
                                                   set_cpu_threads, set_vllm_env)
from worker_service.plan import ChunkSpec, ExecResult, WorkerPlan
from accelgen.core.worker_info import WorkerInfo

if TYPE_CHECKING:
    from worker_service.config import WorkerConfig

log = logging.getLogger(__name__)

_PLACEHOLDER_TOKEN = 0  # fills prompt positions not yet sent; never run (see module doc)


@dataclass(slots=True)
class _RunnerRequest:
    """What this module knows about a request the runner holds (mirrors its cached state)."""

    prompt: list[int]  # the runner's prompt: prompt_len + outputs-at-is_new tokens
    known: int  # prompt positions filled with real tokens (the rest are placeholders)
    outputs: list[int]  # tokens the runner sampled after ``prompt`` (its output_token_ids)
    block_table: list[int]
    sampling: Any  # vllm.SamplingParams
    num_computed: int

    def copy(self) -> "_RunnerRequest":
        return _RunnerRequest(list(self.prompt), self.known, list(self.outputs), list(self.block_table),
                              self.sampling, self.num_computed)


@dataclass(slots=True)
class _Translated:
    """A plan as vLLM's runner sees it, and this module's request table after it ran."""

    scheduler_output: Any
    requests: dict[str, _RunnerRequest]
    sampling_chunks: list[ChunkSpec] = field(default_factory=list)


class VllmExecutor(Executor):
    """Runs plans on vLLM's model runner in this process (see the module docstring)."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_space_gb: float | None = None,
        seed: int = 0,
        *,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        profile_json: str = "",
        num_blocks: int | None = None,
        cpu_threads: int = 0,
        enforce_eager: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not model:
            raise ValueError("model must name a model (HF id or local directory)")
        if kv_cache_space_gb is not None and kv_cache_space_gb < 0:
            raise ValueError(f"kv_cache_space_gb must be >= 0 (0 = vLLM's default), got {kv_cache_space_gb}")
        set_vllm_env()
        t0 = time.perf_counter()
        self.cpu_threads, self._set_num_threads = set_cpu_threads(cpu_threads)

        from vllm import SamplingParams as VllmSamplingParams
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        self._VllmSamplingParams = VllmSamplingParams
        self._CachedRequestData = CachedRequestData
        self._NewRequestData = NewRequestData
        self._SchedulerOutput = SchedulerOutput

        kwargs: dict[str, Any] = dict(
            model=model,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_prefix_caching=False,  # block ids come from the AccelGen scheduler
            skip_tokenizer_init=True,  # token ids in, token ids out
            async_scheduling=False,  # one plan, one result: no overlapped steps
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_space_gb:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_space_gb * GiB)
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        if max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if num_blocks:
            kwargs["num_gpu_blocks_override"] = num_blocks
        kwargs.update(engine_kwargs or {})
        config = EngineArgs(**kwargs).create_engine_config(UsageContext.ENGINE_CONTEXT)
        if kv_cache_space_gb:
            # On CPU, VLLM_CPU_KVCACHE_SPACE (whole GiB) overrides the engine argument; an
            # explicit worker setting wins over the environment.
            config.cache_config.kv_cache_memory_bytes = int(kv_cache_space_gb * GiB)
        if config.use_v2_model_runner:
            raise RuntimeError("VllmExecutor drives vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER "
                               "(it must be 0 before vllm is first imported)")
        if config.parallel_config.world_size != 1:
            raise ValueError("VllmExecutor runs one device per worker (tensor/pipeline parallel size 1)")
        self._vllm_config = config

        executor = UniProcExecutor(config)
        self._executor = executor
        try:
            kv_config = init_kv_cache(config, executor)
        except BaseException:
            executor.shutdown()
            raise

        groups = kv_config.kv_cache_groups
        if len(groups) != 1:
            executor.shutdown()
            raise NotImplementedError(
                f"{model}: {len(groups)} KV-cache groups (hybrid / sliding-window model); the AccelGen "
                "scheduler hands out one block table per request, so only single-group models are served"
            )
        self._needs_zeroing = bool(getattr(kv_config, "needs_kv_cache_zeroing", False))
        model_config = config.model_config
        block_size = int(groups[0].kv_cache_spec.block_size)
        num_blocks = int(kv_config.num_blocks)
        self.max_model_len = int(model_config.max_model_len)
        self.max_num_seqs = int(config.scheduler_config.max_num_seqs)
        self.max_num_batched_tokens = int(config.scheduler_config.max_num_batched_tokens)
        self.max_blocks_per_request = -(-self.max_model_len // block_size)
        vocab_size = int(model_config.get_vocab_size())
        eos = eos_token_id(model_config)
        self._generation_config = model_config.try_get_generation_config()
        self._info = WorkerInfo(
            model=model,
            executor=self.name,
            block_size=block_size,
            num_blocks=num_blocks,
            max_model_len=self.max_model_len,
            profile_json=profile_json,
            eos_token_id=eos,
            vocab_size=vocab_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
        )
        self.requests = RequestTable(num_blocks, block_size, self.max_model_len, vocab_size)
        self._reqs: dict[str, _RunnerRequest] = {}
        self._closed = False
        self.build_s = time.perf_counter() - t0
        log.info("vllm executor ready: model=%s block_size=%d num_blocks=%d max_model_len=%d "
                 "max_num_seqs=%d max_num_batched_tokens=%d (%.1f s)", model, block_size, num_blocks,
                 self.max_model_len, self.max_num_seqs, self.max_num_batched_tokens, self.build_s)

    @classmethod
    def from_config(cls, config: "WorkerConfig") -> "VllmExecutor":
        if not config.model:
            raise ValueError("executor 'vllm' needs --model (ACCELGEN_WORKER_MODEL): an HF id or model directory")
        return cls(model=config.model, dtype=config.dtype, max_model_len=config.max_model_len or None,
                   kv_cache_space_gb=config.kv_cache_space_gb or None, seed=config.seed,
                   max_num_seqs=config.max_num_seqs or None,
                   max_num_batched_tokens=config.max_num_batched_tokens or None,
                   profile_json=measured_profile_json(config.profile), num_blocks=config.num_blocks or None,
                   cpu_threads=config.cpu_threads)

    # -- Executor ---------------------------------------------------------------------------
    def describe(self) -> WorkerInfo:
        return self._info

    def execute(self, plan: WorkerPlan) -> ExecResult:
        if self._closed:
            raise RuntimeError("VllmExecutor is closed")
        prepared = self.requests.prepare(plan)  # ValueError before anything runs
        self._check_limits(plan)
        translated = self._translate(plan)  # ValueError before anything runs
        out = translated.scheduler_output
        start = time.perf_counter()
        try:
            result = self._executor.execute_model(out)
            if result is None:
                result = self._executor.sample_tokens(None)
        except Exception as exc:
            self._recover()
            # Not a ValueError even if vLLM raised one: that would say "rejected, nothing changed".
            raise RuntimeError(f"vLLM failed running iteration {plan.iteration}: {exc!r}; every request on "
                               "this worker was forgotten") from exc
        except BaseException:
            self._recover()
            raise
        elapsed = time.perf_counter() - start if plan.chunks else 0.0
        index = result.req_id_to_index if result is not None else {}
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprob] = {}
        for c in translated.sampling_chunks:
            i = index.get(c.request_id)
            toks = result.sampled_token_ids[i] if i is not None else ()
            if len(toks) == 0:
                self._recover()
                raise RuntimeError(f"vLLM sampled no token for request {c.request_id!r} (iteration {plan.iteration})")
            tok = int(toks[-1])
            sampled[c.request_id] = tok
            runner_req = translated.requests[c.request_id]
            runner_req.outputs.append(tok)
            k = runner_req.sampling.logprobs
            if k is not None:
                lp = _token_logprob(getattr(result, "logprobs", None), i, len(toks), tok, k)
                if isinstance(lp, str):
                    self._recover()
                    raise RuntimeError(f"vLLM's logprobs for request {c.request_id!r} "
                                       f"(iteration {plan.iteration}): {lp}")
                logprobs[c.request_id] = lp
        self.requests.commit(prepared)
        self._reqs = translated.requests
        return ExecResult(iteration=plan.iteration, sampled_token_ids=sampled, elapsed_s=elapsed, logprobs=logprobs)

    def prepare_thread(self) -> None:
        if self.cpu_threads:
            self._set_num_threads(self.cpu_threads)  # see vllm_startup.set_cpu_threads

    def reset(self) -> None:
        """Forget every request: the runner frees all it holds (sent as finished)."""
        if self._closed:
            return
        held = set(self._reqs) | set(self._runner_request_ids())
        self._reqs = {}
        self.requests.reset()
        if held:
            self._executor.execute_model(self._empty_output(finished=held))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._executor.shutdown()
        finally:
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception:  # best effort: the process is usually about to exit
                log.debug("vLLM distributed clean-up failed", exc_info=True)

    # -- plan -> SchedulerOutput --------------------------------------------------------------
    def _check_limits(self, plan: WorkerPlan) -> None:
        if len(plan.chunks) > self.max_num_seqs:
            raise ValueError(f"plan has {len(plan.chunks)} requests; this worker's vLLM runs at most "
                             f"max_num_seqs={self.max_num_seqs} per iteration")
        if plan.num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"plan has {plan.num_tokens} tokens; this worker's vLLM runs at most "
                             f"max_num_batched_tokens={self.max_num_batched_tokens} per iteration")
        for i, c in enumerate(plan.chunks):
            if c.is_new:
                table = len(c.block_table)
            else:
                table = len(self.requests.get(c.request_id).block_table) + len(c.new_block_ids)
            if table > self.max_blocks_per_request:
                raise ValueError(f"chunks[{i}] (request {c.request_id!r}): block table of {table} blocks exceeds "
                                 f"{self.max_blocks_per_request} (max_model_len={self.max_model_len})")

    def _translate(self, plan: WorkerPlan) -> _Translated:
        """Build the ``SchedulerOutput`` for ``plan`` and the request table after it; touches no
        state (``ValueError`` names the chunk)."""
        reqs = dict(self._reqs)  # entries are replaced by copies before they change
        finished: set[str] = set()
        for rid in plan.freed_request_ids:
            if reqs.pop(rid, None) is not None:
                finished.add(rid)
        new_reqs = []
        cached = self._CachedRequestData.make_empty()
        num_scheduled: dict[str, int] = {}
        sampling_chunks: list[ChunkSpec] = []
        new_blocks: list[int] = []
        for i, c in enumerate(plan.chunks):
            where = f"chunks[{i}] (request {c.request_id!r})"
            start, end = c.num_computed_tokens, c.end_position
            if c.is_new:
                if c.request_id in reqs or c.request_id in self._reqs:
                    finished.add(c.request_id)  # resync: drop the runner's old copy first
                total = c.prompt_len + c.num_output_tokens  # RequestTable.prepare: end <= total
                prompt = list(c.token_ids) + [_PLACEHOLDER_TOKEN] * (total - end)
                r = _RunnerRequest(prompt, end, [], list(c.block_table), self._sampling(c.sampling), start)
                new_blocks.extend(c.block_table)
                new_reqs.append(self._new_request_data(c.request_id, r, start))
            else:
                old = reqs[c.request_id]  # RequestTable.prepare vouched that it exists
                r = old.copy()
                r.block_table.extend(c.new_block_ids)
                new_blocks.extend(c.new_block_ids)
                total = len(r.prompt)
                if end <= total:  # a prefill chunk: the runner needs these prompt tokens
                    if start > r.known:
                        raise ValueError(f"{where}: starts at {start} but only {r.known} prompt tokens were sent")
                    r.prompt[start:end] = c.token_ids
                    r.known = max(r.known, end)
                    r.outputs = []  # the streaming update clears the runner's outputs
                    new_reqs.append(self._new_request_data(c.request_id, r, start))
                else:  # decode (RequestTable.prepare refused chunks straddling `total`): the runner
                    # feeds back tokens it sampled itself
                    expected = r.outputs[start - total:end - total]
                    if end - total > len(r.outputs) or (not c.sampled_input and list(c.token_ids) != expected):
                        raise ValueError(
                            f"{where}: token_ids {list(c.token_ids)[:8]} at positions {start}..{end - 1} are not "
                            f"the tokens this worker sampled there ({expected[:8]}); resend it with is_new"
                        )
                    del r.outputs[end - total:]  # recomputing from an earlier output: drop the rest
                    cached.req_ids.append(c.request_id)
                    cached.new_token_ids.append([])
                    cached.new_block_ids.append((list(c.new_block_ids),) if c.new_block_ids else None)
                    cached.num_computed_tokens.append(start)
                    cached.num_output_tokens.append(end - total)
            r.num_computed = end
            reqs[c.request_id] = r
            num_scheduled[c.request_id] = len(c.token_ids)
            if c.samples:
                sampling_chunks.append(c)
        out = self._SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=finished,
            free_encoder_mm_hashes=[],
            new_block_ids_to_zero=(sorted(set(new_blocks)) or None) if self._needs_zeroing else None,
        )
        return _Translated(out, reqs, sampling_chunks)

    def _new_request_data(self, rid: str, r: _RunnerRequest, num_computed: int):
        # Fresh lists: the in-process runner keeps (and extends) what it is given.
        return self._NewRequestData(
            req_id=rid,
            prompt_token_ids=list(r.prompt),
            mm_features=[],
            sampling_params=r.sampling,
            pooling_params=None,
            block_ids=(list(r.block_table),),
            num_computed_tokens=num_computed,
            lora_request=None,
        )

    def _sampling(self, sp: SamplingParams | None):
        sp = sp or SamplingParams()
        params = self._VllmSamplingParams(
            n=1,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            seed=sp.seed,
            max_tokens=max(1, min(sp.max_tokens, self.max_model_len)),
            stop_token_ids=list(sp.stop_token_ids),
            ignore_eos=sp.ignore_eos,
            detokenize=False,
            logprobs=sp.logprobs,
        )
        # As vLLM's input processor does (EOS into the stop set, for min_tokens).
        eos = self._info.eos_token_id
        params.update_from_generation_config(self._generation_config, eos if eos >= 0 else None)
        return params

    def _empty_output(self, finished: set[str]):
        out = self._SchedulerOutput.make_empty()
        out.finished_req_ids = set(finished)
        return out

    def _runner_request_ids(self) -> list[str]:
        try:
            return list(self._executor.driver_worker.worker.model_runner.requests)
        except AttributeError:
            return []

    def _recover(self) -> None:
        """After vLLM failed mid-plan: forget everything, on both sides, as far as possible."""
        log.error("vLLM failed while running a plan; forgetting every request (the scheduler resends them)")
        runner = getattr(getattr(getattr(self._executor, "driver_worker", None), "worker", None), "model_runner", None)
        if runner is not None and getattr(runner, "execute_model_state", None) is not None:
            runner.execute_model_state = None  # a half-run step would block the next execute_model
        try:
            self.reset()
        except Exception:
            log.exception("could not free the runner's requests after a failure")
            self._reqs = {}
            self.requests.reset()


def _token_logprob(lists: Any, index: int, num_generated: int, token: int, k: int) -> TokenLogprob | str:
    """The logprobs of the last token the runner generated for the request at batch row
    ``index`` (``num_generated`` tokens this step), from its ``LogprobsLists`` (vllm/v1/outputs.py:
    per row the sampled token, then the batch's most likely tokens; the request asked for ``k``
    of them). A string says what is wrong instead."""
    if lists is None:
        return "the runner returned none"
    cu = lists.cu_num_generated_tokens
    row = (cu[index] if cu is not None else index) + num_generated - 1
    ids, values = lists.logprob_token_ids[row], lists.logprobs[row]
    if int(ids[0]) != token:
        return f"row {row} is for token {int(ids[0])}, the runner sampled {token}"
    if len(ids) < k + 1:
        return f"row {row} holds {len(ids) - 1} top tokens, the request asked for {k}"
    top = tuple((int(ids[j]), float(values[j])) for j in range(1, k + 1))
    return TokenLogprob(token_id=token, logprob=float(values[0]), rank=int(lists.sampled_token_ranks[row]), top=top)
