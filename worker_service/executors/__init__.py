"""Executors: the part of a worker that runs a plan (``sim`` cost model, ``vllm`` model runner)."""

from worker_service.executors.base import Executor
from worker_service.executors.registry import (executor_class, executor_from_config,
                                               executor_names, make_executor, register_executor)

__all__ = ["Executor", "executor_class", "executor_from_config", "executor_names", "make_executor",
           "register_executor"]
