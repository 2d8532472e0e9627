"""Generates the Python stubs for every .proto under protos/ with grpcio-tools.

    python protos/generate.py          # rewrite the stubs beside the .proto files
    python protos/generate.py --check  # exit 1 if the committed stubs differ from fresh ones

The stubs are committed so that installing tensorgate needs no code generation; the check (run by
the tests) keeps them in step with the .proto files. It compares what the .proto files decide,
not the generator's own version stamps (GRPC_GENERATED_VERSION, the protobuf gencode version): a
fresh machine may resolve a newer patch release of grpcio-tools than the one that wrote the
committed stubs, and the code it writes is the same. The runtime floors those stamps imply are
pinned in pyproject.toml (grpcio, protobuf) and the tested versions in constraints.txt.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# The generator's version stamps, which say who wrote a stub, not what it contains.
_STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"ValidateProtobufRuntimeVersion\(\s*([^,]+),\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"),
)


def comparable(text: str) -> str:
    """A stub's text with the generator's version stamps blanked out."""
    for stamp in _STAMPS:
        text = stamp.sub("<version>", text)
    return text


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
            if not committed.exists() or comparable(fresh.read_text()) != comparable(
                committed.read_text()
            ):
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
