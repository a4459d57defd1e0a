"""Summaries of a built workload, for reports (the results page prints them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from bench.workloads import WorkloadRequest




def _stats(values: list[int]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99]).tolist()
    return {"mean": float(arr.mean()), "p50": p50, "p90": p90, "p99": p99, "max": int(max(values))}


def length_summary(requests: Sequence[WorkloadRequest]) -> dict[str, dict[str, Any]]:
    """Token-length statistics of a built workload, per ``source``, for reports.

    Returns ``{source: {"count": n, "prompt": S, "output": S}}`` where ``S`` is
    ``{"mean", "p50", "p90", "p99", "max"}`` of ``prompt_len`` / ``output_len``:
    the lengths *as used*, i.e. after fitting into the context, not the raw
    rows. Percentiles interpolate linearly between order statistics (numpy's
    default), so p50 of ``[1, 2, 3, 4]`` is 2.5. Sources appear in sorted
    order; all numbers are plain Python ``int``/``float`` (JSON-ready). An
    empty workload gives ``{}``.
    """
    by_source: dict[str, tuple[list[int], list[int]]] = {}
    for r in requests:
        prompts, outputs = by_source.setdefault(r.source, ([], []))
        prompts.append(r.prompt_len)
        outputs.append(r.output_len)
    return {
        source: {"count": len(prompts), "prompt": _stats(prompts), "output": _stats(outputs)}
        for source, (prompts, outputs) in sorted(by_source.items())
    }
