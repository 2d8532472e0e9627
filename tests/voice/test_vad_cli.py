"""`tensorgate vad FILE.wav`: streams espeak-ng speech with known silences to silero_vad and
prints the speech segments, which must match where the speech was placed within 100 ms."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.harness import ServerThread
from tests.voice.audio import Recording, compose

ROOT = Path(__file__).resolve().parents[2]
TENSORGATE = [sys.executable, "-m", "tensorgate"]


def _vad(target: str, wav: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TENSORGATE, "vad", str(wav), "--target", target, *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _assert_matches(found: list[dict[str, float]], placed: tuple[tuple[float, float], ...]) -> None:
    assert len(found) == len(placed), (found, placed)
    for segment, (start, end) in zip(found, placed, strict=True):
        assert abs(segment["start_s"] - start) <= 0.1, (segment, start)
        assert abs(segment["end_s"] - end) <= 0.1, (segment, end)


def test_segments_match_the_placed_speech(
    voice_server: ServerThread, recording: Recording, tmp_path: Path
) -> None:
    wav = recording.write(tmp_path / "speech.wav")
    done = _vad(voice_server.target, wav, "--speed", "0", "--json")
    assert done.returncode == 0, done.stderr
    _assert_matches([json.loads(line) for line in done.stdout.splitlines()], recording.speech)


@pytest.mark.parametrize("seed", [1, 2])
def test_other_sentences_and_silences(
    voice_server: ServerThread, tmp_path: Path, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Please hold while your call is transferred.",
        "One, two, three, four, five.",
    ]
    parts: list[str | float] = [float(rng.uniform(0.5, 1.5))]
    for sentence in rng.permutation(sentences):
        parts += [str(sentence), float(rng.uniform(0.8, 1.6))]
    recording = compose(parts, seed=seed)
    done = _vad(voice_server.target, recording.write(tmp_path / "other.wav"), "--speed", "0",
                "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    _assert_matches([json.loads(line) for line in done.stdout.splitlines()], recording.speech)


def test_real_time_pace_prints_segments_as_they_close(
    voice_server: ServerThread, tmp_path: Path
) -> None:
    recording = compose([0.5, "Hello there.", 3.0, "Goodbye.", 0.5])
    wav = recording.write(tmp_path / "paced.wav")
    duration_s = len(recording.samples) / 16_000
    speed = 2.0
    started = time.monotonic()
    process = subprocess.Popen(
        [*TENSORGATE, "vad", str(wav), "--target", voice_server.target, "--speed", str(speed)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline()
    first_at = time.monotonic() - started
    rest, errors = process.communicate(timeout=60)
    total = time.monotonic() - started
    assert process.returncode == 0, errors
    assert first.startswith("speech") and len(rest.splitlines()) == 1, (first, rest)
    # Paced: the audio takes duration / speed to send, and the first segment was printed while
    # the rest of it (3 s of silence and more, 1.5 s at this speed) was still being sent.
    assert total >= duration_s / speed - 0.1
    assert first_at < total - 1.0


def test_wrong_audio_gets_one_line(voice_server: ServerThread, tmp_path: Path) -> None:
    import wave

    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44_100)
        wav.writeframes(b"\0" * 4000)
    done = _vad(voice_server.target, path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {path}: 44100 Hz, 2 channel(s), 16-bit; silero_vad takes 16 kHz mono 16-bit "
        f"(convert with: sox {path} -r 16000 -c 1 -b 16 out.wav)"
    ]
    missing = _vad(voice_server.target, tmp_path / "missing.wav")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'missing.wav'}: no such file"
    not_audio = tmp_path / "x.npy"
    not_audio.write_bytes(b"\x93NUMPY")
    done = _vad(voice_server.target, not_audio)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert f"error: {not_audio}: not a PCM WAV file (" in line and "()" not in line
    assert "is x.npy audio at all? give a 16 kHz mono 16-bit WAV file" in line
