"""Every test is marked by the folder it lives in: ``unit``, ``integration``, ``e2e`` or ``gpu``.

- ``tests/unit``: pure Python, no processes and no network (the core, converters, the simulator).
- ``tests/integration``: starts real processes (redis-server, one service) on free ports.
- ``tests/e2e``: the whole stack (Redis, scheduler, workers, gateway) through its public API.
- ``tests/gpu``: needs a CUDA GPU and vLLM built for it; skipped (with the reason) anywhere else,
  so ``make test`` on a CPU machine only reports them skipped (``scripts/gpu_check.sh`` runs them).

So ``pytest -m unit`` runs exactly the unit folder, and a test file placed anywhere else is an
error at collection rather than a test that some selection silently skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "integration", "e2e", "gpu")

# Shared checks that live outside the test modules still get pytest's assertion messages.
pytest.register_assert_rewrite("tests.support.workload_data")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        kind = parts[0] if len(parts) > 1 else ""
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: test files live in tests/unit, tests/integration, "
                                    f"tests/e2e or tests/gpu (that folder is their marker)")
        item.add_marker(getattr(pytest.mark, kind))
