from fedmoe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceProfile(_message.Message):
    __slots__ = ("name", "memory_bytes", "bits", "densities", "speed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    DENSITIES_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_bytes: int
    bits: int
    densities: _containers.RepeatedScalarFieldContainer[float]
    speed: float
    def __init__(self, name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., bits: _Optional[int] = ..., densities: _Optional[_Iterable[float]] = ..., speed: _Optional[float] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("bits", "density", "scheme")
    BITS_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    bits: int
    density: float
    scheme: str
    def __init__(self, bits: _Optional[int] = ..., density: _Optional[float] = ..., scheme: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("path", "variant", "round", "seed", "inner_steps", "batch_size", "lr", "weight_decay", "grad_clip")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    path: str
    variant: Variant
    round: int
    seed: int
    inner_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    grad_clip: float
    def __init__(self, path: _Optional[str] = ..., variant: _Optional[_Union[Variant, _Mapping]] = ..., round: _Optional[int] = ..., seed: _Optional[int] = ..., inner_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., grad_clip: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("profile", "name", "client_id", "public_key", "feature_sum", "examples")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SUM_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    profile: DeviceProfile
    name: str
    client_id: str
    public_key: bytes
    feature_sum: _containers.RepeatedScalarFieldContainer[float]
    examples: float
    def __init__(self, profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., name: _Optional[str] = ..., client_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., feature_sum: _Optional[_Iterable[float]] = ..., examples: _Optional[float] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "token", "model_json", "assignment")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    model_json: str
    assignment: Assignment
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., model_json: _Optional[str] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class PullFrame(_message.Message):
    __slots__ = ("assignment", "tensor")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    tensor: _tensor_pb2.TensorFrame
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("client_id", "round", "path", "variant", "seed", "weight", "loss", "update_id", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    path: str
    variant: Variant
    seed: int
    weight: float
    loss: float
    update_id: str
    signature: bytes
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., path: _Optional[str] = ..., variant: _Optional[_Union[Variant, _Mapping]] = ..., seed: _Optional[int] = ..., weight: _Optional[float] = ..., loss: _Optional[float] = ..., update_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PushFrame(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    tensor: _tensor_pb2.TensorFrame
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "round", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("action", "round")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[HeartbeatReply.Action]
        TRAIN: _ClassVar[HeartbeatReply.Action]
        DONE: _ClassVar[HeartbeatReply.Action]
    WAIT: HeartbeatReply.Action
    TRAIN: HeartbeatReply.Action
    DONE: HeartbeatReply.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    action: HeartbeatReply.Action
    round: int
    def __init__(self, action: _Optional[_Union[HeartbeatReply.Action, str]] = ..., round: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
