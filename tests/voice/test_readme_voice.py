"""The README's voice section runs as printed: the Python and tritonclient snippets, the
`tensorgate vad` commands, and its [sequence] example is the bundled config's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tensorgate.server.bundled import MODELS_DIR as ENGINES
from tensorgate.server.model_config import ModelConfig
from tests.harness import ServerThread
from tests.test_readme import README, _block
from tests.voice.audio import compose

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Voice pipelines: stateful sequences"


def test_the_python_sequence_snippet_runs(voice_server: ServerThread) -> None:
    code = _block(SECTION, "python").replace("localhost:50051", voice_server.target)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 1)"


def test_the_tritonclient_sequence_snippet_runs(
    voice_server: ServerThread, triton_python: Path
) -> None:
    code = _block('print(out["probability"].shape)', "python")
    assert "tritonclient" in code
    done = subprocess.run(
        [str(triton_python), "-c", code.replace("localhost:50051", voice_server.target)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 1)"


def test_the_vad_commands_run(voice_server: ServerThread, tmp_path: Path) -> None:
    compose([0.5, "Hello, this is a voice pipeline.", 0.5]).write(tmp_path / "hello16k.wav")
    commands = [
        line.split("  #")[0].strip()
        for line in _block(SECTION, "sh").splitlines()
        if line.startswith("tensorgate vad")
    ]
    assert len(commands) == 2
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "tensorgate", *command.split()[1:], "--target",
             voice_server.target],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr)
        [line] = done.stdout.splitlines()
        if "--json" in command:
            assert set(json.loads(line)) == {"start_s", "end_s"}
        else:
            assert re.fullmatch(r"speech +\d+\.\d{3} s – +\d+\.\d{3} s \(\d+\.\d\d s\)", line)


def test_the_sequence_config_example_is_the_bundled_one(tmp_path: Path) -> None:
    example = _block("A model declares its state in `config.toml`", "toml")
    folder = tmp_path / "silero_vad"
    folder.mkdir()
    (folder / "config.toml").write_text('backend = "onnxruntime"\n' + example)
    assert ModelConfig.load(folder).sequence == ModelConfig.load(ENGINES / "silero_vad").sequence
    assert SECTION in README
