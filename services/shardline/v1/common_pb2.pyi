from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "has_seed", "top_logprobs", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    has_seed: bool
    top_logprobs: int
    logprobs: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("steps", "timeout_s")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    steps: int
    timeout_s: float
    def __init__(self, steps: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ProfileCategory(_message.Message):
    __slots__ = ("name", "cpu_seconds", "device_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    cpu_seconds: float
    device_seconds: float
    def __init__(self, name: _Optional[str] = ..., cpu_seconds: _Optional[float] = ..., device_seconds: _Optional[float] = ...) -> None: ...

class ProfileResult(_message.Message):
    __slots__ = ("steps_recorded", "steps_requested", "window_seconds", "step_seconds", "categories", "trace_json_gz", "device", "stage_index", "note")
    STEPS_RECORDED_FIELD_NUMBER: _ClassVar[int]
    STEPS_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    TRACE_JSON_GZ_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    steps_recorded: int
    steps_requested: int
    window_seconds: float
    step_seconds: float
    categories: _containers.RepeatedCompositeFieldContainer[ProfileCategory]
    trace_json_gz: bytes
    device: str
    stage_index: int
    note: str
    def __init__(self, steps_recorded: _Optional[int] = ..., steps_requested: _Optional[int] = ..., window_seconds: _Optional[float] = ..., step_seconds: _Optional[float] = ..., categories: _Optional[_Iterable[_Union[ProfileCategory, _Mapping]]] = ..., trace_json_gz: _Optional[bytes] = ..., device: _Optional[str] = ..., stage_index: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...
