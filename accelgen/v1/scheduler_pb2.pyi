from accelgen.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "app_class", "slo", "eos_token_id", "has_eos_token_id", "owner", "tenant", "label", "stop", "include_stop_str_in_output")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    APP_CLASS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    app_class: str
    slo: _common_pb2.SLOSpec
    eos_token_id: int
    has_eos_token_id: bool
    owner: str
    tenant: str
    label: str
    stop: _containers.RepeatedScalarFieldContainer[str]
    include_stop_str_in_output: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., app_class: _Optional[str] = ..., slo: _Optional[_Union[_common_pb2.SLOSpec, _Mapping]] = ..., eos_token_id: _Optional[int] = ..., has_eos_token_id: _Optional[bool] = ..., owner: _Optional[str] = ..., tenant: _Optional[str] = ..., label: _Optional[str] = ..., stop: _Optional[_Iterable[str]] = ..., include_stop_str_in_output: _Optional[bool] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("request_id", "slo")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slo: _common_pb2.SLOSpec
    def __init__(self, request_id: _Optional[str] = ..., slo: _Optional[_Union[_common_pb2.SLOSpec, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("request_id", "start_index")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start_index: int
    def __init__(self, request_id: _Optional[str] = ..., start_index: _Optional[int] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("token_ids", "start_index", "emitted_at", "finished", "finish_reason", "prompt_tokens", "request_id", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start_index: int
    emitted_at: _containers.RepeatedScalarFieldContainer[float]
    finished: bool
    finish_reason: str
    prompt_tokens: int
    request_id: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., start_index: _Optional[int] = ..., emitted_at: _Optional[_Iterable[float]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class WatchManyRequest(_message.Message):
    __slots__ = ("watch", "unwatch", "owner")
    WATCH_FIELD_NUMBER: _ClassVar[int]
    UNWATCH_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    watch: _containers.RepeatedCompositeFieldContainer[WatchRequest]
    unwatch: _containers.RepeatedScalarFieldContainer[str]
    owner: str
    def __init__(self, watch: _Optional[_Iterable[_Union[WatchRequest, _Mapping]]] = ..., unwatch: _Optional[_Iterable[str]] = ..., owner: _Optional[str] = ...) -> None: ...

class WatchManyResponse(_message.Message):
    __slots__ = ("batches", "errors")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[TokenBatch]
    errors: _containers.RepeatedCompositeFieldContainer[WatchError]
    def __init__(self, batches: _Optional[_Iterable[_Union[TokenBatch, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[WatchError, _Mapping]]] = ...) -> None: ...

class WatchError(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model", "max_model_len", "block_size", "live_workers", "queued_requests", "policy", "app_classes", "iterations", "sched_ms_p50", "sched_ms_p99", "overhead_ms", "classes", "vocab_size", "worker_to_scheduler", "applied_to_durable", "applied_to_gateway")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    APP_CLASSES_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SCHED_MS_P50_FIELD_NUMBER: _ClassVar[int]
    SCHED_MS_P99_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKER_TO_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TO_DURABLE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TO_GATEWAY_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_model_len: int
    block_size: int
    live_workers: int
    queued_requests: int
    policy: str
    app_classes: _containers.RepeatedScalarFieldContainer[str]
    iterations: int
    sched_ms_p50: float
    sched_ms_p99: float
    overhead_ms: float
    classes: _containers.RepeatedCompositeFieldContainer[AppClass]
    vocab_size: int
    worker_to_scheduler: HopLatency
    applied_to_durable: HopLatency
    applied_to_gateway: HopLatency
    def __init__(self, model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., block_size: _Optional[int] = ..., live_workers: _Optional[int] = ..., queued_requests: _Optional[int] = ..., policy: _Optional[str] = ..., app_classes: _Optional[_Iterable[str]] = ..., iterations: _Optional[int] = ..., sched_ms_p50: _Optional[float] = ..., sched_ms_p99: _Optional[float] = ..., overhead_ms: _Optional[float] = ..., classes: _Optional[_Iterable[_Union[AppClass, _Mapping]]] = ..., vocab_size: _Optional[int] = ..., worker_to_scheduler: _Optional[_Union[HopLatency, _Mapping]] = ..., applied_to_durable: _Optional[_Union[HopLatency, _Mapping]] = ..., applied_to_gateway: _Optional[_Union[HopLatency, _Mapping]] = ...) -> None: ...

class HopLatency(_message.Message):
    __slots__ = ("p50_ms", "p99_ms", "samples")
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    p50_ms: float
    p99_ms: float
    samples: int
    def __init__(self, p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class AppClass(_message.Message):
    __slots__ = ("name", "slo")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    name: str
    slo: _common_pb2.SLOSpec
    def __init__(self, name: _Optional[str] = ..., slo: _Optional[_Union[_common_pb2.SLOSpec, _Mapping]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "address", "description")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    description: _common_pb2.WorkerDescription
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., description: _Optional[_Union[_common_pb2.WorkerDescription, _Mapping]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s", "heartbeat_ttl_s")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TTL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    heartbeat_ttl_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., heartbeat_ttl_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "draining", "assigned", "drain_left_s")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    known: bool
    draining: bool
    assigned: int
    drain_left_s: float
    def __init__(self, known: _Optional[bool] = ..., draining: _Optional[bool] = ..., assigned: _Optional[int] = ..., drain_left_s: _Optional[float] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "grace_s", "query")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    grace_s: float
    query: bool
    def __init__(self, worker_id: _Optional[str] = ..., grace_s: _Optional[float] = ..., query: _Optional[bool] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("assigned", "drain_left_s", "draining")
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    assigned: int
    drain_left_s: float
    draining: bool
    def __init__(self, assigned: _Optional[int] = ..., drain_left_s: _Optional[float] = ..., draining: _Optional[bool] = ...) -> None: ...
