"""Bounds on what one request may carry besides its tensors, checked before anything is kept;
and the per-tenant rate of calls (--tenant-rate).

Request ids, idempotency keys and parameters are stored with a job for its whole TTL, and
tensors are decoded one by one: without bounds one caller could make every job expensive to
keep, or one request expensive to parse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tensorgate.server.errors import InvalidArgument, ResourceExhausted
from tensorgate.server.records import Request

# Most tensors one request may name (no model has more inputs than this).
MAX_TENSORS = 256
MAX_ID_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_PARAMETERS = 64
MAX_PARAMETER_CHARS = 4096  # a parameter's name or string value
MAX_MODEL_NAME_CHARS = 256


def check_request(request: Request) -> None:
    """InvalidArgument naming the first bound a request breaks."""
    if (
        len(request.model) <= MAX_MODEL_NAME_CHARS
        and len(request.inputs) <= MAX_TENSORS
        and len(request.id) <= MAX_ID_CHARS
        and not request.parameters
    ):
        return  # the common request: within every bound, nothing else to look at
    _at_most("model name has {} characters", len(request.model), MAX_MODEL_NAME_CHARS)
    _at_most("request has {} input tensors", len(request.inputs), MAX_TENSORS)
    _at_most("request id has {} characters", len(request.id), MAX_ID_CHARS)
    _at_most("request has {} parameters", len(request.parameters), MAX_PARAMETERS)
    for name, value in request.parameters.items():
        if len(name) > MAX_PARAMETER_CHARS or (
            isinstance(value, str) and len(value) > MAX_PARAMETER_CHARS
        ):
            raise InvalidArgument(
                f"parameter '{name[:64]}' is too long; names and string values take at most "
                f"{MAX_PARAMETER_CHARS} characters"
            )


def check_idempotency_key(key: str) -> None:
    _at_most("idempotency key has {} characters", len(key), MAX_IDEMPOTENCY_KEY_CHARS)


def _at_most(what: str, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidArgument(f"{what.format(count)}; at most {limit}")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class TenantRates:
    """A token bucket per tenant: `rate` calls a second, bursts up to one second's worth. Every
    call a tenant makes is charged (unary calls once, each request of a stream once); the health
    service is never."""

    rate: float
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def charge(self, tenant: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(self.rate, now)
        bucket.tokens = min(self.rate, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            wait_s = (1.0 - bucket.tokens) / self.rate
            raise ResourceExhausted(
                f"tenant '{tenant}' is over its rate of {self.rate:g} requests/s "
                "(--tenant-rate); retry later",
                retry_after_s=wait_s,
            )
        bucket.tokens -= 1.0
