"""Registering a servicer with gRPC, with deserializers of our own:

- bytes which are not a valid message become a clean INVALID_ARGUMENT instead of gRPC's UNKNOWN
  and a logged traceback per message (a log-flooding lever): the deserializer returns a
  Malformed marker, which the call wrapper and the stream pump answer like any other bad request;
- a message over PARSE_OFF_LOOP_BYTES is not parsed where gRPC calls the deserializer (on the
  event loop, stalling every other caller) but handed over as Unparsed, and resolve() parses it
  on a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from tensorgate.server.errors import InvalidArgument


@dataclass(slots=True, frozen=True)
class Malformed:
    """Stands in for a request message whose bytes did not decode."""

    message_type: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.message_type} message: {self.reason[:200]}"
        )


# Messages larger than this are parsed on a worker thread (40 MB takes ~15 ms to parse, more
# when its typed contents are decoded); smaller ones are parsed at once, saving the thread hop.
PARSE_OFF_LOOP_BYTES = 1 << 20


@dataclass(slots=True, frozen=True)
class Unparsed:
    """A large request message not parsed yet; resolve() parses it off the event loop."""

    parse: Callable[[], Any]


async def resolve(message: Any) -> Any:
    """The parsed message (or a Malformed marker) for whatever the deserializer returned."""
    if isinstance(message, Unparsed):
        return await asyncio.to_thread(message.parse)
    return message


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name
    from_string = message_class.FromString

    def parse(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError as exc:
            return Malformed(name, str(exc) or "undecodable bytes")

    def deserialize(data: bytes) -> Any:
        if len(data) > PARSE_OFF_LOOP_BYTES:
            return Unparsed(functools.partial(parse, data))
        return parse(data)

    return deserialize


def add_service(server: grpc.aio.Server, servicer: Any, pb2: ModuleType, service: str) -> None:
    """Adds `servicer` for the service named `service` in the generated module pb2; each method
    is bound by name, unary-unary, unary-stream or stream-stream as the .proto declares."""
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        # The message classes wherever they are declared (google.longrunning's Empty, ...).
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        kwargs = dict(
            request_deserializer=_tolerant(request_class),
            response_serializer=response_class.SerializeToString,
        )
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
        else:  # pragma: no cover - the contract has no such methods
            raise TypeError(f"{descriptor.full_name}/{method.name}: unsupported streaming kind")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
