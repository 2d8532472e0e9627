"""The Python clients' edges: one error type with the server's retry hint, retries that honour
it (off by default), typed model descriptions."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from tensorgate.client import (
    ModelMetadata,
    Retry,
    TensorgateClient,
    TensorgateError,
    TensorMetadata,
)
from tests.harness import ServerThread

X = np.ones((1, 256), np.float32)


def test_a_refusal_is_one_error_type_with_the_servers_retry_hint(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(models=("mlp",), tenant_rate=2.0)
    with TensorgateClient(server.target, timeout_s=10) as client:
        with pytest.raises(TensorgateError) as refused:
            for _ in range(20):
                client.predict("mlp", {"input": X})
    error = refused.value
    assert isinstance(error, grpc.RpcError)  # code catching grpc's errors keeps working
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "is over its rate of 2 requests/s" in error.message
    assert error.retry_after_s is not None and 0 < error.retry_after_s <= 1.0
    assert str(error).startswith("RESOURCE_EXHAUSTED: tenant ''")


def test_retry_waits_out_the_hint_and_every_call_succeeds(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(models=("mlp",), tenant_rate=4.0)
    started = time.monotonic()
    with TensorgateClient(server.target, timeout_s=10, retry=Retry(max_attempts=20)) as client:
        results = [client.predict("mlp", {"input": X}) for _ in range(10)]
    elapsed = time.monotonic() - started
    assert all(r["logits"].shape == (1, 16) for r in results)
    # 10 calls at 4 a second with a burst of 4: the retries waited about 1.5 s, as hinted.
    assert 1.0 < elapsed < 10.0, elapsed


def test_a_submit_without_a_key_is_not_retried_after_unavailable() -> None:
    """UNAVAILABLE may follow an accepted Submit; without an idempotency key a retry could make
    a second job. (Nothing listens on the port: every call fails UNAVAILABLE.)"""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{probe.getsockname()[1]}"
    attempts = Retry(max_attempts=3, base_s=0.01)
    with TensorgateClient(target, timeout_s=2, retry=attempts) as client:
        started = time.monotonic()
        with pytest.raises(TensorgateError) as unkeyed:
            client.submit("mlp", {"input": X})
        assert unkeyed.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TensorgateError):
            client.predict("mlp", {"input": X})
    assert attempts.wants(1, unkeyed.value, may_be_accepted=True) is False
    assert attempts.wants(1, unkeyed.value, may_be_accepted=False) is True
    assert time.monotonic() - started < 5


def test_model_descriptions_are_typed(server: ServerThread) -> None:
    with TensorgateClient(server.target, timeout_s=10) as client:
        meta = client.model_metadata("mlp")
        summaries = client.list_models()
    assert isinstance(meta, ModelMetadata)
    assert meta.inputs == (TensorMetadata("input", "FP32", (-1, 256)),)
    assert {s.name for s in summaries} >= {"mlp", "pair"}
