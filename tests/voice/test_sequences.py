"""Sequences of the bundled silero_vad, batched across sequences: every chunk's probability
equals Silero's own reference loop, over one stream, over several streams, through unary calls
and through tritonclient's sequence API."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import numpy as np

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tests.harness import ServerThread
from tests.voice.audio import Recording
from tests.voice.conftest import reference, voices

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


async def _drive(
    target: str, audio: list[np.ndarray], streams: int, prefix: str
) -> list[np.ndarray]:
    """Sends each sequence's chunks, all sequences at once, interleaved, over `streams` streams;
    each sequence pipelines its chunks (the next goes before the last is answered)."""
    async with AsyncTensorgateClient(target, timeout_s=60) as client:
        opened = [client.sequences("silero_vad") for _ in range(streams)]
        for stream in opened:
            await stream.__aenter__()
        try:
            futures = []
            for t in range(len(audio[0])):
                row = []
                for s, chunks in enumerate(audio):
                    stream = opened[s % streams]
                    row.append(stream.submit(f"{prefix}-{s}", {"audio": chunks[t]},
                                             start=t == 0, end=t == len(chunks) - 1))  # fmt: skip
                futures.append(row)
                if t % 8 == 7:
                    await asyncio.sleep(0)  # let answers in while sending
            results = [await asyncio.gather(*row) for row in futures]
        finally:
            for stream in opened:
                await stream.close()
    return [
        np.array([results[t][s]["probability"][0, 0] for t in range(len(results))])
        for s in range(len(audio))
    ]


def test_interleaved_sequences_on_one_stream_equal_silero_reference(
    voice_server: ServerThread, recording: Recording
) -> None:
    audio = voices(recording, 8)
    before = voice_server.stats("silero_vad")
    batches_before, requests_before = before.batches, before.requests
    got = asyncio.run(_drive(voice_server.target, audio, streams=1, prefix="one"))
    for chunks, probabilities in zip(audio, got, strict=True):
        np.testing.assert_allclose(probabilities, reference(chunks), atol=TOLERANCE, rtol=0)
    after = voice_server.stats("silero_vad")
    requests = after.requests - requests_before
    assert requests == 8 * len(audio[0])
    # Batched across sequences: far fewer engine calls than chunks.
    assert after.batches - batches_before < requests / 2
    assert max(after.batch_sizes) > 1


def test_sequences_over_several_streams_equal_silero_reference(
    voice_server: ServerThread, recording: Recording
) -> None:
    audio = voices(recording, 12)
    got = asyncio.run(_drive(voice_server.target, audio, streams=4, prefix="many"))
    for chunks, probabilities in zip(audio, got, strict=True):
        np.testing.assert_allclose(probabilities, reference(chunks), atol=TOLERANCE, rtol=0)


def test_a_sequence_through_unary_predict_equals_silero_reference(
    voice_server: ServerThread, recording: Recording
) -> None:
    [chunks] = voices(recording, 1)
    chunks = chunks[:60]
    with TensorgateClient(voice_server.target, timeout_s=30) as client:
        got = [
            client.predict("silero_vad", {"audio": chunk}, sequence_id="unary-1",
                           sequence_start=t == 0, sequence_end=t == len(chunks) - 1)
            ["probability"][0, 0]
            for t, chunk in enumerate(chunks)
        ]  # fmt: skip
    np.testing.assert_allclose(got, reference(chunks), atol=TOLERANCE, rtol=0)


def test_the_caller_sees_only_audio_and_probability(voice_server: ServerThread) -> None:
    with TensorgateClient(voice_server.target, timeout_s=30) as client:
        metadata = client.model_metadata("silero_vad")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("audio", "FP32", [-1, 512])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probability", "FP32", [-1, 1])
    ]


def test_tritonclient_sequence_api(
    voice_server: ServerThread, recording: Recording, triton_python: Path, tmp_path: Path
) -> None:
    audio = np.stack([chunks[:80] for chunks in voices(recording, 5)])
    np.save(tmp_path / "chunks.npy", audio)
    done = subprocess.run(
        [str(triton_python), str(ROOT / "tests" / "voice" / "tritonclient_sequences.py"),
         voice_server.target, str(tmp_path / "chunks.npy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errors"] == []
    for s, chunks in enumerate(audio):
        np.testing.assert_allclose(
            result["probabilities"][str(s)], reference(chunks), atol=TOLERANCE, rtol=0
        )
    assert "FAILED_PRECONDITION" in result["unknown"]
    assert "sequence '999' is not live" in result["unknown"]
