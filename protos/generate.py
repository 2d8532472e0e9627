"""Generates the Python stubs for every .proto under protos/ with grpcio-tools.

    python protos/generate.py          # rewrite the stubs beside the .proto files
    python protos/generate.py --check  # exit 1 if the committed stubs differ from fresh ones

The stubs are committed so that installing tensorgate needs no code generation; the check (run by
the tests) keeps them in step with the .proto files.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Writes stubs for every .proto into out_dir (mirroring the package folders); returns them."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = []
    for proto in protos:
        stem = proto.relative_to(PROTO_ROOT).with_suffix("")
        generated += [out_dir / f"{stem}{suffix}" for suffix in SUFFIXES]
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    check = parser.parse_args().check
    if not check:
        files = generate(PROTO_ROOT)
        print(f"wrote {len(files)} files under {PROTO_ROOT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            committed = PROTO_ROOT / fresh.relative_to(tmp)
            if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                stale.append(str(committed.relative_to(PROTO_ROOT.parent)))
    if stale:
        print(
            "stubs out of date with protos/ (run: python protos/generate.py):", *stale, sep="\n  "
        )
        return 1
    print("stubs up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
