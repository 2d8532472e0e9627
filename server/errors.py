"""Domain errors of the serving path.

Every failure a caller can see is one of these; the transport maps each class to its status code
in one place (server/api/status.py), so the core never imports grpc.
"""

from __future__ import annotations


class TensorgateError(Exception):
    """Base of every error that is reported to the caller with its message."""


class InvalidArgument(TensorgateError):
    """The request is malformed or does not fit the model."""


class NotFound(TensorgateError):
    """An unknown model, or an unknown or expired job."""


class ResourceExhausted(TensorgateError):
    """A bounded queue or limit is full; the caller may retry later."""

    def __init__(self, message: str, retry_after_s: float = 0.1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TensorgateError):
    """The request's deadline passed before it ran."""


class Cancelled(TensorgateError):
    """The caller, or an operator, cancelled the request."""


class Unavailable(TensorgateError):
    """The server or the model cannot take work now (shutting down, not loaded)."""


class Internal(TensorgateError):
    """The engine failed while running the request."""
