"""Test speech: sentences spoken by espeak-ng, joined with known silences, at 16 kHz."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 16_000


def speak(text: str, voice: str = "en") -> np.ndarray:
    """text spoken by espeak-ng, resampled to 16 kHz, its own leading and trailing silence cut
    (so where it is placed is where the voice is)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; .ci/run does)")
    wav_bytes = subprocess.run(
        [espeak, "-v", voice, "--stdout", text], capture_output=True, check=True, timeout=60
    ).stdout
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32)
    samples /= 32768.0
    times = np.arange(int(len(samples) * RATE / rate)) / RATE
    resampled = np.interp(times, np.arange(len(samples)) / rate, samples).astype(np.float32)
    loud = np.flatnonzero(np.abs(resampled) > 0.02)
    return resampled[loud[0] : loud[-1] + 1]


@dataclass(frozen=True)
class Recording:
    samples: np.ndarray
    # (start_s, end_s) of each placed utterance
    speech: tuple[tuple[float, float], ...]

    def write(self, path: Path) -> Path:
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(RATE)
            pcm = np.clip(self.samples * 32768.0, -32768, 32767).astype("<i2")
            wav.writeframes(pcm.tobytes())
        return path


def compose(parts: list[str | float], seed: int = 0) -> Recording:
    """Sentences (str) and silences (float seconds, faint noise) in order."""
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    speech = []
    at = 0
    for part in parts:
        if isinstance(part, str):
            voice = speak(part)
            speech.append((at / RATE, (at + len(voice)) / RATE))
            pieces.append(voice)
            at += len(voice)
        else:
            silence = (rng.standard_normal(int(part * RATE)) * 1e-3).astype(np.float32)
            pieces.append(silence)
            at += len(silence)
    return Recording(np.concatenate(pieces), tuple(speech))
