from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("inputs", "text", "top_k")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[float]
    text: str
    top_k: int
    def __init__(self, inputs: _Optional[_Iterable[float]] = ..., text: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("outputs", "experts", "weights", "paths")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedScalarFieldContainer[float]
    experts: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, outputs: _Optional[_Iterable[float]] = ..., experts: _Optional[_Iterable[int]] = ..., weights: _Optional[_Iterable[float]] = ..., paths: _Optional[_Iterable[str]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("n", "steps", "solver", "top_k", "full", "resample", "seed", "hold")
    N_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    RESAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    n: int
    steps: int
    solver: str
    top_k: int
    full: bool
    resample: bool
    seed: int
    hold: bool
    def __init__(self, n: _Optional[int] = ..., steps: _Optional[int] = ..., solver: _Optional[str] = ..., top_k: _Optional[int] = ..., full: _Optional[bool] = ..., resample: _Optional[bool] = ..., seed: _Optional[int] = ..., hold: _Optional[bool] = ...) -> None: ...

class SampleReply(_message.Message):
    __slots__ = ("samples", "shape")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedScalarFieldContainer[float]
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, samples: _Optional[_Iterable[float]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...
