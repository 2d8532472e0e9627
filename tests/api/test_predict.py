"""Unary Predict and the model listing RPCs, over real gRPC."""

from __future__ import annotations

import numpy as np

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tests.harness import MlpReference


def test_predict_returns_the_models_outputs(
    client: TensorgateClient, reference: MlpReference, rng: np.random.Generator
) -> None:
    x = rng.standard_normal((5, 256)).astype(np.float32)
    outputs = client.predict("mlp", {"input": x})
    assert set(outputs) == {"logits", "probabilities"}
    np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        outputs["probabilities"], reference.probabilities(x), rtol=1e-4, atol=1e-6
    )
    assert outputs["logits"].dtype == np.float32 and outputs["logits"].shape == (5, 16)


def test_predict_returns_only_the_requested_outputs(
    client: TensorgateClient, reference: MlpReference, rng: np.random.Generator
) -> None:
    x = rng.standard_normal((1, 256)).astype(np.float32)
    outputs = client.predict("mlp", {"input": x}, outputs=["probabilities"])
    assert list(outputs) == ["probabilities"]
    np.testing.assert_allclose(outputs["probabilities"], reference.probabilities(x), atol=1e-6)


def test_predict_echoes_the_request_id(client: TensorgateClient, rng: np.random.Generator) -> None:
    from tensorgate.client import codec

    x = rng.standard_normal((1, 256)).astype(np.float32)
    response = client._stub.Predict(codec.predict_request("mlp", {"input": x}, (), "req-42"))
    assert response.id == "req-42" and response.model == "mlp"


def test_predict_with_two_inputs_of_different_datatypes(
    client: TensorgateClient, rng: np.random.Generator
) -> None:
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.integers(-5, 5, (3, 4)).astype(np.int64)
    outputs = client.predict("pair", {"a": a, "b": b})
    np.testing.assert_allclose(outputs["out"], a * 2 + b, rtol=1e-6)


async def test_async_client_predicts_concurrently(
    aclient: AsyncTensorgateClient, reference: MlpReference, rng: np.random.Generator
) -> None:
    import asyncio

    xs = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(40)]
    results = await asyncio.gather(*(aclient.predict("mlp", {"input": x}) for x in xs))
    for x, outputs in zip(xs, results, strict=True):
        np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)


def test_list_models_and_metadata(client: TensorgateClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert {"mlp", "pair", "mlp_wide"} <= set(models)
    assert models["mlp"].ready and models["mlp"].backend == "onnxruntime"
    meta = client.model_metadata("mlp")
    assert meta.max_batch_size == 64 and meta.instance_count == 2
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 256])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 16]),
        ("probabilities", "FP32", [-1, 16]),
    ]
