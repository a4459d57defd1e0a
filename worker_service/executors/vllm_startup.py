"""Starting vLLM's engine inside a worker, the parts ``EngineCore`` would otherwise do.

The environment vLLM must see before its first import, the model's CPU threads (what vllm
serve's multiprocess executor sets up for its CPU worker, which the in-process executor does
not), the KV cache (``EngineCore._initialize_kv_caches`` without vLLM's scheduler), the model's
EOS id and the measured profile a worker reports. vLLM is imported only inside these functions,
so the worker's sim path never needs it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("worker_service.executors.vllm_executor")

GiB = 1 << 30


def set_vllm_env() -> None:
    """Environment vLLM reads at import / config time; set before the first ``import vllm``."""
    # Keep everything in this process: on CPU vLLM would otherwise switch the uni-process
    # executor to multiprocessing (we build UniProcExecutor ourselves, but the config
    # should say what runs).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # The executor's translation targets the V1 GPUModelRunner/CPUModelRunner (persistent batch,
    # streaming-input updates). Model Runner V2 is the default on GPUs with Triton.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def init_kv_cache(config: Any, executor: Any) -> Any:
    """``EngineCore._initialize_kv_caches`` without the scheduler: returns the scheduler-side
    ``KVCacheConfig`` (block count, groups) the workers were initialised with."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import (
        generate_scheduler_kv_cache_config,
        get_kv_cache_configs,
        resolve_cache_hit_alignment_tokens,
        resolve_kv_cache_block_sizes,
    )
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs

    register_all_kvcache_specs(config)
    specs = executor.get_kv_cache_specs()
    layout = resolve_kv_cache_layout(config, executor.get_supported_kv_cache_layouts(),
                                     [s for worker_specs in specs for s in worker_specs.values()])
    executor.set_kv_cache_layout(layout.name)
    if not any(specs):
        raise NotImplementedError("attention-free model: nothing to schedule KV blocks for")
    available = executor.determine_available_memory()
    len_before = config.model_config.max_model_len
    kv_configs = get_kv_cache_configs(config, specs, available)
    for c in kv_configs:
        c.kv_cache_layout = config.cache_config.kv_cache_layout
    if config.model_config.max_model_len != len_before:
        executor.collective_rpc("update_max_model_len", args=(config.model_config.max_model_len,))
    sched_config = generate_scheduler_kv_cache_config(kv_configs)
    config.cache_config.num_gpu_blocks = sched_config.num_blocks
    groups = sched_config.kv_cache_groups
    if groups:
        participating = [g.kv_cache_spec.block_size for g in groups if g.kv_cache_spec.prefix_cacheable]
        config.cache_config.block_size = min(participating or [g.kv_cache_spec.block_size for g in groups])
    config.validate_block_size()
    block_size, hash_block_size = resolve_kv_cache_block_sizes(sched_config, config)
    alignment = resolve_cache_hit_alignment_tokens(sched_config, config, block_size, hash_block_size)
    for c in (*kv_configs, sched_config):
        c.hash_block_size = hash_block_size
        c.cache_hit_alignment_tokens = alignment
    executor.initialize_from_config(kv_configs)
    executor.compile_or_warm_up_model()
    return sched_config


def eos_token_id(model_config: Any) -> int:
    """The model's EOS id (its config, else its generation config; the first of a list)."""
    candidates = [getattr(model_config.hf_text_config, "eos_token_id", None),
                  model_config.try_get_generation_config().get("eos_token_id")]
    for eos in candidates:
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return -1  # the model names no EOS: requests end by length (no token id is negative)


def set_cpu_threads(requested: int) -> tuple[int | None, Any]:
    """On a CPU, the model's torch threads as vllm serve sets them for its CPU worker
    (``OMPProcessManager``: the allowed cores but one, reserved for the rest of the node) unless
    ``requested`` (> 0) or an
    explicit ``OMP_NUM_THREADS`` says otherwise; None on a GPU. vLLM's in-process executor does
    not do this itself, and its CPU worker then forbids ``torch.set_num_threads`` for good, so it
    happens here, before the engine starts. With as many threads as cores, the model's OpenMP
    threads compete with the worker's own gRPC work and the node's other services: on 2 cores a
    batch-1 decode step took 2.2 ms instead of 1.3 (docs/vllm_comparison.md).

    OpenMP's thread count is per thread, and vLLM's CPU attention checks that a step runs with the
    count its metadata was built with, so every thread that runs the model must use the same:
    this one (warm-up) now, the server's executor thread in ``VllmExecutor.prepare_thread``.
    Returns the count and torch's own ``set_num_threads`` (vLLM's CPU worker replaces it with a
    no-op)."""
    import torch

    set_num_threads = torch.set_num_threads
    if torch.cuda.is_available():
        return None, set_num_threads
    if requested <= 0:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads(), set_num_threads
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = max(1, allowed - 1)
    set_num_threads(requested)
    os.environ["OMP_NUM_THREADS"] = str(requested)  # what vLLM reads as the operator's choice
    log.info("vllm executor on CPU: %d torch thread(s)", requested)
    return requested, set_num_threads


def measured_profile_json(profile: str) -> str:
    """A profile measured on this worker (``accelgen profile --out FILE``; pass ``--profile FILE``)
    travels to the scheduler, which then budgets with this device's real iteration times. A
    shipped profile name describes other hardware, so it is not reported for a vLLM worker."""
    path = Path(profile)
    if path.suffix == ".json" and path.exists():
        return path.read_text()
    return ""
