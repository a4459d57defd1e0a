"""``WorkerInfo``: what a worker serves and holds, as it describes itself when it registers.

The scheduler sizes a lane's block accounting and profile from it; the worker's executors build
it. It crosses the wire as ``accelgen.v1.WorkerDescription`` and is kept in Redis as JSON, both
through ``accelgen.wire.worker_info``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the worker serves and how much KV it holds; the scheduler sizes its block
    accounting from ``num_blocks`` (vLLM's reserved null block 0 included)."""

    model: str
    executor: str
    block_size: int
    num_blocks: int
    max_model_len: int
    profile_json: str
    eos_token_id: int
    vocab_size: int
    max_num_batched_tokens: int = 0  # 0 = no limit of the executor's own
    max_num_seqs: int = 0
