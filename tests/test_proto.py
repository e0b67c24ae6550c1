"""The committed stubs in fedmoe/v1/ are exactly what scripts/gen_proto.py makes from
proto/fedmoe/v1/*.proto.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _files(package: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(package.iterdir()) if p.is_file()}


def test_committed_stubs_match_regenerated(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True
    )
    fresh, committed = _files(tmp_path / "fedmoe" / "v1"), _files(ROOT / "fedmoe" / "v1")
    assert sorted(fresh) == sorted(committed), (
        "regenerate with `python scripts/gen_proto.py` and commit the result"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, (
        f"{stale} differ from the generated stubs: regenerate with `python scripts/gen_proto.py`"
    )


def test_stubs_import_and_describe_the_services() -> None:
    from fedmoe.v1 import coordinator_pb2, coordinator_pb2_grpc, inference_pb2_grpc, tensor_pb2

    frame = coordinator_pb2.PushFrame(tensor=tensor_pb2.TensorFrame(end=tensor_pb2.End(tensors=2)))
    assert frame.tensor.end.tensors == 2
    assert hasattr(coordinator_pb2_grpc, "CoordinatorServicer") and hasattr(
        inference_pb2_grpc, "InferenceStub"
    )
