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
    __slots__ = ("profile", "name", "client_id", "public_key", "feature_sum", "examples", "enrolment", "proof", "proof_time")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SUM_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    PROOF_TIME_FIELD_NUMBER: _ClassVar[int]
    profile: DeviceProfile
    name: str
    client_id: str
    public_key: bytes
    feature_sum: _containers.RepeatedScalarFieldContainer[float]
    examples: float
    enrolment: str
    proof: bytes
    proof_time: int
    def __init__(self, profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., name: _Optional[str] = ..., client_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., feature_sum: _Optional[_Iterable[float]] = ..., examples: _Optional[float] = ..., enrolment: _Optional[str] = ..., proof: _Optional[bytes] = ..., proof_time: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("client_id", "worker_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    worker_id: str
    def __init__(self, client_id: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class PullFrame(_message.Message):
    __slots__ = ("assignment", "tensor")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    tensor: _tensor_pb2.TensorFrame
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("client_id", "round", "path", "variant", "seed", "weight", "loss", "update_id", "signature", "worker_id", "evaluation")
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    path: str
    variant: Variant
    seed: int
    weight: float
    loss: float
    update_id: str
    signature: bytes
    worker_id: str
    evaluation: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., path: _Optional[str] = ..., variant: _Optional[_Union[Variant, _Mapping]] = ..., seed: _Optional[int] = ..., weight: _Optional[float] = ..., loss: _Optional[float] = ..., update_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., worker_id: _Optional[str] = ..., evaluation: _Optional[_Mapping[str, float]] = ...) -> None: ...

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
    __slots__ = ("client_id", "wait_s")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    wait_s: float
    def __init__(self, client_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("action", "round", "workers")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[HeartbeatReply.Action]
        TRAIN: _ClassVar[HeartbeatReply.Action]
        DONE: _ClassVar[HeartbeatReply.Action]
        CLUSTER: _ClassVar[HeartbeatReply.Action]
        ASSIGN: _ClassVar[HeartbeatReply.Action]
    WAIT: HeartbeatReply.Action
    TRAIN: HeartbeatReply.Action
    DONE: HeartbeatReply.Action
    CLUSTER: HeartbeatReply.Action
    ASSIGN: HeartbeatReply.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    action: HeartbeatReply.Action
    round: int
    workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, action: _Optional[_Union[HeartbeatReply.Action, str]] = ..., round: _Optional[int] = ..., workers: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class ProposalRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ProposalReply(_message.Message):
    __slots__ = ("pass_number", "first", "k", "width", "centroids", "prices", "softness", "converged", "products")
    PASS_NUMBER_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CENTROIDS_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    SOFTNESS_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    pass_number: int
    first: bool
    k: int
    width: int
    centroids: _containers.RepeatedScalarFieldContainer[float]
    prices: _containers.RepeatedScalarFieldContainer[float]
    softness: float
    converged: bool
    products: bool
    def __init__(self, pass_number: _Optional[int] = ..., first: _Optional[bool] = ..., k: _Optional[int] = ..., width: _Optional[int] = ..., centroids: _Optional[_Iterable[float]] = ..., prices: _Optional[_Iterable[float]] = ..., softness: _Optional[float] = ..., converged: _Optional[bool] = ..., products: _Optional[bool] = ...) -> None: ...

class ClusterReport(_message.Message):
    __slots__ = ("client_id", "pass_number", "counts", "sums", "squares", "soft", "products")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PASS_NUMBER_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    SQUARES_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    pass_number: int
    counts: _containers.RepeatedScalarFieldContainer[float]
    sums: _containers.RepeatedScalarFieldContainer[float]
    squares: _containers.RepeatedScalarFieldContainer[float]
    soft: _containers.RepeatedScalarFieldContainer[float]
    products: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, client_id: _Optional[str] = ..., pass_number: _Optional[int] = ..., counts: _Optional[_Iterable[float]] = ..., sums: _Optional[_Iterable[float]] = ..., squares: _Optional[_Iterable[float]] = ..., soft: _Optional[_Iterable[float]] = ..., products: _Optional[_Iterable[float]] = ...) -> None: ...

class ClusterReply(_message.Message):
    __slots__ = ("pass_number", "converged")
    PASS_NUMBER_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    pass_number: int
    converged: bool
    def __init__(self, pass_number: _Optional[int] = ..., converged: _Optional[bool] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("client_id", "histogram")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    histogram: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, client_id: _Optional[str] = ..., histogram: _Optional[_Iterable[float]] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("worker_id", "assignment", "cluster", "examples", "trains_router")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAINS_ROUTER_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    assignment: Assignment
    cluster: int
    examples: int
    trains_router: bool
    def __init__(self, worker_id: _Optional[str] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., cluster: _Optional[int] = ..., examples: _Optional[int] = ..., trains_router: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AssignReply(_message.Message):
    __slots__ = ("workers", "pending")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    pending: bool
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., pending: _Optional[bool] = ...) -> None: ...
