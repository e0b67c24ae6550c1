"""fedmoe.wire: QTensors as chunked, checksummed TensorFrame streams, and their validation."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Iterator
from concurrent import futures

import blake3
import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.compress.quant import QTensor, dequantize, quantize
from fedmoe.security import update_digest
from fedmoe.v1 import coordinator_pb2, coordinator_pb2_grpc, tensor_pb2
from fedmoe.wire import (
    CHUNK_BYTES,
    WireError,
    chunk_message,
    chunk_view,
    decode_tensors,
    encode_tensors,
    read_ahead,
    tensor_digest,
)

INVALID, DATA_LOSS, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def _tensors() -> dict[str, QTensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fp32": quantize(torch.randn(3, 5, generator=g), 32),
        "fp16": quantize(torch.randn(4, generator=g), 16),
        "int8": quantize(torch.randn(6, 7, generator=g), 8),
        "int4_odd": quantize(torch.randn(13, generator=g), 4),
        "empty": quantize(torch.randn(0, 4, generator=g), 32),
        "empty_int8": quantize(torch.randn(0, generator=g), 8),  # no values, but one channel's scale
        "scalar": quantize(torch.tensor(2.5), 4),
    }


def _frames(tensors: dict[str, QTensor] | None = None, chunk: int = 7) -> list[tensor_pb2.TensorFrame]:
    return list(encode_tensors(_tensors() if tensors is None else tensors, chunk))


def _kinds(frames: list[tensor_pb2.TensorFrame]) -> list[str]:
    return [f.WhichOneof("frame") for f in frames]


def _fails(
    frames: list[tensor_pb2.TensorFrame], code: grpc.StatusCode, match: str, max_bytes: int = 1 << 20
) -> None:
    with pytest.raises(WireError, match=match) as info:
        decode_tensors(frames, max_bytes)
    assert info.value.code == code


def test_round_trip_spans_many_small_chunks() -> None:
    tensors = _tensors()
    frames = _frames(tensors)
    assert (
        _kinds(frames)[0] == "header"
        and _kinds(frames)[-1] == "end"
        and frames[-1].end.tensors == len(tensors)
    )
    assert all(len(f.chunk.data) <= 7 for f in frames) and _kinds(frames).count("chunk") > 2 * len(tensors)
    empty = next(i for i, f in enumerate(frames) if f.header.name == "empty")
    assert _kinds(frames)[empty + 1] == "header"  # an empty fp32 tensor sends no chunks
    out = decode_tensors(iter(frames), sum(q.nbytes for q in tensors.values()))
    assert list(out) == list(tensors)
    for name, q in tensors.items():
        got = out[name]
        assert (got.bits, got.shape, got.payload, got.scales) == (q.bits, q.shape, q.payload, q.scales), name
        assert torch.equal(dequantize(got), dequantize(q))


def test_empty_tensor_has_no_chunks_and_empty_stream_is_one_end_frame() -> None:
    frames = _frames({"e": quantize(torch.zeros(0, 3), 16)})
    assert _kinds(frames) == ["header", "end"]
    assert decode_tensors(frames, 0)["e"].shape == (0, 3)
    assert _kinds(_frames({})) == ["end"] and decode_tensors(_frames({}), 0) == {}


def test_default_chunks_are_one_mib() -> None:
    q = quantize(torch.zeros(CHUNK_BYTES // 4 + 1), 32)
    assert [len(f.chunk.data) for f in encode_tensors({"w": q}) if f.HasField("chunk")] == [CHUNK_BYTES, 4]


def test_bad_checksum() -> None:
    frames = _frames()
    i = _kinds(frames).index("chunk") + 1
    data = bytearray(frames[i].chunk.data)
    data[0] ^= 1
    frames[i].chunk.data = bytes(data)
    _fails(frames, INVALID, "tensor 'fp32': digest mismatch")


def test_truncated_streams() -> None:
    frames = _frames()
    _fails(frames[:-1], DATA_LOSS, "stream ended before End$")
    last_chunk = len(frames) - 2
    assert _kinds(frames)[last_chunk] == "chunk"
    _fails(frames[:last_chunk] + frames[-1:], DATA_LOSS, "End after only .* bytes of tensor 'scalar'")
    _fails(frames[:last_chunk], DATA_LOSS, "stream ended before End, after only .* of tensor 'scalar'")
    second_header = _kinds(frames).index("header", 1)
    dropped = frames[: second_header - 1] + frames[second_header:]
    _fails(dropped, INVALID, "header of 'fp16' after only .* of tensor 'fp32'")


def test_oversize_is_refused_at_the_header_before_any_chunk() -> None:
    tensors = _tensors()
    frames = _frames(tensors)
    consumed: list[tensor_pb2.TensorFrame] = []

    def stream() -> Iterator[tensor_pb2.TensorFrame]:
        for frame in frames:
            consumed.append(frame)
            yield frame

    with pytest.raises(WireError, match="tensor 'fp32': declares 60 bytes, over the 59 left") as info:
        decode_tensors(stream(), 59)
    assert info.value.code == EXHAUSTED and consumed == frames[:1]
    consumed.clear()
    second_header = _kinds(frames).index("header", 1)
    with pytest.raises(WireError, match="tensor 'fp16'") as info:  # the running total counts every tensor
        decode_tensors(stream(), tensors["fp32"].nbytes + tensors["fp16"].nbytes - 1)
    assert info.value.code == EXHAUSTED and consumed == frames[: second_header + 1]


def test_chunk_overflowing_the_declared_size() -> None:
    frames = _frames()
    second_header = _kinds(frames).index("header", 1)
    frames[second_header - 1].chunk.data += b"\0"
    _fails(frames, INVALID, "chunk of .* bytes after .* of 60 bytes of tensor 'fp32': empty or overflowing")
    frames = _frames()
    frames.insert(second_header, tensor_pb2.TensorFrame(chunk=tensor_pb2.Chunk(data=b"x")))
    _fails(frames, INVALID, "chunk of 1 bytes after tensor 'fp32' was complete")


def test_malformed_streams() -> None:
    one = {"w": quantize(torch.ones(2, 3), 8)}
    _fails(_frames(one)[:-1] + _frames(one), INVALID, "tensor 'w' sent twice")
    _fails(_frames(one) + _frames(one)[:1], INVALID, "header frame after End")
    _fails(_frames(one)[1:], INVALID, "chunk of .* bytes before any header")
    _fails(
        _frames(one)[:-1] + [tensor_pb2.TensorFrame(end=tensor_pb2.End(tensors=2))],
        INVALID,
        "End counts 2 tensors",
    )
    _fails([tensor_pb2.TensorFrame()], INVALID, "frame with no header, chunk or End set")
    frames = _frames(one)
    frames[0].header.name = ""
    _fails(frames, INVALID, "header without a name")
    frames = _frames(one)
    frames[1].chunk.data = b""
    _fails(frames, INVALID, "chunk of 0 bytes .*: empty")
    frames = _frames(one)
    frames[0].header.digest = b"\0" * 31
    _fails(frames, INVALID, "tensor 'w': its digest must be 32 bytes")


def test_wrong_bits_and_inconsistent_sizes() -> None:
    one = {"w": quantize(torch.ones(2, 3), 8)}  # 6 payload bytes + 2 channels x 2 scale bytes
    frames = _frames(one)
    frames[0].header.bits = 5
    _fails(frames, INVALID, "tensor 'w': unsupported bit-width 5")
    frames = _frames(one)
    frames[0].header.bits = 4
    _fails(frames, INVALID, r"tensor 'w': declares 6 payload \+ 4 scale bytes, but 4 bits .* need 3 \+ 4")
    frames = _frames(one)
    frames[0].header.scale_bytes = 2
    _fails(frames, INVALID, r"declares 6 payload \+ 2 scale bytes, but 8 bits and shape \(2, 3\) need 6 \+ 4")
    frames = _frames(one)
    frames[0].header.shape[:] = [3, 2]
    _fails(frames, INVALID, r"shape \(3, 2\) need 6 \+ 6")
    with pytest.raises(WireError, match="tensor 'bad'") as info:
        next(encode_tensors({"bad": QTensor(32, (2,), b"\0" * 7, b"")}))
    assert info.value.code == INVALID


def _parsed(data: bytes) -> tensor_pb2.TensorFrame | None:
    try:
        return tensor_pb2.TensorFrame.FromString(data)
    except DecodeError:
        return None


_HUGE = st.integers(0, 2**64 - 1)
_random_frames = st.one_of(
    st.builds(
        lambda name, bits, shape, p, s, sha: tensor_pb2.TensorFrame(
            header=tensor_pb2.TensorHeader(
                name=name, bits=bits, shape=shape, payload_bytes=p, scale_bytes=s, digest=sha
            )
        ),
        st.sampled_from(["", "a", "b"]),
        st.one_of(st.sampled_from([0, 4, 5, 8, 16, 32]), st.integers(0, 2**32 - 1)),
        st.lists(st.one_of(st.integers(0, 4), _HUGE), max_size=3),
        st.one_of(st.integers(0, 40), _HUGE),
        st.one_of(st.integers(0, 8), _HUGE),
        st.binary(max_size=33),
    ),
    st.builds(lambda d: tensor_pb2.TensorFrame(chunk=tensor_pb2.Chunk(data=d)), st.binary(max_size=12)),
    st.builds(lambda n: tensor_pb2.TensorFrame(end=tensor_pb2.End(tensors=n)), st.integers(0, 2**32 - 1)),
    st.just(tensor_pb2.TensorFrame()),
    st.binary(max_size=60).map(_parsed).filter(lambda f: f is not None),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.data(), st.integers(0, 400))
def test_fuzzed_streams_raise_only_wire_errors(data: st.DataObject, max_bytes: int) -> None:
    frames = _frames({"x": quantize(torch.arange(6.0).reshape(2, 3), 4), "y": quantize(torch.ones(3), 16)}, 3)
    # mutate a valid stream: replace, insert, drop or reorder frames
    for _ in range(data.draw(st.integers(0, 4))):
        op, i = data.draw(st.sampled_from("rid")), data.draw(st.integers(0, max(len(frames) - 1, 0)))
        if op == "d" and frames:
            del frames[i]
        else:
            frames[i : i + (op == "r")] = [data.draw(_random_frames)]
    if data.draw(st.booleans()):
        frames = data.draw(st.lists(_random_frames, max_size=8))
    try:
        out = decode_tensors(frames, max_bytes)
    except WireError as e:
        assert e.code in (INVALID, DATA_LOSS, EXHAUSTED)
    else:
        assert all(dequantize(q).shape == q.shape for q in out.values())


class _Receiver(coordinator_pb2_grpc.CoordinatorServicer):
    """Push decodes the tensor stream after the PushHeader;
    the reply's detail is the sha256 of all payloads.
    """

    def Push(
        self, request_iterator: Iterator[coordinator_pb2.PushFrame], context: grpc.ServicerContext
    ) -> coordinator_pb2.PushReply:
        header = next(request_iterator).header
        try:
            tensors = decode_tensors((frame.tensor for frame in request_iterator), 64 << 20)
        except WireError as e:
            context.abort(e.code, str(e))
        digest = hashlib.sha256()
        for q in tensors.values():
            digest.update(q.payload)
        return coordinator_pb2.PushReply(accepted=True, round=header.round, detail=digest.hexdigest())


@pytest.fixture
def coordinator() -> Iterator[coordinator_pb2_grpc.CoordinatorStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)
    finally:
        channel.close()
        server.stop(None)


def _push(
    tensors: dict[str, QTensor], frames: list[tensor_pb2.TensorFrame] | None = None
) -> Iterator[coordinator_pb2.PushFrame]:
    yield coordinator_pb2.PushFrame(header=coordinator_pb2.PushHeader(client_id="c", round=3))
    for frame in encode_tensors(tensors) if frames is None else frames:
        yield coordinator_pb2.PushFrame(tensor=frame)


def test_50mb_tensor_through_grpc_with_default_limits(
    coordinator: coordinator_pb2_grpc.CoordinatorStub,
) -> None:
    q = quantize(torch.randn(3200, 4096, generator=torch.Generator().manual_seed(1)), 32)
    assert q.nbytes == 50 << 20 and q.nbytes > 4 * CHUNK_BYTES
    reply = coordinator.Push(_push({"w": q}), timeout=120)
    assert reply.accepted and reply.round == 3 and reply.detail == hashlib.sha256(q.payload).hexdigest()


def test_wire_error_becomes_its_grpc_status(coordinator: coordinator_pb2_grpc.CoordinatorStub) -> None:
    frames = _frames()
    with pytest.raises(grpc.RpcError) as info:
        coordinator.Push(_push({}, frames[:-1]), timeout=30)
    assert info.value.code() == DATA_LOSS and "stream ended before End" in info.value.details()


def test_chunk_frames_decode_from_views_of_the_message_as_it_arrived() -> None:
    tensors = _tensors()
    messages = [f.SerializeToString() for f in encode_tensors(tensors, 5, into=coordinator_pb2.PushFrame)]
    views = [chunk_view(m) for m in messages]
    for message, view in zip(messages, views, strict=True):
        frame = coordinator_pb2.PushFrame.FromString(message).tensor
        if frame.WhichOneof("frame") == "chunk":
            assert isinstance(view, memoryview) and view.obj is message and bytes(view) == frame.chunk.data
        else:
            assert view is None  # headers and End are parsed as protobuf
    frames = [
        v if v is not None else coordinator_pb2.PushFrame.FromString(m).tensor
        for m, v in zip(messages, views)
    ]
    out = decode_tensors(frames, sum(q.nbytes for q in tensors.values()))
    assert {n: (q.payload, q.scales) for n, q in out.items()} == {
        n: (q.payload, q.scales) for n, q in tensors.items()
    }
    tampered = list(frames)
    i = next(i for i, f in enumerate(frames) if isinstance(f, memoryview))
    tampered[i] = memoryview(bytes([frames[i][0] ^ 1]) + bytes(frames[i][1:]))
    _fails(tampered, INVALID, "digest mismatch")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_a_chunk_view_is_what_protobuf_parses(message: bytes) -> None:
    view = chunk_view(message)
    if view is not None:  # then protobuf reads the same message as a chunk of exactly those bytes
        frame = coordinator_pb2.PullFrame.FromString(message)
        assert frame.tensor.WhichOneof("frame") == "chunk" and frame.tensor.chunk.data == bytes(view)
    framed = coordinator_pb2.PullFrame(tensor=tensor_pb2.TensorFrame(chunk=tensor_pb2.Chunk(data=message)))
    view = chunk_view(framed.SerializeToString())
    assert bytes(view) == message if message else view is None  # an empty chunk serializes no data field
    if message:  # built straight from the bytes, it is what protobuf serializes, from a view of them too
        assert chunk_message(message) == chunk_message(memoryview(message)) == framed.SerializeToString()
    assert chunk_view(framed.SerializeToString() + b"\x08\x01") is None  # one more field: not only a chunk


def test_chunk_messages_of_every_length_class_are_what_protobuf_serializes() -> None:
    for n in (1, 127, 128, 16_383, 16_384, CHUNK_BYTES, 3 * CHUNK_BYTES + 5):  # 1- to 3-byte varint lengths
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        framed = coordinator_pb2.PushFrame(tensor=tensor_pb2.TensorFrame(chunk=tensor_pb2.Chunk(data=data)))
        assert chunk_message(data) == framed.SerializeToString(), n


def test_a_tensor_is_hashed_once_per_side() -> None:
    q = quantize(torch.randn(4, 5, generator=torch.Generator().manual_seed(2)), 8)
    digest = tensor_digest(q)
    assert digest == blake3.blake3(q.payload + q.scales).digest() and tensor_digest(q) is digest
    (received,) = decode_tensors(_frames({"q": q}), q.nbytes).values()
    assert tensor_digest(received) == digest  # verified on arrival, remembered for the signature
    assert update_digest(["f"], {"q": received}) == update_digest(["f"], {"q": q})


def test_tiny_chunks_cost_no_more_memory_than_their_bytes() -> None:
    q = quantize(
        torch.randn(50_000, generator=torch.Generator().manual_seed(4)), 32
    )  # 200 KB in 1-byte chunks
    header, *_ = _frames({"q": q})
    blob = q.payload

    def frames() -> Iterator[tensor_pb2.TensorFrame | memoryview]:
        yield header
        yield from (memoryview(blob)[i : i + 1] for i in range(len(blob)))
        yield tensor_pb2.TensorFrame(end=tensor_pb2.End(tensors=1))

    tracemalloc.start()
    try:
        out = decode_tensors(frames(), q.nbytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["q"].payload == q.payload and peak < 4 * q.nbytes  # kept one view each: over 100 x


def test_read_ahead_keeps_order_raises_in_place_and_cancels_when_left() -> None:
    def stream(n: int, error: Exception | None = None) -> Iterator[int]:
        yield from range(n)
        if error is not None:
            raise error

    assert list(read_ahead(stream(50), depth=4)) == list(range(50))
    reader = read_ahead(stream(20, ConnectionError("reset")))
    assert [next(reader) for _ in range(20)] == list(range(20))  # every message before the error
    with pytest.raises(ConnectionError, match="reset"):
        next(reader)
    cancelled = []
    reader = read_ahead(stream(1000), lambda: cancelled.append(True))
    assert next(reader) == 0 and not cancelled
    reader.close()  # the reader stops early
    assert cancelled == [True]


def test_small_tensors_travel_batched_in_one_message_and_large_chunks_alone() -> None:
    small = {
        f"layer{i}.{kind}": quantize(torch.randn(16, 8), bits)
        for i in range(6)
        for kind, bits in (("weight", 4), ("bias", 32))
    }
    large = quantize(torch.randn(300_000), 32)  # 1.2 MB: two chunks, each a message of its own
    frames = list(
        encode_tensors({**small, "large": large}, into=coordinator_pb2.PullFrame, batch_bytes=1 << 20)
    )
    kinds = [f.tensor.WhichOneof("frame") for f in frames]
    assert kinds == ["batch", "chunk", "chunk", "batch"], kinds  # 12 tensors, a header, End: 4 messages
    assert len(frames[0].tensor.batch.frames) == 2 * len(small) + 1  # each small tensor: header + one chunk
    assert chunk_view(frames[1].SerializeToString()) is not None  # a large chunk still arrives as a view
    assert chunk_view(frames[0].SerializeToString()) is None
    out = decode_tensors((f.tensor for f in frames), 1 << 30)
    for name, q in {**small, "large": large}.items():
        assert (out[name].payload, out[name].scales) == (q.payload, q.scales), name
    unbatched = list(encode_tensors(small, into=coordinator_pb2.PullFrame))
    assert len(unbatched) == 3 * 6 + 2 * 6 + 1  # int4: header, payload, scales; fp32: header, payload
    nested = tensor_pb2.TensorFrame(batch=tensor_pb2.Batch(frames=[frames[0].tensor]))
    _fails([nested], INVALID, "batch frame inside a batch frame")
