"""The executor interface: what the worker server needs from whatever runs the model.

An executor runs exactly the plan it is given (the cost model sleeps, vLLM runs its model
runner) and keeps only the per-request state its model runner needs between iterations —
nothing the scheduler could not rebuild by resending the request with ``is_new``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from worker_service.plan import ExecResult, WorkerPlan
from accelgen.core.worker_info import WorkerInfo

if TYPE_CHECKING:
    from worker_service.config import WorkerConfig


class Executor(ABC):
    """Runs plans. Not thread-safe: the server calls it from one thread, one plan at a time."""

    name: ClassVar[str]

    @classmethod
    def from_config(cls, config: "WorkerConfig") -> "Executor":
        """Build from the worker's config (how ``python -m worker_service.main`` makes one)."""
        raise NotImplementedError(f"executor {cls.name!r} cannot be built from a WorkerConfig")

    @abstractmethod
    def describe(self) -> WorkerInfo:
        """Model, KV pool and limits: what the scheduler sizes its accounting from."""

    @abstractmethod
    def execute(self, plan: WorkerPlan) -> ExecResult:
        """Run one iteration (blocking). ``ValueError``: the plan contradicts what this worker
        holds (unknown request, block out of range); nothing was run and no state changed."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every request (the scheduler restarted: its new epoch resends full state)."""

    def prepare_thread(self) -> None:
        """Per-thread set-up, called on the thread that will run the plans before it runs any
        (the server's executor thread). Default: nothing."""

    def close(self) -> None:
        """Release the device (called once, after the server stopped)."""
