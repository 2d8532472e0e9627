"""Voice activity detection with the served `silero_vad` model: WAV reading, 32 ms chunks, and
speech segments from the per-chunk probabilities (Silero's own rule: speech starts at a chunk of
probability >= threshold and ends once it stays below threshold - 0.15 for min_silence_ms).

    tensorgate vad call.wav                  # streams at real-time pace, prints segments as they
                                             # close
"""

from __future__ import annotations

import asyncio
import collections
import time
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorgate.client.aio import AsyncTensorgateClient

SAMPLE_RATE = 16_000
CHUNK = 512  # samples: 32 ms at 16 kHz, what silero_vad takes
CHUNK_S = CHUNK / SAMPLE_RATE


class WavError(ValueError):
    """The file is not audio silero_vad can take; the message says what it is."""


def read_wav(path: Path) -> np.ndarray:
    """A 16 kHz mono 16-bit PCM WAV as float32 samples in [-1, 1)."""
    try:
        with wave.open(str(path), "rb") as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WavError(f"{path}: a directory, not a WAV file") from None
    except (wave.Error, EOFError) as exc:
        why = str(exc) or "the file ends before its WAV header does"
        if path.suffix.lower() != ".wav":
            why += f"; is {path.name} audio at all? give a 16 kHz mono 16-bit WAV file"
        raise WavError(f"{path}: not a PCM WAV file ({why})") from None
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
        raise WavError(
            f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; silero_vad takes 16 kHz "
            f"mono 16-bit (convert with: sox {path} -r 16000 -c 1 -b 16 out.wav)"
        )
    return np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0


def chunks(samples: np.ndarray) -> Iterator[np.ndarray]:
    """[1, 512] chunks; the last one padded with silence."""
    for start in range(0, len(samples), CHUNK):
        chunk = samples[start : start + CHUNK]
        if len(chunk) < CHUNK:
            chunk = np.pad(chunk, (0, CHUNK - len(chunk)))
        yield chunk.reshape(1, CHUNK)


@dataclass(slots=True, frozen=True)
class Segment:
    start_s: float
    end_s: float


class Segmenter:
    """Turns per-chunk speech probabilities into speech segments.

    Speech starts at the first chunk with probability >= threshold. It ends once the probability
    has stayed below threshold - 0.15 for min_silence_ms; the segment's end is then the start of
    its last chunk at or above threshold, since Silero's probability trails the end of speech by
    about one chunk (its LSTM state): measured on espeak-ng speech, that puts ends within 30-80 ms
    of the voice's, where the chunk's own end would be 60-110 ms late.
    """

    def __init__(
        self, threshold: float = 0.5, min_silence_ms: float = 300, min_speech_ms: float = 250
    ) -> None:
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.min_silence_s = min_silence_ms / 1000
        self.min_speech_s = min_speech_ms / 1000
        self._start: float | None = None
        self._last_speech = 0.0
        self._silence_from: float | None = None

    def feed(self, index: int, probability: float) -> Segment | None:
        """The probability of chunk `index`; returns a segment when one closes."""
        at = index * CHUNK_S
        if probability >= self.threshold:
            self._silence_from = None
            self._last_speech = at
            if self._start is None:
                self._start = at
            return None
        if self._start is None or probability >= self.neg_threshold:
            return None
        if self._silence_from is None:
            self._silence_from = at
        if at + CHUNK_S - self._silence_from >= self.min_silence_s:
            return self._close()
        return None

    def finish(self) -> Segment | None:
        """The end of the audio closes an open segment."""
        return self._close() if self._start is not None else None

    def _close(self) -> Segment | None:
        start, self._start, self._silence_from = self._start, None, None
        assert start is not None
        end = max(self._last_speech, start + CHUNK_S)
        if end - start < self.min_speech_s:
            return None
        return Segment(round(start, 3), round(end, 3))


async def stream_vad(
    client: AsyncTensorgateClient,
    samples: np.ndarray,
    sequence_id: str,
    speed: float = 1.0,
    segmenter: Segmenter | None = None,
    model: str = "silero_vad",
) -> AsyncIterator[tuple[int, float, Segment | None]]:
    """Sends the audio as one sequence, a chunk every 32 ms / speed (speed 0: all at once,
    pipelined); yields (chunk index, probability, the segment that closed or None) in order, as
    the answers come."""
    segmenter = segmenter or Segmenter()
    pieces = list(chunks(samples))
    pending: collections.deque[tuple[int, asyncio.Future[dict[str, np.ndarray]]]] = (
        collections.deque()
    )

    def answered() -> Iterator[tuple[int, float, Segment | None]]:
        while pending and pending[0][1].done():
            index, future = pending.popleft()
            probability = float(future.result()["probability"][0, 0])
            yield index, probability, segmenter.feed(index, probability)

    started = time.monotonic()
    async with client.sequences(model) as stream:
        for index, chunk in enumerate(pieces):
            if speed > 0:
                # Real-time pace: the audio arrives this way. Answers are read meanwhile.
                due = started + index * CHUNK_S / speed
                while (delay := due - time.monotonic()) > 0:
                    if pending:
                        await asyncio.wait([pending[0][1]], timeout=delay)
                        for result in answered():
                            yield result
                    else:
                        await asyncio.sleep(delay)
            last = index == len(pieces) - 1
            pending.append((index, stream.submit(sequence_id, {"audio": chunk},
                                                 start=index == 0, end=last)))  # fmt: skip
            for result in answered():
                yield result
        while pending:
            await asyncio.wait([pending[0][1]])
            for result in answered():
                yield result
    closed = segmenter.finish()
    if closed is not None:
        yield len(pieces), 0.0, closed
