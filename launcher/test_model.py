"""The seeded test model that ``up`` and ``demo`` serve when no ``--model`` is given."""

from __future__ import annotations

from pathlib import Path


def default_model() -> str:
    """The seeded test model, built on first use (no downloads): what `up` and `demo` serve by default."""
    import os

    from launcher.checkout import require_checkout

    require_checkout()  # scripts/ is not installed
    from scripts.make_test_model import make_test_model

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU workers: a small KV cache; ignored on GPUs
    return str(make_test_model(Path(".cache") / "test-model"))
