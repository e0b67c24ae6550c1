"""Checkpoint round-trips, atomic replacement, and detection of corrupt or torn checkpoints."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import blake3
import pytest
import torch

from fedmoe import checkpoint
from fedmoe.checkpoint import (
    CheckpointError,
    Spool,
    load_checkpoint,
    load_records,
    save_checkpoint,
    save_records,
)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f32 = torch.randn(3, 5, generator=g)
    f32[0, 0] = float("nan")
    f32[0, 1] = -0.0
    return {
        "f32": f32,
        "i64": torch.randint(-(2**62), 2**62, (7,), generator=g, dtype=torch.int64),
        "u8": torch.randint(0, 256, (2, 2, 2), generator=g, dtype=torch.uint8),
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(seed + 0.5, dtype=torch.float64),
        "strided": torch.arange(20, dtype=torch.int32).reshape(4, 5).t(),  # non-contiguous input
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert _bits(got[name]) == _bits(t), name


def _weights(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("weights-*.safetensors"))


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_round_trip_bit_identical_with_caller_manifest(tmp_path: Path) -> None:
    want = _tensors(0)
    d = tmp_path / "new" / "ckpt"
    assert save_checkpoint(d, want, {"step": 3, "path": "p0", "lr": [0.1, 0.2]}) == d
    got, manifest = load_checkpoint(d)
    _assert_identical(got, want)
    assert manifest["step"] == 3 and manifest["path"] == "p0" and manifest["lr"] == [0.1, 0.2]
    assert manifest["format"] == "fedmoe-checkpoint/1"
    assert manifest["weights"] == _weights(d)[0]
    assert manifest["tensors"]["bf16"] == {"dtype": "torch.bfloat16", "shape": [4, 3]}
    assert manifest["tensors"]["scalar"]["shape"] == []
    assert manifest == json.loads((d / "manifest.json").read_text())
    assert not [p for p in d.iterdir() if p.name.startswith(".tmp-")]


def test_save_twice_keeps_one_weights_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _tensors(0), {"step": 1})
    first = _weights(tmp_path)
    save_checkpoint(tmp_path, _tensors(1), {"step": 2})
    assert len(_weights(tmp_path)) == 1 and _weights(tmp_path) != first
    got, manifest = load_checkpoint(tmp_path)
    assert manifest["weights"] == _weights(tmp_path)[0] and manifest["step"] == 2
    _assert_identical(got, _tensors(1))


def test_flipped_byte_raises(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _tensors(0), {})
    w = tmp_path / _weights(tmp_path)[0]
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=w.name):
        load_checkpoint(tmp_path)


def test_truncated_weights_raises(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _tensors(0), {})
    w = tmp_path / _weights(tmp_path)[0]
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=w.name):
        load_checkpoint(tmp_path)


def test_missing_weights_raises(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _tensors(0), {})
    w = tmp_path / _weights(tmp_path)[0]
    w.unlink()
    with pytest.raises(CheckpointError, match=w.name):
        load_checkpoint(tmp_path)


def test_missing_or_corrupt_manifest_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _tensors(0), {})
    (tmp_path / "manifest.json").write_text('{"format": "fedmoe-checkpoint/1", "weig')
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(tmp_path)


def test_torn_write_leftovers_are_ignored_then_cleaned(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _tensors(0), {"step": 1})
    good = _weights(tmp_path)[0]
    (tmp_path / ".tmp-deadbeef").write_bytes(b"half a safetensors hea")
    (tmp_path / "weights-0123456789abcdef.safetensors").write_bytes(b"orphan, never committed")
    got, manifest = load_checkpoint(tmp_path)
    _assert_identical(got, _tensors(0))
    assert manifest["weights"] == good and manifest["step"] == 1
    save_checkpoint(tmp_path, _tensors(1), {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["manifest.json", *_weights(tmp_path)])
    assert len(_weights(tmp_path)) == 1


@pytest.mark.parametrize("key", ["format", "weights", "sha256", "tensors"])
def test_reserved_key_raises_and_writes_nothing(tmp_path: Path, key: str) -> None:
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=key):
        save_checkpoint(fresh, _tensors(0), {key: "x"})
    assert not fresh.exists()
    save_checkpoint(tmp_path / "c", _tensors(0), {"step": 1})
    before = _snapshot(tmp_path / "c")
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "c", _tensors(1), {key: "x"})
    assert _snapshot(tmp_path / "c") == before


def test_unserialisable_manifest_raises_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "fresh", _tensors(0), {"obj": object()})
    assert not (tmp_path / "fresh").exists()
    save_checkpoint(tmp_path, _tensors(0), {"step": 1})
    before = _snapshot(tmp_path)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, _tensors(1), {"t": torch.zeros(1)})
    assert _snapshot(tmp_path) == before
    got, manifest = load_checkpoint(tmp_path)
    _assert_identical(got, _tensors(0))
    assert manifest["step"] == 1


def test_crash_before_manifest_rename_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, _tensors(0), {"step": 1})
    old_manifest = (tmp_path / "manifest.json").read_bytes()
    real_replace = os.replace

    def crashing_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if Path(dst).name == "manifest.json":
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, _tensors(1), {"step": 2})
    monkeypatch.undo()
    assert len(_weights(tmp_path)) == 2  # the new weights landed; the manifest did not
    assert (tmp_path / "manifest.json").read_bytes() == old_manifest
    got, manifest = load_checkpoint(tmp_path)
    _assert_identical(got, _tensors(0))
    assert manifest["step"] == 1
    save_checkpoint(tmp_path, _tensors(2), {"step": 3})  # the next good save removes the orphan
    assert len(_weights(tmp_path)) == 1
    _assert_identical(load_checkpoint(tmp_path)[0], _tensors(2))


def test_records_round_trip_checked_by_the_digests_given(tmp_path: Path) -> None:
    records = {"a": (b"payload", b"scales"), "empty": (b"", b""), "b": (os.urandom(1000),)}
    digests = {name: blake3.blake3(b"".join(parts)).digest() for name, parts in records.items()}
    path = tmp_path / "r0-w.update"
    save_records(path, records, digests, {"kind": "upload"})
    save_records(path, records, digests, {"kind": "upload", "again": True})  # replaces it
    got, manifest = load_records(path)
    assert got == {name: b"".join(parts) for name, parts in records.items()}
    assert manifest["kind"] == "upload" and manifest["again"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # one file, no leftovers
    flipped = bytearray(path.read_bytes())
    flipped[3] ^= 1  # inside record "a"
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"records \['a'\] .* torn or corrupt"):
        load_records(path)
    for cut in (10, len(flipped) - 3):  # cut in the records, or in the manifest's length
        path.write_bytes(bytes(flipped[:cut]))
        with pytest.raises(CheckpointError, match="torn or corrupt"):
            load_records(path)
    path.unlink()
    with pytest.raises(CheckpointError, match="cannot read the records file"):
        load_records(path)
    with pytest.raises(CheckpointError, match="cannot read the records file"):  # a directory
        load_records(save_checkpoint(tmp_path / "other", _tensors(0), {}))
    with pytest.raises(ValueError, match="reserved"):
        save_records(tmp_path / "new", records, digests, {"records": 1})
    assert not (tmp_path / "new").exists()


def test_a_spool_written_as_bytes_arrive_is_committed_as_the_records_without_a_second_write(
    tmp_path, monkeypatch
):
    records = {"a": (os.urandom(5 << 20), b"scales"), "empty": (b"", b""), "b": (os.urandom(4 << 20),)}
    digests = {name: blake3.blake3(b"".join(parts)).digest() for name, parts in records.items()}
    started = []
    real = checkpoint._SYNC_FILE_RANGE
    monkeypatch.setattr(checkpoint, "_SYNC_FILE_RANGE", lambda fd, at, n, flags: started.append((at, n)) or 0)
    pending = tmp_path / "pending"
    spool = Spool(pending)
    for parts in records.values():
        for part in parts:
            for at in range(0, len(part), 1 << 20):  # as a stream's chunks arrive
                spool.write(memoryview(part)[at : at + (1 << 20)])
    size = sum(len(part) for parts in records.values() for part in parts)
    if real is not None:  # the disk was asked to start writing as the bytes came, each byte once
        assert started == [(0, checkpoint.WRITEBACK_BYTES + 6)]
    assert bytes(spool.view()) == b"".join(part for parts in records.values() for part in parts)

    # the spool becomes the records file: its records are not written again
    path = pending / "r0-w.update"
    save_records(path, records, digests, {"kind": "upload"}, spool=spool)
    got, _ = load_records(path)
    assert got == {name: b"".join(parts) for name, parts in records.items()}
    assert [p.name for p in pending.iterdir()] == [path.name]  # renamed, not copied
    assert size < path.stat().st_size < size + 4096  # the records once, and the manifest
    spool.discard()  # a committed spool is the records': discarding it removes nothing
    assert load_records(path)[0] == got
    with pytest.raises(ValueError, match="discarded or committed"):
        spool.write(b"late")
    # small writes gather in memory: no file until the spool is committed
    small = Spool(pending)
    small.write(b"payload")
    small.write(memoryview(b"scales"))
    assert [p.name for p in pending.iterdir()] == [path.name] and bytes(small.view()) == b"payloadscales"
    save_records(pending / "small", {"a": (b"payload", b"scales")}, {"a": digests["a"]}, {}, spool=small)
    with pytest.raises(CheckpointError, match="torn or corrupt"):  # the digest given is another record's
        load_records(pending / "small")
    assert (pending / "small").read_bytes().startswith(b"payloadscales{")
    # a spool that does not hold the records, or elsewhere, is refused; one discarded leaves nothing behind
    short = Spool(pending)
    short.write(b"payload")
    with pytest.raises(ValueError, match="the spool holds 7 bytes, the records"):
        save_records(pending / "other", records, digests, {"kind": "upload"}, spool=short)
    with pytest.raises(ValueError, match="cannot commit records to"):
        save_records(tmp_path / "other", records, digests, {"kind": "upload"}, spool=short)
    short.write(os.urandom(checkpoint.GATHER_BYTES))  # now in a file
    assert len(list(pending.iterdir())) == 3
    short.discard()
    assert sorted(p.name for p in pending.iterdir()) == [path.name, "small"]
    # records whose commit fails leave no file behind
    def failing(self, path, sync=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Spool, "commit", failing)
    with pytest.raises(OSError, match="No space"):
        save_records(pending / "full", {"a": (os.urandom(1 << 20),)}, {"a": digests["a"]}, {})
    monkeypatch.undo()
    assert sorted(p.name for p in pending.iterdir()) == [path.name, "small"]
    # spools a stopped process left are removed
    Spool(pending).write(os.urandom(checkpoint.GATHER_BYTES))
    Spool.remove_spools(pending)
    assert sorted(p.name for p in pending.iterdir()) == [path.name, "small"]


def test_a_directory_made_for_a_checkpoint_is_made_durable_in_its_parent(tmp_path, monkeypatch):
    synced = []
    real = checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda d: synced.append(Path(d)) or real(d))
    path = tmp_path / "state" / "pending" / "r0-w.update"
    save_records(path, {"t": (b"ab",)}, {"t": blake3.blake3(b"ab").digest()}, {})
    # "state" and "pending" were made: each one's entry is synced in its parent, before the records
    assert synced[:2] == [tmp_path, tmp_path / "state"]
    assert synced[2:] == [tmp_path / "state" / "pending"]  # the records file's entry in it
    synced.clear()
    save_records(path, {"t": (b"cd",)}, {"t": blake3.blake3(b"cd").digest()}, {})
    assert synced == [tmp_path / "state" / "pending"]  # nothing new to make durable but the file


def test_records_stored_together_share_one_flush_and_each_waits_for_a_flush_begun_after_its_call(
    tmp_path, monkeypatch
):
    flushes: list[tuple[float, float]] = []
    real = checkpoint._syncfs

    def flush(directory: Path) -> None:
        started = time.monotonic()
        real(directory)
        time.sleep(0.05)  # a disk that takes its time: writers pile up meanwhile
        flushes.append((started, time.monotonic()))

    fsyncs = []
    monkeypatch.setattr(checkpoint, "_syncfs", flush)
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    group = checkpoint.GroupSync(tmp_path)
    calls: list[tuple[float, float]] = []

    def store(i: int) -> None:
        data = os.urandom(1000)
        called = time.monotonic()
        save_records(
            tmp_path / "pending" / f"r0-w{i}.update",
            {"t": (data,)},
            {"t": blake3.blake3(data).digest()},
            {},
            group,
        )
        calls.append((called, time.monotonic()))

    threads = [threading.Thread(target=store, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not fsyncs  # nothing fsynced on its own
    assert len(calls) == 24 and 1 <= len(flushes) < 12, flushes  # writers of the same moment share flushes
    for called, returned in calls:  # durable on return: a whole flush ran between the call and the return
        assert any(called <= began and ended <= returned for began, ended in flushes)
    for i in range(24):
        assert load_records(tmp_path / "pending" / f"r0-w{i}.update")[0]["t"]


def test_without_syncfs_a_group_fsyncs_each_path_it_is_given(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(checkpoint, "_SYNCFS", None)
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda d: synced.append(Path(d)))
    path = tmp_path / "pending" / "r0-w.update"
    save_records(
        path, {"t": (b"ab",)}, {"t": blake3.blake3(b"ab").digest()}, {}, checkpoint.GroupSync(tmp_path)
    )
    assert set(synced) == {path, tmp_path / "pending", tmp_path}
