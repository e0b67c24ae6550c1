"""Device profiles and the policy that gives each client a variant (density, bits) that fits it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedmoe.worker import Variant, round_masks, variant_bytes

GIB = 2**30
TRAINING_BYTES_PER_PARAM = 16  # latent fp32 weight, its gradient and two AdamW moments


@dataclass(frozen=True)
class DeviceProfile:
    """What a client announces: memory budget, bit-width, densities it accepts (largest first),
    relative speed.
    """

    name: str
    memory_bytes: int
    bits: int = 32
    densities: tuple[float, ...] = (1.0, 0.5, 0.25)
    speed: float = 1.0


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
    parameter.
    """
    masks = round_masks(model, variant, 0, 0)
    held = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in model.named_parameters())
    return variant_bytes(model, variant, masks)["weights"] + TRAINING_BYTES_PER_PARAM * held


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
