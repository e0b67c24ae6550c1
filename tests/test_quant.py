import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn
from torch.nn.utils import parametrize

from fedmoe.compress.quant import (
    BITS,
    ErrorFeedback,
    QTensor,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    unpack_int4,
    wire_bytes,
)
from fedmoe.worker import Restrict

QMAX = {8: 127, 4: 7}
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def test_int8_by_hand():
    q = quantize(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]), 8)
    # scale 2/127 = 0.015748... rounds to float16 0.0157470703125; 1/s = 63.504 -> 64, 0.5/s = 31.75 -> 32
    assert struct.unpack("<2e", q.scales) == (0.0157470703125, 1.0)
    assert q.payload == bytes([64, 256 - 127, 32, 0, 0, 0])
    assert q.nbytes == 6 + 4
    expected = torch.tensor(
        [[64 * 0.0157470703125, -127 * 0.0157470703125, 32 * 0.0157470703125], [0.0, 0.0, 0.0]]
    )
    assert torch.equal(dequantize(q), expected)


def test_int4_by_hand():
    q = quantize(torch.tensor([[0.7, -0.35, 0.1]]), 4)
    # scale 0.1 -> float16 0.0999755859375; values 7.0017 -> 7, -3.5009 -> -4, 1.0002 -> 1
    assert struct.unpack("<e", q.scales) == (0.0999755859375,)
    assert q.payload == bytes([0xC7, 0x01])
    assert dequantize(q).tolist() == [[7 * 0.0999755859375, -4 * 0.0999755859375, 0.0999755859375]]


def test_pack_int4_by_hand_and_back():
    values = torch.tensor([1, -1, 7, -8, 3])
    assert pack_int4(values) == bytes([0xF1, 0x87, 0x03])
    assert pack_int4(values[:4]) == bytes([0xF1, 0x87])
    assert pack_int4(torch.tensor([], dtype=torch.int8)) == b""
    assert unpack_int4(bytes([0xF1, 0x87, 0x03]), 5).tolist() == [1, -1, 7, -8, 3]
    everything = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:-1]
    out = unpack_int4(pack_int4(everything), everything.numel())
    assert out.dtype == torch.int8 and torch.equal(out, everything)


def test_pack_int4_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8]))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_int4(bytes([0x11]), 3)


@pytest.mark.parametrize(
    "shape, channels", [((7,), 1), ((8,), 1), ((3, 5), 3), ((4, 6), 4), ((2, 3, 3), 2), ((), 1)]
)
def test_int4_size_is_half_a_byte_per_value_plus_scales(shape, channels):
    n = math.prod(shape)
    q = quantize(torch.randn(shape), 4)
    assert len(q.payload) == (n + 1) // 2 and len(q.scales) == 2 * channels
    assert q.nbytes == wire_bytes(shape, 4) == (n + 1) // 2 + 2 * channels


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from(BITS))
def test_wire_bytes_matches_quantize(shape, bits):
    assert wire_bytes(shape, bits) == quantize(torch.randn(shape), bits).nbytes


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_scale(bits):
    t = torch.randn(16, 33) * torch.logspace(-3, 3, 16).unsqueeze(1)
    q = quantize(t, bits)
    scales = torch.from_numpy(np.frombuffer(q.scales, dtype="<f2").astype(np.float32))
    err = (dequantize(q) - t).abs()
    assert torch.all(err <= scales.unsqueeze(1) / 2 * (1 + 1e-6))
    assert torch.all(err.amax(dim=1) > 0)  # it really was rounded


def test_32_bit_is_bit_exact_and_16_bit_is_half():
    t = torch.randn(5, 7, dtype=torch.float64).float()
    q = quantize(t, 32)
    assert q.scales == b"" and q.payload == t.numpy().astype("<f4").tobytes()
    assert torch.equal(dequantize(q), t)
    half = quantize(torch.tensor([1e6, -1e6, 1.0 / 3]), 16)
    assert half.scales == b"" and len(half.payload) == 6
    assert dequantize(half).tolist() == [65504.0, -65504.0, float(np.float16(1.0 / 3))]


@pytest.mark.parametrize("bits", BITS)
def test_edge_shapes_round_trip(bits):
    for t in (torch.tensor(-3.0), torch.zeros(0), torch.zeros(3, 0), torch.zeros(0, 4), torch.zeros(2, 2)):
        out = dequantize(quantize(t, bits))
        assert out.dtype == torch.float32 and out.shape == t.shape
        assert torch.allclose(out, t, rtol=1e-3)  # a lone value lands within fp16 rounding of the scale


def test_dequantize_validates_wire_bytes():
    q = quantize(torch.randn(3, 5), 4)
    with pytest.raises(ValueError, match="payload .* must be 8 bytes, got 7"):
        dequantize(QTensor(4, q.shape, q.payload[:-1], q.scales))
    with pytest.raises(ValueError, match="scales .* must be 6 bytes, got 4"):
        dequantize(QTensor(4, q.shape, q.payload, q.scales[:4]))
    with pytest.raises(ValueError, match="payload"):
        dequantize(QTensor(32, (3,), b"\x00" * 11, b""))
    with pytest.raises(ValueError, match="scales"):
        dequantize(QTensor(16, (3,), b"\x00" * 6, b"\x00\x3c"))
    with pytest.raises(ValueError, match="finite and positive"):
        dequantize(QTensor(8, (2,), b"\x01\x02", struct.pack("<e", float("inf"))))
    with pytest.raises(ValueError, match="bit-width"):
        dequantize(QTensor(2, (2,), b"", b""))


def test_rejects_bad_bits_and_non_finite_input():
    with pytest.raises(ValueError, match="bit-width"):
        quantize(torch.ones(2), 5)
    with pytest.raises(ValueError, match="bit-width"):
        wire_bytes((2,), 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([float("inf")]), 32)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_matches_wire_and_passes_gradient_straight_through(bits):
    t = (torch.randn(6, 10) * 3).requires_grad_()
    out = fake_quantize(t, bits)
    assert torch.equal(out.detach(), dequantize(quantize(t, bits)))
    upstream = torch.randn(6, 10)
    out.backward(upstream)
    assert torch.equal(t.grad, upstream)
    bias = torch.randn(10, requires_grad=True)
    assert torch.equal(fake_quantize(bias, bits).detach(), dequantize(quantize(bias, bits)))


def test_fake_quantize_32_is_identity():
    t = torch.randn(3)
    assert fake_quantize(t, 32) is t


def test_qat_with_4_bit_parametrization():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(4, 8).T + 0.1 * torch.randn(256, 4)

    def train(quantized: bool) -> tuple[float, nn.Linear]:
        torch.manual_seed(1)
        lin = nn.Linear(8, 4)
        if quantized:
            parametrize.register_parametrization(lin, "weight", Restrict(None, 4))
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            nn.functional.mse_loss(lin(x), y).backward()
            opt.step()
        with torch.no_grad():
            return nn.functional.mse_loss(lin(x), y).item(), lin

    fp32_loss, _ = train(False)
    qat_loss, lin = train(True)
    assert fp32_loss < 0.02
    assert qat_loss < fp32_loss + 0.02 * y.var().item()  # target variance ~7: within 2% of it
    assert all(len(row.unique()) <= 15 for row in lin.weight)
    assert torch.equal(lin.weight, dequantize(quantize(lin.parametrizations.weight.original, 4)))


def test_error_feedback_does_not_drift():
    torch.manual_seed(0)
    t = torch.randn(4, 9)
    steps = 200
    ef = ErrorFeedback(4)
    sent = torch.zeros(4, 9, dtype=torch.float64)
    bound = t.abs().max().item() / 7  # one 4-bit step at the scale of the input
    for k in range(1, steps + 1):
        q = ef.compress("w", t)
        sent += dequantize(q).double()
        assert (sent - k * t.double()).abs().max().item() <= bound
    assert torch.allclose(ef.residual("w").double(), steps * t.double() - sent, atol=1e-4)
    plain_error = (steps * dequantize(quantize(t, 4)).double() - steps * t.double()).abs().max().item()
    assert plain_error > 20 * bound  # without feedback the error grows linearly with the number of rounds
    fresh = ErrorFeedback(4)
    assert fresh.residual("w") is None
    assert torch.equal(dequantize(fresh.compress("w", t)), dequantize(quantize(t, 4)))
    with pytest.raises(ValueError, match="shape"):
        ef.compress("w", torch.zeros(3))


@settings(max_examples=80, deadline=None)
@given(
    arr=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-1e5, 1e5, width=32),
    ),
    bits=st.sampled_from([8, 4]),
)
def test_round_trip_error_bound_property(arr, bits):
    t = torch.from_numpy(arr)
    out = dequantize(quantize(t, bits))
    assert out.shape == t.shape and out.dtype == torch.float32
    qmax = QMAX[bits]
    absmax = rows(t).abs().amax(dim=1, keepdim=True).double()
    # fp16 rounding of the scale: relative 2**-11 for normal scales, absolute 2**-25 for subnormal ones
    bound = absmax / qmax / 2 * (1 + 2**-10) + qmax * 2**-25
    assert torch.all((rows(out) - rows(t)).abs().double() <= bound)
