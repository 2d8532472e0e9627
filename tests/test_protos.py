"""The committed stubs match what grpcio-tools generates from protos/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date_with_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stubs up to date" in result.stdout


def test_the_check_ignores_generator_version_stamps_but_not_the_contract() -> None:
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        from generate import comparable  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    committed = (ROOT / "protos" / "tensorgate" / "v1" / "inference_pb2_grpc.py").read_text()
    newer_tools = committed.replace(
        "GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9.99.9"
    )
    assert newer_tools != committed
    assert comparable(newer_tools) == comparable(committed)
    renamed = committed.replace("/tensorgate.v1.Inference/Predict", "/tensorgate.v1.Inference/P")
    assert comparable(renamed) != comparable(committed)
    pb2 = (ROOT / "protos" / "tensorgate" / "v1" / "inference_pb2.py").read_text()
    assert "ValidateProtobufRuntimeVersion" in pb2
    assert comparable(
        pb2.replace("# Protobuf Python Version: ", "# Protobuf Python Version: 9")
    ) == comparable(pb2)
