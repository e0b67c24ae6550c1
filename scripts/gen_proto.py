"""Generate the gRPC Python stubs in fedmoe/v1/ from proto/fedmoe/v1/*.proto.

Run from anywhere: `python scripts/gen_proto.py [--out DIR]`. The stubs land in DIR/fedmoe/v1/ (DIR defaults
to the repository root) and import each other as `fedmoe.v1.x_pb2`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
INIT_DOC = '"""Generated gRPC stubs; regenerate with `python scripts/gen_proto.py`."""\n'


def proto_files() -> list[Path]:
    """The .proto files of the fedmoe.v1 package, sorted."""
    return sorted((PROTO_ROOT / "fedmoe" / "v1").glob("*.proto"))


def generate(out: Path) -> None:
    """Write the stubs and the package's __init__.py under out/fedmoe/v1/."""
    package = out / "fedmoe" / "v1"
    package.mkdir(parents=True, exist_ok=True)
    include = resources.files("grpc_tools") / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    (package / "__init__.py").write_text(INIT_DOC)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT, help="where fedmoe/v1/ goes (default: the repository root)"
    )
    generate(parser.parse_args(argv).out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
