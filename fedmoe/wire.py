"""Tensors on the wire: `QTensor`s as a stream of `TensorFrame`s, chunked and checksummed.

Each tensor travels as a header (name, bits, shape, byte counts, BLAKE3 digest of payload || scales)
followed by chunks of at most `CHUNK_BYTES` (the payload's, then the scales'); one End frame with the tensor
count closes the stream. Chunks stay far below gRPC's 4 MB default message limit, so that limit never bounds a
tensor's size; `decode_tensors` bounds it instead, checking each header against the tensors the receiver
expects (when it knows them) and the declared sizes against `max_bytes`, and it copies each chunk into place
as it arrives (see `TensorReader`: into the tensor's buffer, or appended to a `fedmoe.checkpoint.Spool` on
disk): a header alone takes no memory.

Each side hashes a tensor's bytes once: `tensor_digest` remembers the digest of every QTensor it hashed or
`decode_tensors` verified, so a signature over the tensors (`fedmoe.security.update_digest`) reads it instead
of hashing again. BLAKE3, a cryptographic hash about five times as fast as SHA-256 on one core, keeps the
checksum from slowing the stream. A receiver may hand `decode_tensors` a chunk frame's data as a memoryview
into the message as it arrived (`chunk_view`), sparing the protobuf parse and its copies.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import blake3
import grpc
import numpy as np

from fedmoe.checkpoint import Spool
from fedmoe.compress.quant import BITS, QTensor, wire_bytes
from fedmoe.v1 import tensor_pb2

CHUNK_BYTES = 1 << 20
DIGEST_BYTES = 32  # a tensor's BLAKE3 digest
TENSOR_FIELD = 2  # the field number of the TensorFrame in PullFrame and PushFrame
SMALL_FRAME_BYTES = 64 << 10  # frames smaller than this travel together in Batch frames
READ_AHEAD = 8  # messages a stream is received ahead of its reader (see `read_ahead`)
T = TypeVar("T")
_DIGESTS: weakref.WeakKeyDictionary[QTensor, bytes] = weakref.WeakKeyDictionary()


def tensor_digest(q: QTensor) -> bytes:
    """The BLAKE3 digest (32 bytes) of q's payload || scales, hashed once per QTensor (remembered while q
    lives; a QTensor's bytes never change)."""
    digest = _DIGESTS.get(q)
    if digest is None:
        h = blake3.blake3(q.payload)
        h.update(q.scales)
        digest = _DIGESTS[q] = h.digest()
    return digest


def read_ahead(
    messages: Iterator[T], cancel: Callable[[], Any] | None = None, depth: int = READ_AHEAD
) -> Iterator[T]:
    """The messages of a gRPC stream, received by a thread of their own up to `depth` ahead of the reader, so
    that receiving overlaps what the reader does with each (hashing and copying release the GIL; gRPC asks
    for the next message only when the last is taken). The stream's error is raised to the reader in its
    place. A reader that stops early calls `cancel` (a client's call.cancel) to end a receive under way."""
    end = object()
    pool = ThreadPoolExecutor(1, thread_name_prefix="fedmoe-read-ahead")  # one next() at a time, in order
    ahead = deque(pool.submit(next, messages, end) for _ in range(depth))
    try:
        while (message := ahead.popleft().result()) is not end:
            ahead.append(pool.submit(next, messages, end))
            yield message
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if cancel is not None:
            cancel()


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
    tensors: Mapping[str, QTensor],
    chunk_bytes: int = CHUNK_BYTES,
    into: type | None = None,
    batch_bytes: int = 0,
    serialized: bool = False,
) -> Iterator[Any]:
    """The frames of tensors: per tensor a header then its payload's and scales' chunks of at most
    chunk_bytes, then one End frame.

    With `batch_bytes` (what the coordinator and clients send), a tensor whose bytes fit one chunk travels in
    one, and frames smaller than `SMALL_FRAME_BYTES` travel together in Batch frames of up to batch_bytes: a
    path of small tensors is a message or two, not two or three per tensor (gRPC's cost is per message).

    TensorFrames, or with `into` (PullFrame or PushFrame) frames of that type, their TensorFrame built in
    place in the `tensor` field (not built apart and copied in). With `into` and `serialized`, each frame as
    it travels (bytes): a chunk that travels alone is built straight from the tensor's bytes
    (`chunk_message`, one copy where a message would take three).
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if serialized and into is None:
        raise ValueError("serialized frames need `into`: the message type they travel as")
    done = frame_bytes if serialized else (lambda frame: frame)
    batch, batched = None, 0
    for kind, value in _frame_items(tensors, chunk_bytes, whole=batch_bytes > 0):
        size = len(value) if kind == "chunk" else value.ByteSize()
        if not batch_bytes or size >= SMALL_FRAME_BYTES:  # alone
            if batch is not None:
                yield done(batch)
                batch, batched = None, 0
            if serialized and kind == "chunk":
                yield chunk_message(value)
                continue
            frame = _frame(into)
            _set(frame.tensor if into else frame, kind, value)
            yield done(frame)
            continue
        if batch is None:
            batch = _frame(into, batch=tensor_pb2.Batch())
        _set((batch.tensor if into else batch).batch.frames.add(), kind, value)
        batched += size
        if batched >= batch_bytes:
            yield done(batch)
            batch, batched = None, 0
    if batch is not None:
        yield done(batch)


def _frame_items(tensors: Mapping[str, QTensor], chunk_bytes: int, whole: bool) -> Iterator[tuple[str, Any]]:
    """(kind, value) of each frame of `encode_tensors`: ("header", TensorHeader), ("chunk", bytes or a view
    of the tensor's bytes) or ("end", End). `whole`: a tensor whose bytes fit one chunk travels in one."""
    for name, q in tensors.items():
        if (len(q.payload), len(q.scales)) != _lengths(name, q.bits, q.shape):
            raise _invalid(
                f"tensor {name!r}: {len(q.payload)} + {len(q.scales)} bytes do not fit "
                f"{q.bits} bits and shape {tuple(q.shape)}"
            )
        header = tensor_pb2.TensorHeader(
            name=name,
            bits=q.bits,
            shape=q.shape,
            payload_bytes=len(q.payload),
            scale_bytes=len(q.scales),
            digest=tensor_digest(q),
        )
        yield "header", header
        if whole and len(q.payload) + len(q.scales) <= chunk_bytes:
            if q.payload or q.scales:
                yield "chunk", b"".join((q.payload, q.scales))
            continue
        for part in (q.payload, q.scales):
            view = memoryview(part)
            for start in range(0, len(view), chunk_bytes):
                yield "chunk", view[start : start + chunk_bytes]
    yield "end", tensor_pb2.End(tensors=len(tensors))


def _set(frame: tensor_pb2.TensorFrame, kind: str, value: Any) -> None:
    """Fill `frame` with one item of `_frame_items`."""
    if kind == "chunk":
        frame.chunk.data = bytes(value)
    else:
        getattr(frame, kind).CopyFrom(value)


def _frame(into: type | None, **field: Any) -> Any:
    """A TensorFrame with `field` set, or one inside a frame of type `into`."""
    frame = tensor_pb2.TensorFrame(**field)
    return frame if into is None else into(tensor=frame)


def _unbatched(frames: Iterable[tensor_pb2.TensorFrame | memoryview]) -> Iterator:
    """A stream's frames with each Batch frame's frames in its place (a batch holds no batch)."""
    for frame in frames:
        if isinstance(frame, memoryview) or frame.WhichOneof("frame") != "batch":
            yield frame
            continue
        for inner in frame.batch.frames:
            if inner.WhichOneof("frame") == "batch":
                raise _invalid("a batch frame inside a batch frame")
            yield inner


def _varint(data: bytes | memoryview, at: int) -> tuple[int, int]:
    """The base-128 varint in data at `at` and the offset after it; (-1, at) when it runs past the end or
    past 10 bytes."""
    value = shift = 0
    for i in range(at, min(at + 10, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, at


def frame_bytes(frame: Any) -> bytes:
    """A frame as it travels: a message serialized, bytes (already serialized) as they are; the serializer of
    the streams that carry `encode_tensors(..., serialized=True)` frames."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


def _field(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field."""
    out = bytearray([number << 3 | 2])
    while length >= 0x80:
        out.append(length & 0x7F | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out)


def chunk_message(data: bytes | memoryview) -> bytes:
    """A serialized PullFrame or PushFrame holding nothing but a chunk frame of (non-empty) `data`, built
    straight from its bytes: exactly what protobuf would serialize, and what `chunk_view` reads back."""
    inner = _field(1, len(data))
    middle = _field(2, len(inner) + len(data))
    return b"".join((_field(TENSOR_FIELD, len(middle) + len(inner) + len(data)), middle, inner, data))


def chunk_view(message: bytes) -> memoryview | None:
    """The data of a serialized PullFrame or PushFrame that holds nothing but a chunk frame, as a view into
    `message` (no copy); None for any other message, which the caller parses as protobuf.

    Such a message is exactly: field `TENSOR_FIELD` (length-delimited) holding field 2 of TensorFrame (the
    Chunk) holding field 1 (its data), each length filling the rest of the message.
    """
    at = 0
    for tag in (TENSOR_FIELD << 3 | 2, 2 << 3 | 2, 1 << 3 | 2):
        if at >= len(message) or message[at] != tag:
            return None
        length, at = _varint(message, at + 1)
        if length != len(message) - at:
            return None
    return memoryview(message)[at:]


Expected = Mapping[str, tuple[int, tuple[int, ...]]]  # tensor name -> (bits, shape)


class _Incoming:
    """A tensor being received: its header's fields, its payload's and scales' bytes so far and their running
    digest.

    Each chunk is hashed and copied into place as it arrives (a copy that releases the GIL, while the stream
    receives the next), so that the tensor is whole when its last chunk is: nothing is joined after the
    stream. The place is a buffer allocated at the header, untouched (its memory is taken as it fills, not
    as the header declares), or the end of a `Spool` (the tensor's bytes then follow the previous tensor's
    in its file). The tensor's payload and scales are views of it.
    """

    def __init__(
        self,
        h: tensor_pb2.TensorHeader,
        seen: Mapping[str, Any],
        budget: int,
        expected: Expected | None,
        spool: Spool | None = None,
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
        if len(h.digest) != DIGEST_BYTES:
            raise _invalid(f"tensor {h.name!r}: its digest must be {DIGEST_BYTES} bytes, got {len(h.digest)}")
        if payload + scale > budget:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tensor {h.name!r}: declares {payload + scale} "
                f"bytes, over the {max(budget, 0)} left under the stream's limit",
            )
        self.name, self.bits, self.shape = h.name, h.bits, tuple(h.shape)
        self.payload_bytes, self.expected_digest = h.payload_bytes, h.digest
        self.size = payload + scale
        self.filled = 0
        self.spool, self.start = spool, spool.size if spool is not None else 0
        self.buffer = np.empty(self.size, dtype=np.uint8) if spool is None else None
        self.digest = blake3.blake3()

    def progress(self) -> str:
        """How far the tensor got, for error messages."""
        return f"{self.filled} of {self.size} bytes of tensor {self.name!r}"

    def add(self, data: bytes | memoryview) -> None:
        """Take one chunk's data (copied)."""
        if not data or self.filled + len(data) > self.size:
            raise _invalid(f"chunk of {len(data)} bytes after {self.progress()}: empty or overflowing")
        self.digest.update(data)
        if self.buffer is None:
            self.spool.write(data)
        else:
            self.buffer[self.filled : self.filled + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.filled += len(data)

    def complete(self) -> bool:
        """Whether all its bytes arrived, after checking their digest once they have."""
        if self.filled < self.size:
            return False
        if self.digest.digest() != self.expected_digest:
            raise _invalid(f"tensor {self.name!r}: digest mismatch over its {self.filled} bytes")
        return True

    def tensor(self, spooled: memoryview) -> QTensor:
        """The complete tensor, its bytes a view of its buffer or of `spooled` (the spool's mapped bytes);
        its digest remembered as its `tensor_digest`."""
        if self.buffer is None:
            view = spooled[self.start : self.start + self.size]
        else:
            view = memoryview(self.buffer)
        q = QTensor(self.bits, self.shape, view[: self.payload_bytes], view[self.payload_bytes :])
        _DIGESTS[q] = self.expected_digest
        return q


class TensorReader:
    """A frame stream's tensors, read as its frames arrive (`feed` each, then `tensors`); raises WireError on
    a malformed, oversize or truncated stream.

    A frame is a TensorFrame, or a chunk frame's data as a memoryview (see `chunk_view`). With `expected`
    ({name: (bits, shape)}), the stream must carry exactly those tensors. The declared sizes are summed and
    checked against max_bytes at each header, before that tensor's data is read. With a `spool`, the
    tensors' bytes are written to it as they arrive, back to back in the stream's order (each tensor's
    payload || scales: the records of `fedmoe.checkpoint.save_records`), and the tensors are views of it.
    """

    def __init__(self, max_bytes: int, expected: Expected | None = None, spool: Spool | None = None) -> None:
        self.max_bytes, self.expected, self.spool = max_bytes, expected, spool
        self.received: dict[str, _Incoming] = {}
        self.current: _Incoming | None = None
        self.declared = 0
        self.ended = False

    def feed(self, frame: tensor_pb2.TensorFrame | memoryview) -> None:
        """Take the stream's next frame."""
        for inner in _unbatched((frame,)):
            self._take(inner)

    def _take(self, frame: tensor_pb2.TensorFrame | memoryview) -> None:
        data = frame if isinstance(frame, memoryview) else None
        kind = "chunk" if data is not None else frame.WhichOneof("frame")
        tensors, current, expected = self.received, self.current, self.expected
        if self.ended:
            raise _invalid(f"{kind or 'empty'} frame after End")
        if kind == "header":
            h = frame.header
            if current is not None:
                raise _invalid(f"header of {h.name!r} after only {current.progress()}")
            budget = self.max_bytes - self.declared
            current = self.current = _Incoming(h, tensors, budget, expected, self.spool)
            self.declared += current.size
        elif kind == "chunk":
            data = frame.chunk.data if data is None else data
            if current is None:
                after = (
                    f"after tensor {next(reversed(tensors))!r} was complete"
                    if tensors
                    else "before any header"
                )
                raise _invalid(f"chunk of {len(data)} bytes {after}")
            current.add(data)
        elif kind == "end":
            if current is not None:
                raise WireError(grpc.StatusCode.DATA_LOSS, f"End after only {current.progress()}")
            if frame.end.tensors != len(tensors):
                raise _invalid(f"End counts {frame.end.tensors} tensors, the stream carried {len(tensors)}")
            if expected is not None and len(tensors) != len(expected):
                missing = sorted(set(expected) - set(tensors))
                raise _invalid(f"the stream lacks {len(missing)} expected tensors: {missing[:8]}")
            self.ended = True
        else:
            raise _invalid("frame with no header, chunk or End set")
        if current is not None and current.complete():
            tensors[current.name], self.current = current, None

    def tensors(self) -> dict[str, QTensor]:
        """The tensors, once the stream ended (DATA_LOSS when it stopped before its End frame)."""
        if not self.ended:
            current = self.current
            raise WireError(
                grpc.StatusCode.DATA_LOSS,
                "stream ended before End" + (f", after only {current.progress()}" if current else ""),
            )
        spooled = self.spool.view() if self.spool is not None else memoryview(b"")
        return {name: incoming.tensor(spooled) for name, incoming in self.received.items()}


def decode_tensors(
    frames: Iterable[tensor_pb2.TensorFrame | memoryview], max_bytes: int, expected: Expected | None = None
) -> dict[str, QTensor]:
    """The tensors of a frame stream, read to its end (see `TensorReader`)."""
    reader = TensorReader(max_bytes, expected)
    for frame in frames:
        reader.feed(frame)
    return reader.tensors()
