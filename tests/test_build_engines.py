"""build_engines.py (tensorgate build) makes the bundled models reproducibly, and they load in
ONNX Runtime."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tensorgate.server.bundled import MODELS_DIR

ROOT = Path(__file__).resolve().parents[1]


def _build(out: Path) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "build_engines.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "[1/3] mlp" in result.stdout and "[3/3] silero_vad" in result.stdout
    assert "[2/3] mlp_python" in result.stdout and "(config.toml, model.py)" in result.stdout
    return {
        name: hashlib.sha256((out / name / "model.onnx").read_bytes()).hexdigest()
        for name in ("mlp", "silero_vad")
    }


def test_build_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    assert _build(tmp_path / "a") == _build(tmp_path / "b")
    for name in ("mlp", "mlp_python", "silero_vad"):
        assert (tmp_path / "a" / name / "config.toml").read_text() == (
            MODELS_DIR / name / "config.toml"
        ).read_text()


def test_a_config_already_in_the_repository_is_kept_unless_forced(tmp_path: Path) -> None:
    _build(tmp_path)
    edited = tmp_path / "mlp" / "config.toml"
    edited.write_text(edited.read_text().replace("instance_count = 2", "instance_count = 1"))
    _build(tmp_path)
    assert "instance_count = 1" in edited.read_text()  # an operator's edit survives a rebuild
    result = subprocess.run(
        [sys.executable, str(ROOT / "build_engines.py"), "--out", str(tmp_path), "--force"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert edited.read_text() == (MODELS_DIR / "mlp" / "config.toml").read_text()


def test_built_mlp_runs_in_onnxruntime(tmp_path: Path) -> None:
    _build(tmp_path)
    session = ort.InferenceSession(str(tmp_path / "mlp" / "model.onnx"))
    logits, probabilities = session.run(None, {"input": np.ones((3, 256), np.float32)})
    assert logits.shape == (3, 16)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_tensorrt_build_without_the_builder_fails_in_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "build_engines.py"), "--out", str(tmp_path), "--tensorrt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stdout.splitlines() if line.startswith("build_engines:")]
    assert len(lines) == 1
    assert "cannot build TensorRT plans: the TensorRT builder is not installed" in lines[0]
    assert "The ONNX models were built." in lines[0]
    assert (tmp_path / "mlp" / "model.onnx").exists()  # the CPU default still builds


def test_fp16_variant_for_strongly_typed_tensorrt_computes_the_same_model() -> None:
    import onnx

    from tensorgate.server.bundled.graphs import float16_variant, mlp

    variant = float16_variant(mlp())
    assert {i.type.tensor_type.elem_type for i in variant.graph.input} == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float16)
    (half,) = ort.InferenceSession(variant.SerializeToString()).run(["logits"], {"input": x})
    (full,) = ort.InferenceSession(mlp().SerializeToString()).run(
        ["logits"], {"input": x.astype(np.float32)}
    )
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, atol=2e-2)
