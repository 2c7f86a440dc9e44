"""Generates the protobuf/gRPC modules and their type stubs from ``proto/tiality.proto``.

Run as ``make proto``. ``tests/test_proto_current.py`` regenerates into a temporary folder and fails
when the committed files differ, so the wire format and the code can never drift apart.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = Path(__file__).resolve().parent
GENERATED = ("tiality_pb2.py", "tiality_pb2.pyi", "tiality_pb2_grpc.py", "tiality_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Runs protoc (grpc_tools) with the mypy-protobuf plugins; returns the generated files."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    # Map proto/ onto the package path so the generated imports read `from tiality_cli.net._proto import ...`.
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--proto_path=tiality_cli/net/_proto={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        "tiality_cli/net/_proto/tiality.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/tiality.proto")
    return [out_root / "tiality_cli" / "net" / "_proto" / name for name in GENERATED]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PACKAGE_DIR / path.name)
            print(f"wrote tiality_cli/net/_proto/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
