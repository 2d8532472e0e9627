"""Delivering webhooks: takes the deliveries the job store says are due, POSTs each (signed) and
records the outcome in the store.

At least once: an attempt that gets no 2xx (an error status, a timeout, a refused connection)
is due again after an exponential backoff with jitter (or the receiver's Retry-After, if later),
until --webhook-max-attempts attempts were made or --webhook-window-s has passed since the job
finished; then the delivery is dead-lettered (FAILED, its last error kept). Every attempt of one
job's delivery carries the same webhook-id, so a receiver drops the repeats.

The store leases a due delivery to the process attempting it; a process that dies mid-attempt
leaves it to another when the lease ends. No redirects are followed, TLS is verified, requests in
flight are bounded (in all, and per receiver), and nothing here blocks the event loop: bodies
with large results are encoded on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp.resolver import DefaultResolver

from tensorgate.server.config import ServerConfig
from tensorgate.server.datatypes import datatype_of
from tensorgate.server.errors import FailedPrecondition, Unavailable
from tensorgate.server.jobs.job import Job
from tensorgate.server.jobs.store import JobStore
from tensorgate.server.jobs.webhooks.policy import AllowList, GuardedResolver
from tensorgate.server.jobs.webhooks.signing import Secrets, signature
from tensorgate.server.records import Callback, DeliveryState
from tensorgate.server.telemetry import Metrics

log = logging.getLogger(__name__)

# How often the store is asked for due deliveries when nothing here finished (retries come due,
# and other replicas' deliveries whose process died).
_POLL_S = 0.25
# Pause after the store could not be reached.
_STORE_RETRY_S = 1.0
# Bodies with outputs bigger than this are encoded on a worker thread.
_ENCODE_OFF_LOOP_BYTES = 64 * 1024
# The longest gap between two attempts, however many failed.
_MAX_BACKOFF_S = 600.0
# The longest stop() waits for attempts in flight.
_STOP_S = 2.0
_USER_AGENT = "tensorgate-webhooks/1"


class Webhooks:
    """Checks callbacks at Submit; delivers them once jobs finish."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.allow = AllowList(config.webhook_allow)
        self.secrets = Secrets(Path(config.webhook_secrets) if config.webhook_secrets else None)
        self._max_attempts = max(config.webhook_max_attempts, 1)
        self._window_s = config.webhook_window_s
        self._max_body = config.webhook_max_body_bytes
        self._timeout_s = config.webhook_timeout_s
        self._base_s = config.webhook_retry_base_s
        self._slots = max(config.webhook_max_connections, 1)
        self._metrics = metrics
        # A lease outlasting one attempt (its timeout), with room to record the outcome.
        self._lease_s = self._timeout_s + 2.0
        self._store: JobStore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._free = asyncio.Event()

    def check(self, callback: Callback, tenant: str) -> None:
        """At Submit: the URL is allowed and the tenant's webhooks can be signed."""
        self.allow.check(callback.url)
        if self.secrets.key(tenant) is None:
            raise FailedPrecondition(
                f"webhooks for tenant '{tenant}' cannot be signed: the server has no secret for "
                "it (--webhook-secrets, a line for the tenant or for *)"
            )

    async def start(self, store: JobStore) -> None:
        self._store = store
        connector = aiohttp.TCPConnector(
            limit=self._slots,
            limit_per_host=max(self._slots // 4, 1),
            resolver=GuardedResolver(self.allow, DefaultResolver()),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers={"User-Agent": _USER_AGENT},
            trust_env=False,  # no proxy from the environment: the allow list is the policy
        )
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self, flush_s: float = 0.0) -> None:
        """Stops taking deliveries; attempts in flight get a moment to end (one cut short is
        due again after its lease, here or elsewhere). flush_s: first, up to this long for what
        is due now to be attempted (a private store's deliveries die with the process)."""
        store = self._store
        deadline = time.monotonic() + flush_s
        while (
            store is not None
            and self._task is not None
            and (self._attempts or store.deliveries_due.is_set())
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=_STOP_S)
        if self._attempts:
            await asyncio.wait(list(self._attempts), timeout=_STOP_S)
            for task in self._attempts:
                task.cancel()
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()

    # --- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        store = self._store
        assert store is not None
        while True:
            free = self._slots - len(self._attempts)
            if free <= 0:
                self._free.clear()
                await self._free.wait()
                continue
            store.deliveries_due.clear()
            try:
                due = await store.due_deliveries(free, self._lease_s)
            except Unavailable as exc:
                log.debug("webhooks: %s", exc)
                await asyncio.sleep(_STORE_RETRY_S)
                continue
            for job in due:
                task = asyncio.create_task(self._deliver(job), name=f"webhook-{job.id}")
                self._attempts.add(task)
                task.add_done_callback(self._done)
            if len(due) < free:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL_S):
                        await store.deliveries_due.wait()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self._free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt failed", exc_info=task.exception())

    async def _deliver(self, job: Job) -> None:
        """One attempt, and its outcome recorded in the store."""
        delivery, callback = job.delivery, job.callback
        assert delivery is not None and callback is not None and self._store is not None
        retry_after_s: float | None = None
        error = ""
        key = self.secrets.key(job.tenant)
        if key is None:
            error = f"no webhook secret for tenant '{job.tenant}' (--webhook-secrets)"
        else:
            error, retry_after_s = await self._post(job, callback, key)
        delivery.attempts += 1
        delivery.last_error = error
        next_at: float | None = None
        if not error:
            delivery.state = DeliveryState.DELIVERED
            outcome = "delivered"
        else:
            next_at = self._next_attempt(job, delivery.attempts, retry_after_s)
            outcome = "retry" if next_at is not None else "failed"
            if next_at is None:
                delivery.state = DeliveryState.FAILED
                log.warning(
                    "job %s: webhook to %s dead-lettered after %d attempt(s): %s",
                    job.id, callback.url, delivery.attempts, error,
                )  # fmt: skip
            else:
                log.info(
                    "job %s: webhook attempt %d failed (%s); next in %.1f s",
                    job.id, delivery.attempts, error, next_at - time.time(),
                )  # fmt: skip
        if self._metrics is not None:
            self._metrics.webhook_attempts.labels(outcome).inc()
        try:
            await self._store.record_delivery(job, next_at)
        except Unavailable as exc:
            # The lease ends and the delivery is due again: at least once holds.
            log.warning("job %s: webhook outcome not recorded: %s", job.id, exc)

    async def _post(self, job: Job, callback: Callback, key: bytes) -> tuple[str, float | None]:
        """POSTs the body; ("", None) on a 2xx, else (why, Retry-After seconds or None)."""
        assert self._session is not None
        body = await _body(job, callback.include_result, self._max_body)
        message_id = f"msg_{job.id}"  # the same for every attempt: receivers de-duplicate on it
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(key, message_id, timestamp, body),
        }
        try:
            async with self._session.post(
                callback.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return "", None
                why = f"the receiver answered HTTP {response.status}"
                if 300 <= response.status < 400:
                    why += " (redirects are not followed)"
                return why, _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            return f"no answer within {self._timeout_s:g} s", None
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:500], None

    def _next_attempt(self, job: Job, attempts: int, retry_after_s: float | None) -> float | None:
        """When to try again, or None when the attempts or the window are used up."""
        if attempts >= self._max_attempts:
            return None
        delay_s = min(self._base_s * 2 ** (attempts - 1), _MAX_BACKOFF_S)
        delay_s *= random.uniform(0.5, 1.0)  # jitter: a receiver's outage does not synchronize
        if retry_after_s is not None:
            delay_s = max(delay_s, retry_after_s)
        next_at = time.time() + delay_s
        if next_at > (job.finished_at or time.time()) + self._window_s:
            return None
        return next_at


# --- the body -------------------------------------------------------------------------------------


async def _body(job: Job, include_result: bool, max_bytes: int) -> bytes:
    outputs = job.outputs if include_result else None
    size = sum(a.nbytes for a in outputs.values()) if outputs else 0
    if size > _ENCODE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(body, job, include_result, max_bytes)
    return body(job, include_result, max_bytes)


def body(job: Job, include_result: bool, max_bytes: int) -> bytes:
    """The JSON a webhook carries for a finished job."""
    status = job.status.value
    document: dict[str, Any] = {
        "type": f"job.{status.lower()}",
        "timestamp": _iso(job.finished_at),
        "job_id": job.id,
        "model": job.model,
        "status": status,
        "request_id": job.request_id,
        "attempts": job.attempts,
        "error": (
            {"code": job.error.code, "message": str(job.error)} if job.error is not None else None
        ),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "outputs": None,
    }
    fetch = {"rpc": "tensorgate.v1.Inference/GetResult", "job_id": job.id}
    if include_result and job.outputs is not None:
        # A cheap lower bound first (a digit and a comma an element): no list of millions of
        # floats is built for a body that cannot fit.
        elements = sum(a.size for a in job.outputs.values())
        reason = f"the outputs do not fit --webhook-max-body-bytes ({max_bytes})"
        if 2 * elements <= max_bytes:
            document["outputs"] = [_tensor(name, a) for name, a in job.outputs.items()]
            try:
                encoded = _dumps(document)
                if len(encoded) <= max_bytes:
                    return encoded
            except ValueError:  # NaN or infinity: JSON has no way to write them
                reason = "the outputs hold NaN or infinity, which JSON cannot carry"
            document["outputs"] = None
        document["result"] = {**fetch, "reason": reason}
    elif job.outputs is not None or include_result:
        document["result"] = fetch
    return _dumps(document)


def _tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """A KServe v2 JSON tensor."""
    return {
        "name": name,
        "datatype": datatype_of(array.dtype),
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }


def _dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), allow_nan=False, default=str).encode()


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(when.timestamp() - time.time(), 0.0)
    return None
