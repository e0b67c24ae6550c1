"""Checkpoints as a safetensors weights file plus a JSON manifest,
written atomically (the manifest is the commit point).

With `keep_previous`, a save keeps the generation before it (manifest.prev.json and its weights), and
`load_latest` falls back to it when the newest is torn or corrupt.

`save_records` stores named byte strings in one file, the records back to back and then their manifest,
committed by its rename; the caller's BLAKE3 digests check the records (`load_records`): bytes that arrived
with a verified digest (`fedmoe.wire.tensor_digest`) are written without a second pass. A `Spool` is such a
file written as its bytes arrive, committed by `save_records` without writing them again.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors.torch import load_file, save_file

FORMAT = "fedmoe-checkpoint/1"
RECORDS_FORMAT = "fedmoe-records/3"  # /2 was a directory of a data file and a manifest; /1 used sha256
RECORDS_MAGIC = b"fmrecs03"  # a records file's last bytes
_TRAILER = struct.Struct("<Q8s")  # after the records and the manifest: the manifest's length, the magic
MANIFEST = "manifest.json"
PREVIOUS = "manifest.prev.json"
RESERVED = frozenset({"format", "weights", "sha256", "tensors"})
RECORDS_RESERVED = frozenset({"format", "records"})
_TMP_PREFIX = ".tmp-"
WRITEBACK_BYTES = 8 << 20  # a spool asks the disk to start writing every this many bytes written
GATHER_BYTES = 64 << 10  # a spool's writes smaller than this gather in memory first


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


def _commit(directory: Path, write: Callable[[Path], str], sync: bool = True) -> str:
    """Run write(tmp) on a temp path in directory, fsync the file (with `sync`), rename it to the name write
    returned, fsync the directory (with `sync`)."""
    tmp = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        name = write(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, directory / name)
        if sync:
            _fsync_dir(directory)
        return name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _writable(
    directory: str | Path, manifest: Mapping[str, Any], reserved: frozenset[str], kind: str, sync: bool = True
) -> tuple[Path, list[Path]]:
    """The directory, made if missing (with `sync`, its entry in its parent made durable), once the manifest
    is known to serialise and to use no reserved key; and the directories made, outermost last."""
    clash = reserved.intersection(manifest)
    if clash:
        raise ValueError(f"manifest keys {sorted(clash)} are reserved for the {kind} format")
    json.dumps(dict(manifest))  # raises TypeError before anything is written
    directory = Path(directory)
    if directory.is_dir():  # one look, not one per ancestor
        return directory, []
    made = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for new in reversed(made) if sync else ():  # durable in its parent before anything in it is
        _fsync_dir(new.parent)
    return directory, made


class GroupSync:
    """Makes the files of one file system durable in groups: writers that finish at about the same time
    share one flush of the whole file system (Linux's syncfs) instead of an fsync of each file and
    directory, so that a burst of N stored updates costs a few flushes, not 5 N fsyncs. `flush` returns once
    a flush that began after it was called has completed: everything written before the call is durable.
    Where syncfs is missing, each path is fsynced on its own.

    `root`: a directory on the file system the writers write to.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.done = threading.Condition()
        self.requested = 0  # flushes asked for, numbered
        self.covered = 0  # the highest number a completed flush covers
        self.flushing = False

    def flush(self, paths: Sequence[Path]) -> None:
        """Make `paths` (files and directories written, created or renamed into) durable."""
        if _SYNCFS is None:
            for path in paths:
                _fsync_dir(path)  # opens read-only: a file too
            return
        with self.done:
            self.requested += 1
            ticket = self.requested
            while self.covered < ticket:
                if self.flushing:  # a flush is under way; it may have begun before this call: wait for it
                    self.done.wait()
                    continue
                self.flushing, covers = True, self.requested
                self.done.release()
                try:
                    _syncfs(self.root)
                finally:
                    self.done.acquire()
                    self.flushing = False
                    self.done.notify_all()
                self.covered = max(self.covered, covers)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs, where there is one (Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None


_SYNCFS = _load_syncfs()


def _load_sync_file_range() -> Callable[..., int] | None:
    """libc's sync_file_range, where there is one (Linux)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages, without waiting for them


class Spool:
    """A records file (see `save_records`) written as its bytes arrive, in `directory` under a temporary name
    (`remove_spools` removes those a stopped process left): `write` appends, asking the disk to start
    writing every `WRITEBACK_BYTES` (where the system can: Linux), so that the flush that makes it durable
    finds little left to write; `view` maps what was written (read-only, no copy); `save_records(...,
    spool=...)` commits it; `discard` removes it (a no-op once committed).

    Writes smaller than `GATHER_BYTES` gather in memory until they fill that much, so that a small upload
    costs no file until it is committed (its bytes are then written at once). Thread-safe: a write under way
    on another thread finishes before `discard` closes the file.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        self.fd: int | None = None  # opened when the first bytes are written to it
        self.gathered: bytes | bytearray = bytearray()  # bytes not written to the file yet
        self.written = self.started = 0  # bytes written to the file, and asked to be on disk
        self.closed = False
        self.lock = threading.Lock()

    @property
    def size(self) -> int:
        """Bytes taken so far, in the file or gathered."""
        return self.written + len(self.gathered)

    def write(self, data: bytes | memoryview) -> None:
        """Append `data` (ValueError once discarded or committed)."""
        with self.lock:
            self._check_open()
            if len(data) < GATHER_BYTES:
                self.gathered += data
                if len(self.gathered) >= GATHER_BYTES:
                    self._write_gathered()
                return
            self._write_gathered()
            self._write(data)

    def view(self) -> memoryview:
        """What was written, read-only: mapped from the file, or the gathered bytes when that is all."""
        with self.lock:
            self._check_open()
            if self.fd is None:
                self.gathered = bytes(self.gathered)  # never resized while viewed
                return memoryview(self.gathered)
            self._write_gathered()
            if not self.size:
                return memoryview(b"")
            return memoryview(mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ))

    def commit(self, path: Path, sync: bool = True) -> None:
        """Write what is gathered, fsync the file (with `sync`), rename it to `path` (on the same file system)
        and close it: it is the caller's now."""
        with self.lock:
            self._check_open()
            self._write_gathered(always=True)
            if sync:
                os.fsync(self.fd)
            os.replace(self.path, path)
            self._close()

    def discard(self) -> None:
        """Close and remove the file, unless it was committed."""
        with self.lock:
            if not self.closed:
                self._close()
                self.path.unlink(missing_ok=True)

    @staticmethod
    def remove_spools(directory: str | os.PathLike) -> None:
        """Remove the spools a stopped process left in `directory` (none of them was committed)."""
        for leftover in Path(directory).glob(f"{_TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"spool {self.path.name} was discarded or committed")

    def _write_gathered(self, always: bool = False) -> None:
        """Write the gathered bytes to the file (with `always`, open the file even when there are none)."""
        if self.gathered or always:
            gathered, self.gathered = self.gathered, bytearray()
            self._write(gathered)

    def _write(self, data: bytes | memoryview) -> None:
        if self.fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        view = memoryview(data).cast("B")
        self.written += len(view)
        while view:
            view = view[os.write(self.fd, view) :]
        if _SYNC_FILE_RANGE is not None and self.written - self.started >= WRITEBACK_BYTES:
            _SYNC_FILE_RANGE(self.fd, self.started, self.written - self.started, _SYNC_FILE_RANGE_WRITE)
            self.started = self.written

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.closed = True


def _syncfs(directory: Path) -> None:
    """Flush the file system that holds `directory` to its disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs: {os.strerror(error)}", str(directory))
    finally:
        os.close(fd)


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
    directory, _ = _writable(directory, manifest, RESERVED, "checkpoint")
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
        tmp.write_text(json.dumps(full), encoding="utf-8")
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
    manifest = _read_manifest(path, FORMAT)
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


def _read_manifest(path: Path, form: str) -> dict[str, Any]:
    """The manifest at path, of format `form`; CheckpointError when missing, unreadable or of another."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint manifest {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != form:
        raise CheckpointError(f"{path}: not a {form} manifest")
    return manifest


def save_records(
    path: str | os.PathLike,
    records: Mapping[str, Sequence[bytes]],
    digests: Mapping[str, bytes],
    manifest: Mapping[str, Any],
    group: GroupSync | None = None,
    spool: Spool | None = None,
) -> Path:
    """Atomically write named byte records and a manifest to the file `path`: the records back to back (each
    given as parts, or already written in `spool`, which must be in path's directory), then the manifest
    (JSON, with each record's offset, length and BLAKE3 digest), its length and `RECORDS_MAGIC`. The
    rename to `path` is the commit point.

    `digests` holds each record's BLAKE3 digest (of its parts joined), as the caller knows it: a received
    tensor's, verified on arrival, costs no second pass over its bytes. `load_records` checks them.

    With `group`, nothing is fsynced on its own: the file, its directory and the directories made for it
    become durable in one `GroupSync.flush` shared with the writers of the same moment, before this returns.
    A crash before then may leave a file whose records are torn, which `load_records` refuses.
    """
    sync, path = group is None, Path(path)
    directory, made = _writable(path.parent, manifest, RECORDS_RESERVED, "records", sync)
    entries, offset = {}, 0
    for name, parts in records.items():
        size = sum(len(part) for part in parts)
        entries[name] = {"offset": offset, "bytes": size, "blake3": digests[name].hex()}
        offset += size
    own = spool is None  # written here, and removed here if the commit fails
    if own:
        spool = Spool(directory)
    elif spool.directory != directory:
        raise ValueError(f"a spool in {spool.directory} cannot commit records to {directory}")
    try:
        for parts in records.values() if own else ():
            for part in parts:
                spool.write(part)
        if spool.size != offset:
            raise ValueError(f"the spool holds {spool.size} bytes, the records {offset}")
        text = json.dumps({**manifest, "format": RECORDS_FORMAT, "records": entries}).encode()
        spool.write(text + _TRAILER.pack(len(text), RECORDS_MAGIC))
        spool.commit(path, sync)  # the commit point
    except BaseException:
        if own:
            spool.discard()
        raise
    if group is None:
        _fsync_dir(directory)
    else:
        group.flush([path, directory, *(d.parent for d in made)])
    return path


def load_records(path: str | os.PathLike) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Load and verify what `save_records` wrote to the file `path`: (records, whole manifest)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read the records file {path}: {e}") from None
    end = len(data) - _TRAILER.size
    length, magic = _TRAILER.unpack_from(data, end) if end >= 0 else (0, b"")
    if magic != RECORDS_MAGIC or length > end:
        raise CheckpointError(f"{path} is torn or corrupt: it does not end as a {RECORDS_FORMAT} file")
    try:
        manifest = json.loads(data[end - length : end])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is torn or corrupt: its manifest does not read: {e}") from None
    entries = manifest.get("records") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or manifest.get("format") != RECORDS_FORMAT:
        raise CheckpointError(f"{path}: not a {RECORDS_FORMAT} manifest")
    records, torn = {}, []
    try:
        for record, entry in entries.items():
            start, size = int(entry["offset"]), int(entry["bytes"])
            blob = data[start : start + size]
            inside = 0 <= start and 0 <= size and start + size <= end - length  # not into the manifest
            if not inside or blake3.blake3(blob).hexdigest() != entry["blake3"]:
                torn.append(record)
            records[record] = blob
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad record entry: {e}") from None
    if torn:
        raise CheckpointError(f"records {torn[:8]} of {path} are torn or corrupt (digest mismatch)")
    return records, manifest
