"""Runs in its own virtual environment with the real `tritonclient` (which needs protobuf < 7 and
registers the `inference.*` protobuf symbols itself), against a tensorgate server:

    python tritonclient_session.py 127.0.0.1:PORT > results.json

Prints what each tritonclient call returned, for tests/api/test_kserve.py to check.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException


def inputs_for(x: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def error_of(call) -> dict[str, str]:  # type: ignore[no-untyped-def]
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "no error"}


def main(target: str) -> dict[str, object]:
    out: dict[str, object] = {}
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(60)]
    out["xs"] = [x.tolist() for x in xs]
    client = grpcclient.InferenceServerClient(target)
    out["live"] = client.is_server_live()
    out["ready"] = client.is_server_ready()
    out["model_ready"] = client.is_model_ready("mlp")
    out["server_metadata"] = client.get_server_metadata(as_json=True)
    out["model_metadata"] = client.get_model_metadata("mlp", as_json=True)
    out["model_config"] = client.get_model_config("mlp", as_json=True)

    result = client.infer("mlp", inputs_for(xs[0]), request_id="first")
    out["infer"] = {
        "id": result.get_response().id,
        "logits": result.as_numpy("logits").tolist(),
        "probabilities": result.as_numpy("probabilities").tolist(),
    }
    only = client.infer(
        "mlp", inputs_for(xs[1]), outputs=[grpcclient.InferRequestedOutput("probabilities")]
    )
    out["requested_only"] = {
        "names": [o.name for o in only.get_response().outputs],
        "probabilities": only.as_numpy("probabilities").tolist(),
    }
    bad = np.ones((1, 3), np.float32)
    out["bad_shape"] = error_of(lambda: client.infer("mlp", inputs_for(bad)))
    out["unknown_model"] = error_of(lambda: client.infer("nope", inputs_for(xs[0])))

    # async_infer: callbacks from gRPC's threads.
    answers: queue.Queue = queue.Queue()
    for i in range(10):
        client.async_infer(
            "mlp", inputs_for(xs[i]), lambda result, error, i=i: answers.put((i, result, error))
        )
    async_results = {}
    for _ in range(10):
        i, result, error = answers.get(timeout=30)
        async_results[i] = None if error else result.as_numpy("logits").tolist()
    out["async_infer"] = async_results

    # A stream with many requests in flight, and one bad request among them.
    streamed: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: streamed.put((result, error)))
    for i in range(50):
        client.async_stream_infer("mlp", inputs_for(xs[i]), request_id=f"s{i}")
    client.async_stream_infer("mlp", inputs_for(bad), request_id="bad")
    stream_results, stream_errors = {}, []
    for _ in range(51):
        result, error = streamed.get(timeout=30)
        if error is not None:
            stream_errors.append(str(error))
        else:
            stream_results[result.get_response().id] = result.as_numpy("logits").tolist()
    client.stop_stream()
    out["stream"] = {"results": stream_results, "errors": stream_errors}
    out["statistics"] = client.get_inference_statistics("mlp", as_json=True)
    client.close()
    out["aio"] = asyncio.run(aio_session(target, xs))
    return out


async def aio_session(target: str, xs: list[np.ndarray]) -> dict[str, object]:
    async with aioclient.InferenceServerClient(target) as client:
        live = await client.is_server_live()
        results = await asyncio.gather(
            *(client.infer("mlp", inputs_for(x), request_id=str(i)) for i, x in enumerate(xs[:20]))
        )

        async def requests():  # type: ignore[no-untyped-def]
            for i, x in enumerate(xs[:40]):
                yield {"model_name": "mlp", "inputs": inputs_for(x), "request_id": f"a{i}"}

        streamed = {}
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            streamed[result.get_response().id] = result.as_numpy("logits").tolist()
    return {
        "live": live,
        "infer": {r.get_response().id: r.as_numpy("logits").tolist() for r in results},
        "stream": streamed,
    }


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout)
