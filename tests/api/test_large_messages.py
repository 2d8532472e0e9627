"""Messages over 1 MiB are parsed on a worker thread, not on the event loop; they must be
answered exactly like small ones, on unary calls and in streams, valid or not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import StreamItem, TensorgateClient, codec
from tensorgate.server.api.messages import PARSE_OFF_LOOP_BYTES
from tests.harness import MlpReference, ServerThread, write_config


def test_large_requests_are_answered_like_small_ones(
    repository: Path,
    tmp_path: Path,
    reference: MlpReference,
    start_server: Callable[..., ServerThread],
    rng: np.random.Generator,
) -> None:
    write_config(
        tmp_path / "mlp_big",
        backend="onnxruntime",
        onnxruntime={"artifact": str(repository / "mlp" / "model.onnx")},
        max_batch_size=2048,
        instance_count=1,
    )
    running = start_server(model_repository=tmp_path)
    x = rng.standard_normal((2048, 256)).astype(np.float32)  # 2 MiB of contents
    assert codec.predict_request("mlp_big", {"input": x}).ByteSize() > PARSE_OFF_LOOP_BYTES
    with TensorgateClient(running.target, timeout_s=30) as c:
        unary = c.predict("mlp_big", {"input": x})["logits"]
        np.testing.assert_allclose(unary, reference.logits(x), rtol=1e-4, atol=1e-4)
        streamed = list(c.stream([StreamItem("big", "mlp_big", {"input": x})]))
        assert streamed[0].ok
        np.testing.assert_array_equal(streamed[0].outputs["logits"], unary)
        garbage = b"\xff" * (2 * PARSE_OFF_LOOP_BYTES)
        with pytest.raises(grpc.RpcError) as refused:
            c._channel.unary_unary("/tensorgate.v1.Inference/Predict")(garbage, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid tensorgate.v1.PredictRequest" in refused.value.details()
