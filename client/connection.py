"""What both clients hold: the channel to the server (TLS or plaintext), the stub, the default
deadline, the retry policy, and the metadata every call carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc

from tensorgate.client.errors import Retry
from tensorgate.client.security import Security, call_metadata
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tensorgate.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

C = TypeVar("C")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class Connection(Generic[C]):
    """A channel made by `secure` or `insecure` (grpc's or grpc.aio's), its stub and the call
    settings."""

    def __init__(
        self,
        target: str,
        timeout_s: float | None,
        max_message_bytes: int,
        security: Security | None,
        retry: Retry | None,
        secure: Callable[..., C],
        insecure: Callable[..., C],
    ) -> None:
        self.security = security or Security()
        options = channel_options(max_message_bytes)
        if self.security.tls:
            credentials = self.security.channel_credentials()
            self.channel = secure(target, credentials, options=options)
        else:
            self.channel = insecure(target, options=options)
        self.stub: Any = pb_grpc.InferenceStub(self.channel)
        # The KServe service, for the model repository extension (load, unload, index).
        self.kserve: Any = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.retry = retry

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return call_metadata(self.security)


def sync_connection(
    target: str,
    timeout_s: float | None,
    max_message_bytes: int,
    security: Security | None,
    retry: Retry | None,
) -> Connection[grpc.Channel]:
    return Connection(
        target, timeout_s, max_message_bytes, security, retry,
        grpc.secure_channel, grpc.insecure_channel,
    )  # fmt: skip


def aio_connection(
    target: str,
    timeout_s: float | None,
    max_message_bytes: int,
    security: Security | None,
    retry: Retry | None,
) -> Connection[grpc.aio.Channel]:
    return Connection(
        target, timeout_s, max_message_bytes, security, retry,
        grpc.aio.secure_channel, grpc.aio.insecure_channel,
    )  # fmt: skip
