"""[sequence] in a model's config.toml: what it declares is checked when the config is read, and
against the engine when the model loads; every mistake is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tensorgate.server.backends import load_instance
from tensorgate.server.bundled import MODELS_DIR as ENGINES
from tensorgate.server.config import ConfigError
from tensorgate.server.model_config import ModelConfig

BUNDLED = (ENGINES / "silero_vad" / "config.toml").read_text()


def _model(voice_repository: Path, tmp_path: Path, config: str) -> Path:
    folder = tmp_path / "silero_vad"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(voice_repository / "silero_vad" / "model.onnx", folder / "model.onnx")
    (folder / "config.toml").write_text(config)
    return folder


def test_the_bundled_config_declares_silero_state(voice_repository: Path) -> None:
    config = ModelConfig.load(voice_repository / "silero_vad")
    assert config.sequence is not None
    state = {s.input: s for s in config.sequence.state}
    assert (state["state"].output, state["state"].shape, state["state"].batch_axis) == (
        "stateN",
        (2, 128),
        1,
    )
    assert (state["context"].output, state["context"].shape) == ("context_out", (64,))
    [sr] = config.sequence.constants
    assert (sr.input, sr.datatype, sr.shape, sr.value) == ("sr", "INT64", (), 16000)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("batch_axis = 1", "batch_axis = 5"), "batch_axis 5 is out of range for shape [2, 128]"),
        (('output = "stateN"', 'outputs = "stateN"'), "unknown keys ['outputs']"),
        (("max_sequences = 1000", "max_sequences = 0"), "'sequence.max_sequences' must be an"),
        (('datatype = "INT64"', 'datatype = "INT65"'), "datatype' must be one of"),
        (("shape = [64]", "shape = [0]"), "shape must be a list of sizes >= 1"),
        (('input = "context"', 'input = "state"'), "names input 'state' more than once"),
        (("idle_timeout_ms = 30000", "idle_timeout = 30000"), "unknown [sequence] keys"),
    ],
)
def test_mistakes_in_sequence_are_named(
    voice_repository: Path, tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    assert change[0] in BUNDLED
    folder = _model(voice_repository, tmp_path, BUNDLED.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as error:
        ModelConfig.load(folder)
    assert message in str(error.value)
    assert str(folder / "config.toml") in str(error.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('output = "stateN"', 'output = "state_next"'),
            "[sequence] names output 'state_next', which the engine does not have; its outputs "
            "are: probability, stateN, context_out",
        ),
        (
            ("shape = [2, 128]", "shape = [2, 64]"),
            "[sequence] declares input 'state' as FP32 [2,-1,64] (batch axis 1), but the engine "
            "has FP32 [2,-1,128]",
        ),
        (
            ("batch_axis = 1", "batch_axis = 0"),
            "[sequence] declares input 'state' as FP32 [-1,2,128] (batch axis 0), but the engine "
            "has FP32 [2,-1,128]",
        ),
        (
            ('datatype = "INT64"', 'datatype = "INT32"'),
            "[sequence] declares input 'sr' as INT32 [], but the engine has INT64 []",
        ),
    ],
)
def test_a_declaration_that_does_not_fit_the_engine_is_named_at_load(
    voice_repository: Path, tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    assert change[0] in BUNDLED
    folder = _model(voice_repository, tmp_path, BUNDLED.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as error:
        load_instance(ModelConfig.load(folder), 0)
    assert str(error.value) == f"model 'silero_vad': {message}"


def test_the_adapter_moves_batch_axes_and_supplies_constants(voice_repository: Path) -> None:
    backend = load_instance(ModelConfig.load(voice_repository / "silero_vad"), 0)
    shapes = {spec.name: spec.shape for spec in backend.inputs}
    assert shapes == {"audio": (-1, 512), "context": (-1, 64), "state": (-1, 2, 128)}
    assert {spec.name: spec.shape for spec in backend.outputs}["stateN"] == (-1, 2, 128)
    rows = 3
    feed = {
        "audio": np.zeros((rows, 512), np.float32),
        "context": np.zeros((rows, 64), np.float32),
        "state": np.zeros((rows, 2, 128), np.float32),
    }
    out = backend.execute(feed, ["probability", "stateN", "context_out"])
    assert out["probability"].shape == (rows, 1)
    assert out["stateN"].shape == (rows, 2, 128) and out["context_out"].shape == (rows, 64)
    backend.close()
