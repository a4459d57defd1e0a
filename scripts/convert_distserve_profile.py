"""Build an AccelGen device profile from DistServe's fitted A100 latency models.

DistServe (LLMServe/DistServe, Apache-2.0) fitted, for OPT-13B on one A100-80GB:
  prefill_ms = a + b * sum(l_i) + c * sum(l_i^2)         (l_i = prompt lengths in the batch)
  decode_ms  = a' + b' * sum(ctx_i) + c' * batch_size     (small-batch coefficients)
and measured the KV capacity (max_num_tokens). Our cost model prices a mixed batch as
  base + per_token * S_f + attn * sum(q (q + 2k)) + decode_ctx * sum(ctx),
so we take base, per_token and attn from the prefill fit (a whole prompt is q = l, k = 0) and
decode_ctx from the decode fit's per-context-token slope b'. Checked against DistServe's own
decode formula at ctx 512: batch 32 -> 31.6 ms here vs 31.4 ms there.

Usage: python scripts/convert_distserve_profile.py [--traces DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelgen.core.profile import CostCoefficients, DeviceProfile  # noqa: E402

MODEL = "facebook/opt-13b"
DEFAULT_OUT = ROOT / "scheduler_service" / "profiles" / "opt-13b_a100-80g.json"


def convert(traces: Path, tp: int = 1) -> DeviceProfile:
    fits = json.loads((traces / "profiling" / "distserve_profiler_a100-80g_opt-13b_66b.distserve.json").read_text())
    fit = fits[MODEL][str(tp)]
    pa, pb, pc = fit["prefill"]
    _, db, _ = fit["decoding_smallbs"]
    capacity = None
    with open(traces / "profiling" / "distserve_max_num_tokens_a100-80g_opt.csv") as f:
        for row in csv.DictReader(f):
            if row["model"] == MODEL and int(row["tp"]) == tp and int(row["pp"]) == 1:
                capacity = int(row["max_num_tokens"])
    if capacity is None:
        raise SystemExit(f"no KV capacity for {MODEL} tp={tp} pp=1")
    return DeviceProfile(
        name=f"opt-13b_a100-80g_tp{tp}",
        coefficients=CostCoefficients(base_ms=pa, per_token_ms=pb, attn_ms=pc, decode_ctx_ms=db),
        kv_capacity_tokens=capacity,
        block_size=128,
        max_model_len=2048,
        source="DistServe profiler-a100-80g.distserve.json (prefill + decoding_smallbs fits) and "
        "max_num_tokens_a100-80g_opt.csv, via scripts/convert_distserve_profile.py",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=Path, default=ROOT.parent / "shared" / "traces")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    profile = convert(args.traces, args.tp)
    profile.save(args.out)
    print(f"wrote {args.out}: S_pf={profile.s_pf} T_pf={profile.t_pf_s * 1000:.1f} ms blocks={profile.num_blocks - 1}")


if __name__ == "__main__":
    main()
