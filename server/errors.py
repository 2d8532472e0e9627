"""Domain errors of the serving path.

Every failure a caller can see is one of these; the transport maps each class to its status code
in one place (server/api/status.py), so the core never imports grpc.
"""

from __future__ import annotations


class TensorgateError(Exception):
    """Base of every error that is reported to the caller with its message.

    `code` is the canonical status name (as in google.rpc.Code), used for metric labels; the
    transport's own mapping lives in server/api/status.py.
    """

    code = "INTERNAL"


class InvalidArgument(TensorgateError):
    """The request is malformed or does not fit the model."""

    code = "INVALID_ARGUMENT"


class NotFound(TensorgateError):
    """An unknown model, or an unknown or expired job."""

    code = "NOT_FOUND"


class ResourceExhausted(TensorgateError):
    """A bounded queue or limit is full; the caller may retry later."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 0.1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermissionDenied(TensorgateError):
    """The caller is known but may not do this (the model repository API without admin)."""

    code = "PERMISSION_DENIED"


class FailedPrecondition(TensorgateError):
    """The request does not fit the state it refers to (a chunk for a sequence that is not
    live)."""

    code = "FAILED_PRECONDITION"


class DeadlineExceeded(TensorgateError):
    """The request's deadline passed before it ran."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(TensorgateError):
    """The caller, or an operator, cancelled the request."""

    code = "CANCELLED"


class Unavailable(TensorgateError):
    """The server or the model cannot take work now (shutting down, not loaded)."""

    code = "UNAVAILABLE"


class Unauthenticated(TensorgateError):
    """The server needs credentials the call lacks (a token, a client certificate)."""

    code = "UNAUTHENTICATED"


class Internal(TensorgateError):
    """The engine failed while running the request."""

    code = "INTERNAL"


def clip(value: object, limit: int = 200) -> str:
    """A caller-supplied value as it may appear in an error message: cut to `limit` characters,
    so a huge name or shape cannot blow up a status message (gRPC drops statuses over ~8 KiB)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"
