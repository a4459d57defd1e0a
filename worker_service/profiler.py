"""Measure a worker's iteration time and write the device profile the scheduler loads.

Runs synthetic plans through any ``Executor`` (vLLM's model runner, or the cost-model sim):

- prefill-only forwards of ``S_f`` tokens (one fresh request per forward) over a grid: the
  measured ``T(S_f)`` table, from which ``S_pf`` (the knee) and ``T_pf`` are derived exactly as
  for the shipped profile;
- decode-only batches at two context lengths: the per-context-token cost of a decode;
- a linear fit of the prefill points for the base and per-token coefficients.

Each point is the fastest of ``repeats`` runs after a warm-up: on a shared machine a run can
only be slowed by interference (stalls of 100+ ms were seen on a 2-core VM), never sped up, so
the minimum is the estimate of the device's own time. Blocks are handed out from the
worker's real pool (block 0 excluded), and every request is freed after its forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from accelgen.core.kv_blocks import blocks_for_tokens
from accelgen.core.profile import CostCoefficients, DeviceProfile
from accelgen.core.request import SamplingParams
from worker_service.executors.base import Executor
from worker_service.plan import ChunkSpec, WorkerPlan

DEFAULT_GRID = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass
class _Ids:
    n: int = 0

    def next(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"


class Profiler:
    def __init__(self, executor: Executor, repeats: int = 5, token_id: int = 100) -> None:
        self.executor = executor
        self.info = executor.describe()
        self.repeats = repeats
        self.token_id = token_id
        self._ids = _Ids()
        self._iteration = 0
        self.epoch = "profile"

    def _plan(self, chunks: list[ChunkSpec], freed: list[str]) -> WorkerPlan:
        self._iteration += 1
        return WorkerPlan(iteration=self._iteration, epoch=self.epoch, chunks=chunks, freed_request_ids=freed)

    def _new_chunk(self, rid: str, prompt_len: int, first_block: int, nblocks: int | None = None) -> ChunkSpec:
        nblocks = nblocks or blocks_for_tokens(prompt_len + 1, self.info.block_size)
        table = list(range(first_block, first_block + nblocks))
        return ChunkSpec(request_id=rid, num_computed_tokens=0, token_ids=[self.token_id] * prompt_len,
                         new_block_ids=list(table), is_new=True, block_table=table,
                         sampling=SamplingParams(max_tokens=4096, ignore_eos=True), samples=True,
                         num_output_tokens=0, prompt_len=prompt_len)

    def prefill_ms(self, num_tokens: int) -> float:
        """Median time of one prefill forward of ``num_tokens`` tokens."""
        times = []
        freed: list[str] = []
        for i in range(self.repeats + 1):  # the first run warms up
            rid = self._ids.next("pf")
            t0 = time.perf_counter()
            self.executor.execute(self._plan([self._new_chunk(rid, num_tokens, 1)], freed))
            dt = time.perf_counter() - t0
            freed = [rid]
            if i > 0:
                times.append(dt)
        self.executor.execute(self._plan([], freed))
        return min(times) * 1000.0

    def warm_up_prefill(self, num_tokens: int) -> None:
        """One untimed prefill of this size: the first forward of a new shape compiles or allocates."""
        rid = self._ids.next("warm")
        self.executor.execute(self._plan([self._new_chunk(rid, num_tokens, 1)], []))
        self.executor.execute(self._plan([], [rid]))

    def decode_ms(self, batch: int, context: int) -> float:
        """Median time of a decode iteration of ``batch`` requests with ``context`` tokens each."""
        per = blocks_for_tokens(context + self.repeats + 3, self.info.block_size)
        if 1 + batch * per > self.info.num_blocks:
            raise ValueError(f"{batch} x {context} tokens do not fit the worker's {self.info.num_blocks} blocks")
        rids = [self._ids.next("dc") for _ in range(batch)]
        last: dict[str, int] = {}
        for i, rid in enumerate(rids):  # one prefill per plan: stays within the worker's plan limit
            result = self.executor.execute(self._plan([self._new_chunk(rid, context, 1 + i * per, per)], []))
            last.update(result.sampled_token_ids)
        times = []
        for step in range(self.repeats + 1):
            decodes = [ChunkSpec(request_id=rid, num_computed_tokens=context + step, token_ids=[last.get(rid, self.token_id)],
                                 new_block_ids=[], is_new=False, block_table=[], sampling=None, samples=True,
                                 num_output_tokens=step + 1, prompt_len=context) for rid in rids]
            t0 = time.perf_counter()
            result = self.executor.execute(self._plan(decodes, []))
            dt = time.perf_counter() - t0
            last = dict(result.sampled_token_ids)
            if step > 0:
                times.append(dt)
        self.executor.execute(self._plan([], rids))
        return min(times) * 1000.0

    def run(self, name: str, grid: Sequence[int] = DEFAULT_GRID, decode_batch: int = 8,
            knee_fraction: float = 0.95) -> DeviceProfile:
        max_len = self.info.max_model_len
        limit = self.info.max_num_batched_tokens or max_len
        sizes = [s for s in grid if s < max_len and s <= limit]
        for s in sizes:  # warm every shape once (first runs pay for kernel selection and allocation)
            self.warm_up_prefill(s)
        # Two passes over the grid, fastest per size: the first seconds after an engine starts
        # were seen to stall small forwards by ~100 ms on this CPU.
        first = [self.prefill_ms(s) for s in sizes]
        table = [(s, min(a, self.prefill_ms(s))) for s, a in zip(sizes, first)]
        base_ms, per_token_ms = _fit_line(table)
        short_ctx, long_ctx = 64, min(1024, max_len // 2)
        d_short = self.decode_ms(decode_batch, short_ctx)
        d_long = self.decode_ms(decode_batch, long_ctx)
        ctx_ms = max(0.0, (d_long - d_short) / (decode_batch * (long_ctx - short_ctx)))
        return DeviceProfile(
            name=name,
            coefficients=CostCoefficients(base_ms=max(0.0, base_ms), per_token_ms=max(1e-9, per_token_ms),
                                          attn_ms=0.0, decode_ctx_ms=ctx_ms),
            kv_capacity_tokens=(self.info.num_blocks - 1) * self.info.block_size,
            block_size=self.info.block_size,
            max_model_len=max_len,
            knee_fraction=knee_fraction,
            knee_search_max_tokens=max(sizes),
            measured_forward_ms=tuple(table),
            source=f"accelgen profile: {self.info.executor} executor, model {self.info.model}, "
                   f"fastest of {self.repeats} runs per point",
        )


def _fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of ms against tokens."""
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(t for _, t in points) / n
    var = sum((s - mx) ** 2 for s, _ in points)
    slope = sum((s - mx) * (t - my) for s, t in points) / var if var else 0.0
    return my - slope * mx, slope
