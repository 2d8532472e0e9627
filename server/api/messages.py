"""Registering a servicer with gRPC so that bytes which are not a valid message become a clean
INVALID_ARGUMENT instead of gRPC's UNKNOWN and a logged traceback per message (a log-flooding
lever): the deserializer returns a Malformed marker, which the call wrapper and the stream pump
answer like any other bad request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.errors import InvalidArgument


@dataclass(slots=True, frozen=True)
class Malformed:
    """Stands in for a request message whose bytes did not decode."""

    message_type: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.message_type} message: {self.reason[:200]}"
        )


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name
    parse = message_class.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Malformed(name, str(exc) or "undecodable bytes")

    return deserialize


def add_service(server: grpc.aio.Server, servicer: Any, pb2: ModuleType, service: str) -> None:
    """Adds `servicer` for the service named `service` in the generated module pb2; each method
    is bound by name, unary-unary or stream-stream as the .proto declares."""
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_class = getattr(pb2, method.input_type.name)
        response_class = getattr(pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        kwargs = dict(
            request_deserializer=_tolerant(request_class),
            response_serializer=response_class.SerializeToString,
        )
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)
        else:  # pragma: no cover - the contract has no such methods
            raise TypeError(f"{descriptor.full_name}/{method.name}: unsupported streaming kind")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
