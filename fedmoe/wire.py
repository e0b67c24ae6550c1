"""Tensors on the wire: `QTensor`s as a stream of `TensorFrame`s, chunked and checksummed.

Each tensor travels as a header (name, bits, shape, byte counts, sha256 of payload || scales) followed by
chunks of at most `CHUNK_BYTES` (the payload's, then the scales'); one End frame with the tensor count closes
the stream. Chunks stay far below gRPC's 4 MB default message limit, so that limit never bounds a tensor's
size; `decode_tensors` bounds it instead, checking each header against the tensors the receiver expects (when
it knows them) and the declared sizes against `max_bytes`, and its buffers grow as data arrives: a header
alone allocates nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import grpc

from fedmoe.compress.quant import BITS, QTensor, wire_bytes
from fedmoe.v1 import tensor_pb2

CHUNK_BYTES = 1 << 20


class WireError(ValueError):
    """A malformed, oversize or truncated tensor stream; `code` is the gRPC status to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> WireError:
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _lengths(name: str, bits: int, shape: Sequence[int]) -> tuple[int, int]:
    """(payload bytes, scale bytes) that a tensor of these bits and shape must have."""
    if bits not in BITS:
        raise _invalid(f"tensor {name!r}: unsupported bit-width {bits}; expected one of {BITS}")
    scale = 2 * (shape[0] if len(shape) >= 2 else 1) if bits in (8, 4) else 0
    return wire_bytes(tuple(shape), bits) - scale, scale


def encode_tensors(
    tensors: Mapping[str, QTensor], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tensor_pb2.TensorFrame]:
    """The frames of tensors: per tensor a header then its chunks of at most chunk_bytes,
    then one End frame.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for name, q in tensors.items():
        if (len(q.payload), len(q.scales)) != _lengths(name, q.bits, q.shape):
            raise _invalid(
                f"tensor {name!r}: {len(q.payload)} + {len(q.scales)} bytes do not fit "
                f"{q.bits} bits and shape {tuple(q.shape)}"
            )
        digest = hashlib.sha256(q.payload)
        digest.update(q.scales)
        header = tensor_pb2.TensorHeader(
            name=name,
            bits=q.bits,
            shape=q.shape,
            payload_bytes=len(q.payload),
            scale_bytes=len(q.scales),
            sha256=digest.digest(),
        )
        yield tensor_pb2.TensorFrame(header=header)
        for part in (q.payload, q.scales):
            view = memoryview(part)
            for start in range(0, len(view), chunk_bytes):
                frame = tensor_pb2.TensorFrame()
                frame.chunk.data = bytes(view[start : start + chunk_bytes])
                yield frame
    yield tensor_pb2.TensorFrame(end=tensor_pb2.End(tensors=len(tensors)))


Expected = Mapping[str, tuple[int, tuple[int, ...]]]  # tensor name -> (bits, shape)


class _Incoming:
    """A tensor being received: its header's fields, and the bytes so far in a buffer that grows with them."""

    def __init__(
        self, h: tensor_pb2.TensorHeader, seen: Mapping[str, QTensor], budget: int, expected: Expected | None
    ) -> None:
        """Check the header: a new name, the bits and shape `expected` of it (when given), lengths that fit
        bits and shape, at most budget bytes."""
        if not h.name or h.name in seen:
            raise _invalid(f"tensor {h.name[:64]!r} sent twice" if h.name else "tensor header without a name")
        if expected is not None:
            if h.name not in expected:
                raise _invalid(f"tensor {h.name[:64]!r} is not one of the {len(expected)} tensors expected")
            bits, shape = expected[h.name]
            if (h.bits, tuple(h.shape)) != (bits, tuple(shape)):
                raise _invalid(
                    f"tensor {h.name!r}: {h.bits} bits and shape {tuple(h.shape)[:8]}, "
                    f"expected {bits} bits and shape {tuple(shape)}"
                )
        payload, scale = _lengths(h.name, h.bits, h.shape)
        if (h.payload_bytes, h.scale_bytes) != (payload, scale):
            raise _invalid(
                f"tensor {h.name!r}: declares {h.payload_bytes} payload + {h.scale_bytes} scale bytes, "
                f"but {h.bits} bits and shape {tuple(h.shape)} need {payload} + {scale}"
            )
        if len(h.sha256) != hashlib.sha256().digest_size:
            raise _invalid(f"tensor {h.name!r}: sha256 must be 32 bytes, got {len(h.sha256)}")
        if payload + scale > budget:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tensor {h.name!r}: declares {payload + scale} "
                f"bytes, over the {max(budget, 0)} left under the stream's limit",
            )
        self.name, self.bits, self.shape = h.name, h.bits, tuple(h.shape)
        self.payload_bytes, self.sha256 = h.payload_bytes, h.sha256
        self.size = payload + scale
        self.buffer = bytearray()
        self.digest = hashlib.sha256()

    @property
    def filled(self) -> int:
        """Bytes received so far."""
        return len(self.buffer)

    def progress(self) -> str:
        """How far the tensor got, for error messages."""
        return f"{self.filled} of {self.size} bytes of tensor {self.name!r}"

    def add(self, data: bytes) -> None:
        """Append one chunk's data."""
        if not data or self.filled + len(data) > self.size:
            raise _invalid(f"chunk of {len(data)} bytes after {self.progress()}: empty or overflowing")
        self.buffer += data
        self.digest.update(data)

    def result(self) -> QTensor | None:
        """The tensor once all its bytes arrived, after checking their sha256; None before."""
        if self.filled < self.size:
            return None
        if self.digest.digest() != self.sha256:
            raise _invalid(f"tensor {self.name!r}: sha256 mismatch over its {self.filled} bytes")
        view = memoryview(self.buffer)
        return QTensor(
            self.bits, self.shape, bytes(view[: self.payload_bytes]), bytes(view[self.payload_bytes :])
        )


def decode_tensors(
    frames: Iterable[tensor_pb2.TensorFrame], max_bytes: int, expected: Expected | None = None
) -> dict[str, QTensor]:
    """The tensors of a frame stream, read to its end;
    raises WireError on a malformed, oversize or truncated stream.

    With `expected` ({name: (bits, shape)}), the stream must carry exactly those tensors. The declared sizes
    are summed and checked against max_bytes at each header, before that tensor's data is read.
    """
    tensors: dict[str, QTensor] = {}
    current: _Incoming | None = None
    declared = 0
    ended = False
    for frame in frames:
        kind = frame.WhichOneof("frame")
        if ended:
            raise _invalid(f"{kind or 'empty'} frame after End")
        if kind == "header":
            h = frame.header
            if current is not None:
                raise _invalid(f"header of {h.name!r} after only {current.progress()}")
            current = _Incoming(h, tensors, max_bytes - declared, expected)
            declared += current.size
        elif kind == "chunk":
            if current is None:
                after = (
                    f"after tensor {next(reversed(tensors))!r} was complete"
                    if tensors
                    else "before any header"
                )
                raise _invalid(f"chunk of {len(frame.chunk.data)} bytes {after}")
            current.add(frame.chunk.data)
        elif kind == "end":
            if current is not None:
                raise WireError(grpc.StatusCode.DATA_LOSS, f"End after only {current.progress()}")
            if frame.end.tensors != len(tensors):
                raise _invalid(f"End counts {frame.end.tensors} tensors, the stream carried {len(tensors)}")
            if expected is not None and len(tensors) != len(expected):
                missing = sorted(set(expected) - set(tensors))
                raise _invalid(f"the stream lacks {len(missing)} expected tensors: {missing[:8]}")
            ended = True
        else:
            raise _invalid("frame with no header, chunk or End set")
        if current is not None and (received := current.result()) is not None:
            tensors[current.name], current = received, None
    if not ended:
        raise WireError(
            grpc.StatusCode.DATA_LOSS,
            "stream ended before End" + (f", after only {current.progress()}" if current else ""),
        )
    return tensors
