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
