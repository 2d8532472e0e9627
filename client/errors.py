"""The one error the clients raise, and retrying the calls a busy server refuses.

TensorgateError carries the status code, the server's message and, for RESOURCE_EXHAUSTED, the
server's retry-after-ms hint as retry_after_s. It is a grpc.aio.AioRpcError (so a
grpc.RpcError too): code that catches those keeps working.

Retry (off unless a client is given one) runs a call again on RESOURCE_EXHAUSTED and
UNAVAILABLE, after the server's hint or an exponential backoff with jitter, up to max_attempts.
A Submit without an idempotency key is retried only when it was refused (RESOURCE_EXHAUSTED):
after UNAVAILABLE it may have been accepted, and a second try could make a second job.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")

RETRY_AFTER_MS_KEY = "retry-after-ms"


class TensorgateError(grpc.aio.AioRpcError):  # type: ignore[misc]
    """A call that failed: code (grpc.StatusCode), message, and retry_after_s (the server's hint
    of when to try again, for RESOURCE_EXHAUSTED; None without one)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        retry_after_s: float | None = None,
        trailing_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*trailing_metadata),
            details=message,
            debug_error_string=f"{code.name}: {message}",
        )
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        return self.details() or ""

    @classmethod
    def of(cls, error: grpc.RpcError) -> TensorgateError:
        """The same failure as a TensorgateError (the server's hint read from its trailers)."""
        if isinstance(error, TensorgateError):
            return error
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        trailing = (
            tuple(
                (str(k), str(v))
                for k, v in (error.trailing_metadata() or ())  # type: ignore[attr-defined]
            )
            if hasattr(error, "trailing_metadata")
            else ()
        )
        hint = dict(trailing).get(RETRY_AFTER_MS_KEY)
        retry_after_s = int(hint) / 1000 if hint and hint.isdigit() else None
        return cls(code, details or "", retry_after_s, trailing)

    def __str__(self) -> str:
        return f"{self.code().name}: {self.details()}"


_RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass(slots=True, frozen=True)
class Retry:
    """Run a refused call again: up to max_attempts in all, waiting the server's retry-after
    hint when it gives one, else base_s doubling (with jitter) up to max_wait_s."""

    max_attempts: int = 4
    base_s: float = 0.05
    max_wait_s: float = 2.0

    def wait_s(self, attempt: int, error: TensorgateError) -> float:
        if error.retry_after_s is not None:
            return min(error.retry_after_s, self.max_wait_s)
        return min(self.base_s * 2 ** (attempt - 1), self.max_wait_s) * random.uniform(0.5, 1.0)

    def wants(self, attempt: int, error: TensorgateError, may_be_accepted: bool) -> bool:
        """Whether to try again after this failed attempt. may_be_accepted: a non-idempotent
        call (a Submit without a key) that UNAVAILABLE may have let through."""
        if attempt >= self.max_attempts or error.code() not in _RETRYABLE:
            return False
        return not (may_be_accepted and error.code() is grpc.StatusCode.UNAVAILABLE)


def call(fn: Callable[[], T], retry: Retry | None, may_be_accepted: bool = False) -> T:
    """Runs a blocking call, raising TensorgateError, retried as `retry` says."""
    attempt = 1
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            error = TensorgateError.of(exc)
            if retry is None or not retry.wants(attempt, error, may_be_accepted):
                raise error from None
            time.sleep(retry.wait_s(attempt, error))
            attempt += 1


async def acall(
    fn: Callable[[], Awaitable[T]], retry: Retry | None, may_be_accepted: bool = False
) -> T:
    """Awaits a call, raising TensorgateError, retried as `retry` says."""
    attempt = 1
    while True:
        try:
            return await fn()
        except grpc.RpcError as exc:
            error = TensorgateError.of(exc)
            if retry is None or not retry.wants(attempt, error, may_be_accepted):
                raise error from None
            await asyncio.sleep(retry.wait_s(attempt, error))
            attempt += 1
