"""Device profiles and the policy that gives each client a variant (density, bits) that fits it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from fedmoe.compress.quant import BITS
from fedmoe.worker import Variant, round_masks, variant_bytes

GIB = 2**30
TRAINING_BYTES_PER_PARAM = 20  # latent fp32 weight, its gradient, two AdamW moments, the step's temporaries
QUANTIZED_BYTES_PER_PARAM = 8  # below 32 bits: the fake-quantized weight of the forward, error feedback


MAX_DENSITIES = 8  # densities a profile may offer
MAX_PROFILE_NAME = 64


@dataclass(frozen=True)
class DeviceProfile:
    """What a client announces: memory budget, bit-width, densities it accepts (largest first),
    relative speed.

    Raises ValueError for a profile no client has: a long name, no memory, unknown bits, more than
    `MAX_DENSITIES` densities or one outside (0, 1], a speed that is not a positive number. Densities are kept
    to 6 decimals, as variants carry them (a density sent as float32, 0.3 -> 0.30000001, is 0.3 again).
    """

    name: str
    memory_bytes: int
    bits: int = 32
    densities: tuple[float, ...] = (1.0, 0.5, 0.25)
    speed: float = 1.0

    def __post_init__(self) -> None:
        if len(self.name) > MAX_PROFILE_NAME:
            raise ValueError(
                f"a profile name has at most {MAX_PROFILE_NAME} characters, got {len(self.name)}"
            )
        if not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be a positive number of bytes, got {self.memory_bytes!r}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if not 1 <= len(self.densities) <= MAX_DENSITIES:
            raise ValueError(f"a profile offers 1 to {MAX_DENSITIES} densities, got {len(self.densities)}")
        if not all(math.isfinite(d) and 0 < d <= 1 for d in self.densities):
            raise ValueError(f"densities must be in (0, 1], got {list(self.densities)[:MAX_DENSITIES]}")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"speed must be a positive number, got {self.speed}")
        object.__setattr__(self, "densities", tuple(round(float(d), 6) for d in self.densities))


PROFILES: dict[str, DeviceProfile] = {
    "fp32": DeviceProfile("fp32", 16 * GIB, 32, (1.0,)),
    "fp16": DeviceProfile("fp16", 8 * GIB, 16, (1.0,)),
    "int8": DeviceProfile("int8", 4 * GIB, 8, (1.0,)),
    "int4": DeviceProfile("int4", 2 * GIB, 4, (1.0,)),
    "int4-p50": DeviceProfile("int4-p50", 1 * GIB, 4, (0.5,)),
    "fp32-p25": DeviceProfile("fp32-p25", 1 * GIB, 32, (0.25,)),
    "laptop": DeviceProfile("laptop", 1 * GIB, 4, (1.0, 0.5, 0.25)),
}

MIXES: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "mixed": ("fp32", "int8", "int4-p50", "fp32-p25"),
    "int4-p50": ("int4-p50",),
}


def parse_profiles(text: str) -> tuple[str, ...]:
    """A mix name ("mixed") or profile names joined by commas ("fp32,int4-p50") -> profile names; "" -> ()."""
    names = MIXES.get(text) or tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise ValueError(
            f"unknown profile(s) {', '.join(unknown)}; known: {', '.join(PROFILES)}; "
            f"mixes: {', '.join(MIXES)}"
        )
    return names


def training_bytes(model: nn.Module, variant: Variant) -> int:
    """Bytes a client needs to train its sub-model: the stored weights plus fp32 training state per held
    parameter (a width sub-model holds and trains only its slices). Activations, which depend on the batch,
    are left out: `fedmoe memory` measures the whole round (tests/test_submodels.py keeps the two close)."""
    masks = round_masks(model, variant, 0, 0)
    held = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in model.named_parameters())
    per_param = TRAINING_BYTES_PER_PARAM + (QUANTIZED_BYTES_PER_PARAM if variant.bits < 32 else 0)
    return variant_bytes(model, variant, masks)["weights"] + per_param * held


def assign_variant(profile: DeviceProfile, path_model: nn.Module, scheme: str = "rolling") -> Variant:
    """The densest variant the profile accepts whose training memory fits its budget."""
    for density in sorted(profile.densities, reverse=True):
        variant = Variant(profile.bits, density, scheme)
        if training_bytes(path_model, variant) <= profile.memory_bytes:
            return variant
    smallest = Variant(profile.bits, min(profile.densities), scheme)
    raise ValueError(
        f"profile {profile.name!r} ({profile.memory_bytes} bytes) cannot hold this path: "
        f"even density {smallest.density} needs {training_bytes(path_model, smallest)} bytes"
    )
