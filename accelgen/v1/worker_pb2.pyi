from accelgen.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScheduledChunk(_message.Message):
    __slots__ = ("request_id", "num_computed_tokens", "token_ids", "new_block_ids", "is_new", "block_table", "sampling_params", "samples", "num_output_tokens", "prompt_len", "sampled_input")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    IS_NEW_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_INPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_computed_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    is_new: bool
    block_table: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    samples: bool
    num_output_tokens: int
    prompt_len: int
    sampled_input: bool
    def __init__(self, request_id: _Optional[str] = ..., num_computed_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., new_block_ids: _Optional[_Iterable[int]] = ..., is_new: _Optional[bool] = ..., block_table: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., samples: _Optional[bool] = ..., num_output_tokens: _Optional[int] = ..., prompt_len: _Optional[int] = ..., sampled_input: _Optional[bool] = ...) -> None: ...

class BatchPlan(_message.Message):
    __slots__ = ("iteration", "epoch", "chunks", "freed_request_ids", "predicted_time_s", "fence")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FREED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TIME_S_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    epoch: str
    chunks: _containers.RepeatedCompositeFieldContainer[ScheduledChunk]
    freed_request_ids: _containers.RepeatedScalarFieldContainer[str]
    predicted_time_s: float
    fence: int
    def __init__(self, iteration: _Optional[int] = ..., epoch: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[ScheduledChunk, _Mapping]]] = ..., freed_request_ids: _Optional[_Iterable[str]] = ..., predicted_time_s: _Optional[float] = ..., fence: _Optional[int] = ...) -> None: ...

class IterationResult(_message.Message):
    __slots__ = ("iteration", "sampled_token_ids", "elapsed_s", "finished_at", "logprobs")
    class SampledTokenIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.TokenLogprob
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ...) -> None: ...
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    sampled_token_ids: _containers.ScalarMap[str, int]
    elapsed_s: float
    finished_at: float
    logprobs: _containers.MessageMap[str, _common_pb2.TokenLogprob]
    def __init__(self, iteration: _Optional[int] = ..., sampled_token_ids: _Optional[_Mapping[str, int]] = ..., elapsed_s: _Optional[float] = ..., finished_at: _Optional[float] = ..., logprobs: _Optional[_Mapping[str, _common_pb2.TokenLogprob]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
