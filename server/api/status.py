"""Domain errors as gRPC statuses (each error class names its canonical code), and helpers to
report them."""

from __future__ import annotations

import logging
import secrets

import grpc

from tensorgate.server.errors import Internal, ResourceExhausted, TensorgateError, clip
from tensorgate.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

# Trailing metadata key telling a refused caller when to retry.
RETRY_AFTER_MS_KEY = "retry-after-ms"
# Longest status message sent: gRPC clients drop trailers over ~8 KiB ("Stream removed").
MAX_MESSAGE_CHARS = 1024


def status_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, TensorgateError):
        return grpc.StatusCode[error.code]
    return grpc.StatusCode.INTERNAL


def as_domain_error(error: BaseException) -> TensorgateError:
    """A domain error as is; anything else becomes Internal with a logged reference."""
    if isinstance(error, TensorgateError):
        return error
    reference = secrets.token_hex(4)
    log.error("unexpected error (ref %s)", reference, exc_info=error)
    return Internal(f"internal error (ref {reference}): {type(error).__name__}")


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Ends the call with the error's status; always raises."""
    error = as_domain_error(error)
    if isinstance(error, ResourceExhausted):
        context.set_trailing_metadata(((RETRY_AFTER_MS_KEY, str(int(error.retry_after_s * 1000))),))
    await context.abort(status_of(error), clip(error, MAX_MESSAGE_CHARS))


def error_message(error: BaseException) -> pb.Error:
    error = as_domain_error(error)
    return pb.Error(code=status_of(error).value[0], message=clip(error, MAX_MESSAGE_CHARS))
