"""Quantization of tensors for the wire: per-channel symmetric int8/int4, fp16, fp32,
plus fake-quant and error feedback.

Wire form of a `QTensor` (all little-endian): 32 bits sends the float32 values, 16 bits the IEEE float16
values (clamped to +-65504), both without scales. 8 and 4 bits send one float16 scale per channel (channels
run along dim 0 for tensors of 2+ dims; a 0-d or 1-d tensor is one channel) and the integers
q = clamp(round(t / scale), -qmax, qmax) in row-major order: one int8 per value at 8 bits (qmax 127); at 4
bits (qmax 7) two's-complement nibbles, value i in byte i // 2, low nibble for even i, high nibble for odd i,
a zero high nibble padding an odd count. Rounding is half to even; an all-zero channel gets scale 1; a channel
whose max|t| / qmax exceeds the float16 range saturates at scale 65504.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedmoe.compress.prune import held_values, scatter_held

BITS = (32, 16, 8, 4)
_QMAX = {8: 127, 4: 7}
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal): the floor for a nonzero channel's scale


@dataclass(frozen=True, eq=False)
class QTensor:
    """A tensor in wire form: bit-width, shape, quantized payload bytes and float16 per-channel scale
    bytes.
    """

    bits: int
    shape: tuple[int, ...]
    payload: bytes | memoryview  # a received tensor's is a view of its buffer
    scales: bytes | memoryview

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: payload plus scales."""
        return len(self.payload) + len(self.scales)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit-width {bits!r}; expected one of {BITS}")


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(channels, values per channel) of a tensor shape."""
    channels = shape[0] if len(shape) >= 2 else 1
    return channels, math.prod(shape) // channels if channels else 0


def _lengths(shape: tuple[int, ...], bits: int) -> tuple[int, int]:
    """(payload bytes, scale bytes) of a tensor of this shape at this bit-width."""
    n = math.prod(shape)
    if bits == 32:
        return 4 * n, 0
    if bits == 16:
        return 2 * n, 0
    return (n if bits == 8 else (n + 1) // 2), 2 * _matrix(shape)[0]


def _to_half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def _rounded(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values as a float32 (channels, k) matrix, float16 scales) of t, on t's device."""
    qmax = _QMAX[bits]
    x = t.detach().to(torch.float32).reshape(_matrix(tuple(t.shape)))
    absmax = x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0])
    scales = (absmax / qmax).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)
    scales = torch.where(absmax > 0, scales, torch.ones_like(scales))
    return torch.round(x / scales.to(torch.float32).unsqueeze(1)).clamp(-qmax, qmax), scales


def wire_bytes(shape: tuple[int, ...], bits: int) -> int:
    """The `nbytes` that `quantize` gives a tensor of this shape at this bit-width."""
    _check_bits(bits)
    return sum(_lengths(tuple(shape), bits))


def pack_int4(values: torch.Tensor) -> bytes:
    """Pack integers in [-8, 7] two per byte (low nibble first), padding an odd count with a zero nibble."""
    if values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"pack_int4 expects an integer tensor, got {values.dtype}")
    v = values.detach().cpu().reshape(-1).to(torch.int16)
    if v.numel() and (int(v.min()) < -8 or int(v.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    nibbles = (v & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()


def unpack_int4(data: bytes, n: int) -> torch.Tensor:
    """The n int8 values in [-8, 7] that `pack_int4` packed into data."""
    if n < 0 or len(data) != (n + 1) // 2:
        raise ValueError(f"{n} int4 values need {(n + 1) // 2} bytes, got {len(data)}")
    packed = np.frombuffer(data, dtype=np.uint8)
    nibbles = np.empty(2 * packed.size, dtype=np.int8)
    nibbles[0::2] = packed & 0xF
    nibbles[1::2] = packed >> 4
    return torch.from_numpy((nibbles[:n] ^ 8) - 8)


def quantize(t: torch.Tensor, bits: int) -> QTensor:
    """Wire form of t at this bit-width (see the module docstring)."""
    _check_bits(bits)
    x = t.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot quantize a tensor that contains NaN or Inf values")
    shape = tuple(x.shape)
    if bits == 32:
        return QTensor(bits, shape, x.numpy().astype("<f4", copy=False).tobytes(), b"")
    if bits == 16:
        return QTensor(bits, shape, _to_half(x).numpy().astype("<f2", copy=False).tobytes(), b"")
    q, scales = _rounded(x, bits)
    q = q.to(torch.int8)
    payload = q.numpy().tobytes() if bits == 8 else pack_int4(q)
    return QTensor(bits, shape, payload, scales.numpy().astype("<f2").tobytes())


def dequantize(q: QTensor) -> torch.Tensor:
    """Float32 tensor of shape q.shape from its wire form, after checking the byte counts."""
    _check_bits(q.bits)
    shape = tuple(q.shape)
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"invalid shape {shape}")
    payload_len, scales_len = _lengths(shape, q.bits)
    if len(q.payload) != payload_len:
        raise ValueError(
            f"{q.bits}-bit payload of shape {shape} must be {payload_len} bytes, got {len(q.payload)}"
        )
    if len(q.scales) != scales_len:
        raise ValueError(
            f"{q.bits}-bit scales of shape {shape} must be {scales_len} bytes, got {len(q.scales)}"
        )
    if q.bits == 32:
        return torch.from_numpy(np.frombuffer(q.payload, dtype="<f4").astype(np.float32)).reshape(shape)
    if q.bits == 16:
        return torch.from_numpy(np.frombuffer(q.payload, dtype="<f2").astype(np.float32)).reshape(shape)
    scales = np.frombuffer(q.scales, dtype="<f2").astype(np.float32)
    if not np.all(np.isfinite(scales) & (scales > 0)):
        raise ValueError("scales must be finite and positive")
    n = math.prod(shape)
    ints = np.frombuffer(q.payload, dtype=np.int8) if q.bits == 8 else unpack_int4(q.payload, n).numpy()
    values = torch.from_numpy(ints.astype(np.float32)).reshape(_matrix(shape))
    return (values * torch.from_numpy(scales).unsqueeze(1)).reshape(shape)


def fake_quantize(t: torch.Tensor, bits: int) -> torch.Tensor:
    """dequantize(quantize(t, bits)) computed on t's device, with a straight-through gradient."""
    _check_bits(bits)
    if bits == 32:
        return t
    if bits == 16:
        rounded = _to_half(t.detach()).to(t.dtype)
    else:
        q, scales = _rounded(t, bits)
        rounded = (q * scales.to(torch.float32).unsqueeze(1)).reshape(t.shape).to(t.dtype)
    return rounded + (t - t.detach())  # forward: exactly `rounded`; backward: identity


class ErrorFeedback:
    """Client-side error feedback: each tensor's quantization error is added to its next update before
    quantizing.
    """

    def __init__(self, bits: int) -> None:
        _check_bits(bits)
        self.bits = bits
        self._residuals: dict[str, torch.Tensor] = {}

    def compress(self, name: str, t: torch.Tensor, mask: torch.Tensor | None = None) -> QTensor:
        """Quantize the held part (under `mask`) of t plus the residual kept for name;
        keep the new error as that residual.

        Residuals have the shape of t: under a mask (full-shaped t), a coordinate not held this round keeps
        its residual until it is held again; a width sub-model's worker moves its held residuals with its
        units. At 32 bits nothing is lost and nothing is kept.
        """
        total = t.detach().to("cpu", torch.float32)
        if self.bits == 32:
            return quantize(held_values(total, mask), 32)
        residual = self._residuals.get(name)
        if residual is not None:
            if residual.shape != total.shape:
                raise ValueError(
                    f"{name!r} has shape {tuple(total.shape)}, its residual {tuple(residual.shape)}"
                )
            total = total + residual
        q = quantize(held_values(total, mask), self.bits)
        self._residuals[name] = total - scatter_held(dequantize(q), mask, total.shape)
        return q

    def residual(self, name: str) -> torch.Tensor | None:
        """The residual kept for name (None before its first compress)."""
        return self._residuals.get(name)

    @property
    def residuals(self) -> dict[str, torch.Tensor]:
        """Every residual kept, by tensor name (to save a client's state)."""
        return dict(self._residuals)

    def restore(self, residuals: dict[str, torch.Tensor]) -> None:
        """Take over saved residuals (see `residuals`)."""
        self._residuals = {name: t.to(torch.float32) for name, t in residuals.items()}
