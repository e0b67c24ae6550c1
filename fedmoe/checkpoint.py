"""Checkpoints as a safetensors weights file plus a JSON manifest,
written atomically (the manifest is the commit point).

With `keep_previous`, a save keeps the generation before it (manifest.prev.json and its weights), and
`load_latest` falls back to it when the newest is torn or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "fedmoe-checkpoint/1"
MANIFEST = "manifest.json"
PREVIOUS = "manifest.prev.json"
RESERVED = frozenset({"format", "weights", "sha256", "tensors"})
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, corrupt, or does not match its manifest."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in fixed-size chunks


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(directory: Path, write: Callable[[Path], str]) -> str:
    """Run write(tmp) on a temp path in directory, fsync the file, rename it to the name write returned."""
    tmp = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        name = write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
        _fsync_dir(directory)
        return name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(
    directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    manifest: Mapping[str, Any],
    keep_previous: bool = False,
) -> Path:
    """Atomically write tensors and manifest to directory,
    then remove superseded weights and stray temp files.

    `keep_previous`: the checkpoint being replaced stays as the previous generation (see `load_latest`).
    """
    clash = RESERVED.intersection(manifest)
    if clash:
        raise ValueError(f"manifest keys {sorted(clash)} are reserved for the checkpoint format")
    json.dumps(dict(manifest))  # raises TypeError before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    digest = ""

    def write_weights(tmp: Path) -> str:
        nonlocal digest
        save_file(cpu, str(tmp))
        digest = _sha256(tmp)
        return f"weights-{digest[:16]}.safetensors"

    weights = _commit(directory, write_weights)
    full = {
        **manifest,
        "format": FORMAT,
        "weights": weights,
        "sha256": digest,
        "tensors": {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in cpu.items()},
    }

    def write_manifest(tmp: Path) -> str:
        tmp.write_text(json.dumps(full, indent=2), encoding="utf-8")
        return MANIFEST

    current = directory / MANIFEST
    keep = {weights}
    if keep_previous and current.exists():
        previous = current.read_bytes()

        def write_previous(tmp: Path) -> str:
            tmp.write_bytes(previous)
            return PREVIOUS

        _commit(directory, write_previous)
        try:
            keep.add(json.loads(previous).get("weights", ""))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # a torn current manifest: the previous generation is what it is
    _commit(directory, write_manifest)  # the commit point
    for path in directory.iterdir():
        stale = (
            path.name.startswith("weights-") and path.name.endswith(".safetensors") and path.name not in keep
        )
        if stale or path.name.startswith(_TMP_PREFIX):
            path.unlink(missing_ok=True)
    return directory


def load_latest(
    directory: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], CheckpointError | None]:
    """The newest readable generation in directory: (tensors, manifest, None), or the previous one when the
    newest is torn or corrupt: (tensors, manifest, why the newest was not read). Raises CheckpointError when
    neither reads."""
    try:
        return (*load_checkpoint(directory), None)
    except CheckpointError as newest:
        if not (Path(directory) / PREVIOUS).exists():
            raise
        try:
            return (*load_checkpoint(directory, PREVIOUS), newest)
        except CheckpointError as previous:
            raise CheckpointError(f"{newest}; and the previous generation: {previous}") from None


def load_checkpoint(
    directory: str | os.PathLike, manifest_name: str = MANIFEST
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify the checkpoint in directory; returns (tensors, whole manifest)."""
    path = Path(directory) / manifest_name
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint manifest {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    name = manifest.get("weights")
    if not isinstance(name, str) or Path(name).name != name or not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{path}: bad 'weights' or 'tensors' entry")
    weights = path.parent / name
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights} named by {path}")
    digest = _sha256(weights)
    if digest != manifest.get("sha256"):
        raise CheckpointError(
            f"sha256 mismatch for {weights}: manifest {manifest.get('sha256')}, file {digest}"
        )
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # the hash matched, so this is a writer bug rather than disk damage
        raise CheckpointError(f"cannot read weights file {weights}: {e}") from e
    found = {k: {"dtype": str(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()}
    if found != manifest["tensors"]:
        raise CheckpointError(f"tensors in {weights} do not match the names/dtypes/shapes in {path}")
    return tensors, manifest
