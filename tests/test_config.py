"""Model config files: defaults, and each bad value named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorgate.server.config import ConfigError
from tensorgate.server.model_config import ModelConfig
from tests.harness import write_config


def test_defaults_and_units(tmp_path: Path) -> None:
    write_config(
        tmp_path / "m", backend="onnxruntime", max_queue_delay_ms=5, preferred_batch_sizes=[16, 4]
    )
    config = ModelConfig.load(tmp_path / "m")
    assert config.name == "m" and config.backend == "onnxruntime"
    assert config.max_queue_delay_s == pytest.approx(0.005)
    assert config.preferred_batch_sizes == (4, 16)
    assert (config.max_batch_size, config.queue_capacity, config.instance_count) == (32, 1024, 1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "'backend' must name a backend"),
        (
            {"backend": "onnxruntime", "max_batch_size": 0},
            "'max_batch_size' must be an integer >= 1",
        ),
        ({"backend": "onnxruntime", "instance_count": "2"}, "'instance_count' must be an integer"),
        (
            {"backend": "onnxruntime", "max_queue_delay_ms": -1},
            "'max_queue_delay_ms' must be a number >= 0",
        ),
        (
            {"backend": "onnxruntime", "max_batch_sise": 8},
            "unknown keys 'max_batch_sise' (did you mean 'max_batch_size'?)",
        ),
        (
            {"backend": "onnxruntime", "max_batch_size": 8, "preferred_batch_sizes": [16]},
            "preferred_batch_sizes [16] exceed max_batch_size",
        ),
        (
            {"backend": "onnx", "onnxruntime": {"intra_op_threads": 1}},
            "unknown backend 'onnx' (did you mean 'onnxruntime'?); known backends: onnxruntime",
        ),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, settings: dict[str, object], message: str
) -> None:
    write_config(tmp_path / "m", **settings)
    with pytest.raises(ConfigError) as error:
        ModelConfig.load(tmp_path / "m")
    assert message in str(error.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.toml does not exist"):
        ModelConfig.load(tmp_path)
