"""``WorkerInfo`` <-> ``accelgen.v1.WorkerDescription`` and JSON (the Redis worker registry).

Both forms are derived from the dataclass's fields, which the proto message mirrors name for
name, so a new description field is the proto line and the dataclass field, nothing here.
"""

from __future__ import annotations

import dataclasses
import json

from accelgen.core.worker_info import WorkerInfo
from accelgen.v1 import common_pb2

_FIELDS = tuple(f.name for f in dataclasses.fields(WorkerInfo))

# What a registering worker may claim. Generous for any real device (a vLLM KV pool holds 10^4
# to 10^6 blocks) and small enough that what the scheduler builds from it fits in memory: its
# block accounting holds every free block id (~40 MB at the limit); a claim of 2^32 blocks took
# 18 GB and the scheduler's event loop with it (found by bench/fuzz.py).
# The largest vocabularies are ~2^18 ids; 0 = unknown.
LIMITS: dict[str, tuple[int, int]] = {
    "block_size": (1, 1 << 16), "num_blocks": (2, 1 << 20), "max_model_len": (0, 1 << 24),
    "max_num_batched_tokens": (0, 1 << 24), "max_num_seqs": (0, 1 << 20), "vocab_size": (0, 1 << 24),
}
# Most characters of each text field: the registry keeps them in Redis and every lane in memory. A
# measured profile's JSON is a few KB.
TEXT_LIMITS: dict[str, int] = {"model": 512, "executor": 64, "profile_json": 1 << 20}


def worker_info_problem(info: WorkerInfo | common_pb2.WorkerDescription, prefix: str = "description.") -> str | None:
    """What is wrong with a worker's description (a message naming the field and its limit), or
    None. Takes the proto too, so a description can be refused before anything is built from it."""
    for name, (lo, hi) in LIMITS.items():
        value = getattr(info, name)
        if not lo <= value <= hi:
            return f"{prefix}{name} must be in [{lo}, {hi}], got {value}"
    for name, most in TEXT_LIMITS.items():
        size = len(getattr(info, name))
        if size > most:
            return f"{prefix}{name} may have at most {most} characters, got {size}"
    return None


def worker_info_to_proto(info: WorkerInfo) -> common_pb2.WorkerDescription:
    return common_pb2.WorkerDescription(**{name: getattr(info, name) for name in _FIELDS})


def worker_info_from_proto(msg: common_pb2.WorkerDescription) -> WorkerInfo:
    return WorkerInfo(**{name: getattr(msg, name) for name in _FIELDS})


def worker_info_to_json(info: WorkerInfo) -> str:
    return json.dumps(dataclasses.asdict(info))


def worker_info_from_json(text: str) -> WorkerInfo:
    """Unknown keys (written by a newer scheduler) are ignored; missing ones take the defaults."""
    data = json.loads(text)
    return WorkerInfo(**{k: v for k, v in data.items() if k in _FIELDS})
