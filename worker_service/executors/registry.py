"""Executors by name. Entries are import paths, so naming ``sim`` never imports vLLM."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from worker_service.executors.base import Executor

if TYPE_CHECKING:
    from worker_service.config import WorkerConfig

_EXECUTORS: dict[str, str] = {
    "sim": "worker_service.executors.sim:SimExecutor",
    "vllm": "worker_service.executors.vllm_executor:VllmExecutor",
}


def executor_names() -> list[str]:
    return sorted(_EXECUTORS)


def register_executor(name: str, target: str | type[Executor]) -> None:
    """Add an executor: a class, or ``"module:Class"`` imported on first use."""
    _EXECUTORS[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def executor_class(name: str) -> type[Executor]:
    """The executor class registered as ``name``; ``ValueError`` says what exists or what is missing."""
    target = _EXECUTORS.get(name)
    if target is None:
        raise ValueError(f"unknown executor {name!r}; choose from {', '.join(executor_names())}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"executor {name!r} is not available here ({module_name}: {exc})") from exc
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise TypeError(f"{target} is not an Executor subclass")
    return cls


def make_executor(name: str, **kwargs: Any) -> Executor:
    """Construct executor ``name`` with its own keyword arguments."""
    return executor_class(name)(**kwargs)


def executor_from_config(config: "WorkerConfig") -> Executor:
    """Construct ``config.executor`` from the worker's config (the service's path)."""
    return executor_class(config.executor).from_config(config)
