"""What the vLLM-backed tests share: the seeded test model and reference outputs from vLLM itself.

The reference runs ``vllm.LLM.generate`` in a subprocess: a second engine in a test process
would fight the first one over vLLM's process-wide state.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

REFERENCE_SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        spec = json.load(sys.stdin)
        llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), max_model_len=spec["max_model_len"],
                  enforce_eager=True, enable_prefix_caching=False, seed=0, **spec.get("engine", {}))
        prompts = [TokensPrompt(prompt_token_ids=p["prompt"]) for p in spec["requests"]]
        params = [SamplingParams(**p["sampling"]) for p in spec["requests"]]
        outs = llm.generate(prompts, params, use_tqdm=False)
        print("REFERENCE " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
        if any(p["sampling"].get("logprobs") for p in spec["requests"]):
            print("REFERENCE_LOGPROBS " + json.dumps([[{str(t): lp.logprob for t, lp in pos.items()}
                                                       for pos in (o.outputs[0].logprobs or [])] for o in outs]))
""")


def prompt_ids(seed: int, n: int, vocab: int = 3072) -> list[int]:
    """A reproducible prompt of ``n`` token ids for the test model (``</s>`` first, as OPT encodes)."""
    rng = random.Random(seed)
    return [2] + [rng.randrange(4, vocab) for _ in range(n - 1)]


def load_make_test_model():
    spec = importlib.util.spec_from_file_location("accelgen_make_test_model", REPO / "scripts" / "make_test_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vllm_reference(model_dir: Path, requests: list[dict], max_model_len: int = 2048, *, dtype: str = "float32",
                   engine: dict | None = None, with_logprobs: bool = False):
    """Output token ids of ``vllm.LLM.generate`` for ``[{"prompt": ids, "sampling": {...}}]``.

    ``dtype`` and ``engine`` (more ``LLM(...)`` arguments) are for the GPU tests (tests/gpu). With
    ``with_logprobs`` (requests whose sampling asks for ``logprobs``) returns ``(ids, logprobs)``,
    ``logprobs[i][k]`` mapping ``str(token id)`` to its logprob at output position ``k``."""
    spec = {"model": str(model_dir), "max_model_len": max_model_len, "requests": requests, "dtype": dtype,
            "engine": engine or {}}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V2_MODEL_RUNNER": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT], input=json.dumps(spec), capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REFERENCE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"reference run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ids = json.loads(lines[-1][len("REFERENCE "):])
    if not with_logprobs:
        return ids
    lp_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REFERENCE_LOGPROBS ")]
    if not lp_lines:
        raise RuntimeError("reference run printed no logprobs (no request asked for them)")
    return ids, json.loads(lp_lines[-1][len("REFERENCE_LOGPROBS "):])
