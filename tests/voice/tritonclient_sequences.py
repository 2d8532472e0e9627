"""Runs in the tritonclient virtual environment (see tests/api/test_kserve.py) against a server:

    python tritonclient_sequences.py 127.0.0.1:PORT chunks.npy > results.json

chunks.npy holds [sequences, chunks, 1, 512] audio. Sequences 0 and 1 (integer ids 101, 102) and
2 and 3 (string ids) go interleaved over one stream with tritonclient's sequence API
(async_stream_infer with sequence_id, sequence_start, sequence_end); the last one goes through
unary infer() calls with the same parameters. Prints each sequence's probabilities, and the
error a chunk of an unknown sequence gets.
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "silero_vad"


def inputs_for(chunk: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("audio", list(chunk.shape), "FP32")
    tensor.set_data_from_numpy(chunk)
    return [tensor]


def main(target: str, path: str) -> dict[str, object]:
    audio = np.load(path)
    ids: list[int | str] = [101, 102, "call-a", "call-b"]
    streamed = ids[: len(audio) - 1]
    answers: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    client = grpcclient.InferenceServerClient(target)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    count = audio.shape[1]
    for t in range(count):
        for s, sequence_id in enumerate(streamed):
            client.async_stream_infer(
                MODEL,
                inputs_for(audio[s, t]),
                request_id=f"{s}/{t}",
                sequence_id=sequence_id,
                sequence_start=t == 0,
                sequence_end=t == count - 1,
            )
    probabilities = {str(s): [0.0] * count for s in range(len(streamed))}
    errors = []
    for _ in range(count * len(streamed)):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors.append(str(error))
            continue
        s, t = result.get_response().id.split("/")
        probabilities[s][int(t)] = float(result.as_numpy("probability")[0, 0])
    client.stop_stream()
    unary = len(audio) - 1
    probabilities[str(unary)] = [
        float(
            client.infer(
                MODEL,
                inputs_for(audio[unary, t]),
                sequence_id="unary-call",
                sequence_start=t == 0,
                sequence_end=t == count - 1,
            ).as_numpy("probability")[0, 0]
        )
        for t in range(count)
    ]
    try:
        client.infer(MODEL, inputs_for(audio[0, 0]), sequence_id=999)
        unknown = "no error"
    except InferenceServerException as exc:
        unknown = f"{exc.status()} {exc.message()}"
    return {"probabilities": probabilities, "errors": errors, "unknown": unknown}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
