"""Jobs in Redis, shared by every replica that uses the same Redis, outliving any one process.

Layout (every key starts with tg:, so one Redis database can be inspected at a glance):

    tg:job:<id>        hash: model, tenant, rid (request id), status, attempts, created and
                       finished (ms since the epoch), code and message (the error), request (the
                       inputs, codec.py), outputs, entry (its stream entry), owner, tp, idem,
                       ev (its event count), started, the webhook's cb, cbr, hs, hn, he; a field
                       with nothing to say yet is absent
    tg:q:<model>       stream of job ids, read through the consumer group "tensorgate"; each
                       replica is one consumer. XLEN is the model's unfinished jobs.
    tg:key:<tenant>:<key>  the job an idempotency key names
    tg:jobs            sorted set: job id by creation time (ListJobs, newest first)
    tg:done            sorted set: finished job id by finish time (expiry, the bound on results)
    tg:dead            stream: jobs whose attempts ran out (dead letters), for operators
    tg:count           hash: finished jobs kept, by status (the metrics)
    tg:pending         hash: unfinished jobs by tenant (--max-pending-jobs-per-tenant)
    tg:finished        pub/sub channel: "<id> <STATUS>" lines, one message for the jobs that
                       one script call finished
    tg:ev:<id>         pub/sub channel: each change of the job's state, "seq|status|attempt|retry|
                       ms|code|message" (seq: the hash's `ev` counter); subscribed only by
                       replicas that have a watcher of the job
    tg:hooks           sorted set: job id by the time its webhook is due; a replica attempting
                       one moves it a lease ahead, so a replica that dies leaves it to the others
    tg:hooks:dead      stream: webhooks whose attempts or time ran out

Every change of state is one Lua script (redis_scripts.py), so racing replicas agree. A job is
acknowledged (XACK) only once its outcome is stored. A replica that dies leaves its jobs in the
group's pending list; live replicas renew the lease on what they hold every lease/3 and take over
entries idle longer than the lease (XAUTOCLAIM). Execution is therefore at least once: a job whose
replica died mid-run runs again; `attempts` counts the runs, and a run finishing after another
already recorded the job is discarded (counted in tg:stats duplicate_runs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from tensorgate.server.config import ConfigError
from tensorgate.server.errors import ResourceExhausted, Unavailable
from tensorgate.server.jobs import codec
from tensorgate.server.jobs.batched import Batched
from tensorgate.server.jobs.job import Job, JobStatus
from tensorgate.server.jobs.redis_calls import LOST as _LOST  # one definition, shared
from tensorgate.server.jobs.redis_calls import DirectCalls
from tensorgate.server.jobs.redis_scripts import (
    CANCEL,
    CLAIM_MANY,
    DELETE,
    FINISH_MANY,
    HOOK_DONE,
    HOOKS_DUE,
    PREFIX,
    RELEASE,
    RETRY,
    SUBMIT_MANY,
    SWEEP,
)
from tensorgate.server.records import Callback, Cursor, Delivery, DeliveryState, JobEvent

log = logging.getLogger(__name__)

GROUP = "tensorgate"
_FIELDS = (
    "model",
    "tenant",
    "rid",
    "status",
    "attempts",
    "created",
    "finished",
    "code",
    "message",
    "outputs",
    "started",
    "cb",
    "cbr",
    "hs",
    "hn",
    "he",
    "ev",
)
# How often availability is checked; a failed check turns the jobs health name NOT_SERVING.
_PING_EVERY_S = 1.0
# A long-poll re-reads its job this often even without a wake-up (a missed message's bound).
_WAIT_SLICE_S = 5.0
# ListJobs reads at most this many recent jobs looking for matches.
_FIND_SCAN = 5000
_SWEEP_BATCH = 1000
# Jobs remembered as submitted here and unfinished, and as finished here (for _KEEP_FINISHED_S).
_KNOWN_PENDING = 100_000
_KNOWN_FINISHED = 10_000
_KEEP_FINISHED_S = 5.0
# The longest a call to Redis waits for its answer (beyond a blocking read's own wait).
_CALL_TIMEOUT_S = 5.0
# Connections to Redis at most (besides the one subscription); more calls at once wait their turn.
_MAX_CONNECTIONS = 64
# The longest close() waits for the store's own tasks to end.
_CLOSE_S = 2.0
# Under load (batches hold several on average), a batch of Submits or outcomes waits this long for
# more before it goes: fewer script calls, each with a fixed cost in Redis and here.
_LINGER_S = 0.002
_PENDING = JobStatus.PENDING.value


class RedisJobStore:
    """The JobStore on Redis (see the module doc for the layout and guarantees)."""

    shared = True

    def __init__(
        self,
        url: str,
        max_pending: int,
        ttl_s: float,
        max_finished: int,
        max_attempts: int,
        lease_s: float,
        max_per_tenant: int = 0,
    ) -> None:
        parts = urlsplit(url)
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"
        password = None if parts.password else os.environ.get("REDIS_PASSWORD")
        try:
            # Any: redis-py types each reply as a union of every protocol's shapes.
            # A bounded pool: a burst of calls (thousands of watchers opening at once) waits for
            # a connection instead of opening one each.
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=_MAX_CONNECTIONS,
                timeout=5.0,
                password=password,
                socket_timeout=_CALL_TIMEOUT_S,
                socket_connect_timeout=2.0,
                # One quick retry covers a connection Redis closed (a restart); more would hold
                # Submit for seconds while Redis is down.
                retry=Retry(NoBackoff(), 1),
            )
            self._client: Any = aioredis.Redis(connection_pool=pool)
            # The job path's own calls (Submits, reads and claims, outcomes): see redis_calls.py.
            self._direct = DirectCalls(pool, timeout_s=_CALL_TIMEOUT_S)
        except ValueError as exc:
            raise ConfigError(f"--job-store {url!r}: {exc}") from None
        self._pubsub_client: Any = aioredis.from_url(
            url, password=password, socket_timeout=None, socket_connect_timeout=2.0
        )
        self._max_pending = max_pending
        self._max_per_tenant = max_per_tenant
        self._ttl_ms = int(ttl_s * 1000)
        self._max_finished = max_finished
        self._max_attempts = max_attempts
        self._lease_ms = int(lease_s * 1000)
        self._reclaim_every_s = max(min(lease_s / 4, 5.0), 0.05)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.available = False
        self._checked = False
        self._models: list[str] = []
        self._next_reclaim: dict[str, float] = {}
        self._busy: set[str] = set()  # models whose last take found several entries
        self._waiters: dict[str, set[asyncio.Event]] = {}
        # Watchers by job id (each a queue of raw events; None: read the job again), and the
        # subscriptions being confirmed.
        self._watchers: dict[str, list[asyncio.Queue[bytes | None]]] = {}
        self._confirming: dict[str, asyncio.Event] = {}
        self._pubsub: Any = None
        self.deliveries_due = asyncio.Event()
        self._counts: dict[str, int] = dict.fromkeys((s.value for s in JobStatus), 0)
        self._on_available: Callable[[bool], None] = lambda _: None
        self._on_cancelled: Callable[[str], None] = lambda _: None
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        client = self._client
        self._cancel = client.register_script(CANCEL)
        self._release = client.register_script(RELEASE)
        self._sweep = client.register_script(SWEEP)
        self._retry = client.register_script(RETRY)
        self._delete = client.register_script(DELETE)
        self._hooks_due = client.register_script(HOOKS_DUE)
        self._hook_done = client.register_script(HOOK_DONE)
        self._submit_many = client.register_script(SUBMIT_MANY)
        self._claim_many = client.register_script(CLAIM_MANY)
        self._finish_many = client.register_script(FINISH_MANY)
        # The Submits and the outcomes of one loop iteration, sent as one script call each.
        self._submits = Batched(self._submit_batch, _LINGER_S)
        self._finishes = Batched(self._finish_batch, _LINGER_S)
        # Jobs submitted here and not yet heard finished (id -> tenant), and jobs this process
        # recorded as finished, kept briefly: a long-poll here reads neither from Redis.
        self._pending_here: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Jobs whose outcome this process is recording now (a waiter here waits for it).
        self._finishing: set[str] = set()
        self._finished_here: collections.OrderedDict[str, tuple[float, Job]] = (
            collections.OrderedDict()
        )

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(
        self,
        models: list[str],
        on_available: Callable[[bool], None],
        on_cancelled: Callable[[str], None],
    ) -> None:
        """Starts the availability check (it prepares the streams once Redis answers) and the
        listener for finished jobs. Redis being down does not stop the server from starting."""
        self._models = list(models)
        self._checked = False  # a first failed check is logged too
        self._on_available, self._on_cancelled = on_available, on_cancelled
        on_available(False)
        await self._check()
        self._tasks.append(asyncio.create_task(self._watch(), name="redis-job-store-check"))
        log.info("jobs in Redis at %s as consumer %s", self.where, self.consumer)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        # Bounded: shutdown must not hang on a Redis call that ignores its cancellation.
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_S)
        await self._direct.close()
        with contextlib.suppress(Exception):
            await self._client.aclose()
            await self._client.connection_pool.disconnect()  # a pool of our own: closed here
        with contextlib.suppress(Exception):
            await self._pubsub_client.aclose()

    async def add_model(self, model: str) -> None:
        if model not in self._models:
            self._models.append(model)
        if self.available:
            with self._reachable():
                await self._prepare()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_PING_EVERY_S)
            await self._check()
            _keep_cancellation()

    async def _check(self) -> None:
        """Pings Redis; on a change of availability tells the server, and on recovery prepares
        the streams (Redis may have restarted empty) and restarts the listener."""
        try:
            async with asyncio.timeout(_PING_EVERY_S):
                await self._client.ping()
                if not self.available:
                    await self._prepare()
            ok = True
        except (redis.exceptions.RedisError, OSError) as exc:
            _keep_cancellation()
            ok = False
            if self.available or not self._checked:
                log.error(
                    "job store: Redis at %s is unreachable%s: %s; Submit answers UNAVAILABLE "
                    "until it is (Predict and StreamPredict work meanwhile)",
                    self.where, "" if self._checked else " at start-up", exc or type(exc).__name__,
                )  # fmt: skip
        self._checked = True
        if ok == self.available:
            return
        self.available = ok
        if ok:
            log.info("job store: Redis at %s is reachable", self.where)
            self._restart_listener()
        self._on_available(ok)

    async def _prepare(self) -> None:
        for model in self._models:
            try:
                await self._client.xgroup_create(_stream(model), GROUP, id="0", mkstream=True)
            except Exception as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self._refresh_counts()

    def _restart_listener(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        self._listener = asyncio.create_task(self._listen(), name="redis-job-listener")

    async def _listen(self) -> None:
        """Wakes the long-polls of a job when any replica finishes it; tells the job lanes of
        cancellations (a job it holds stops here)."""
        while True:
            _keep_cancellation()
            pubsub = self._pubsub_client.pubsub()
            try:
                followed = [_events(job_id) for job_id in self._watchers]
                await pubsub.subscribe(PREFIX + "finished", *followed)
                self._pubsub = pubsub
                self._pending_here.clear()  # finishes may have gone unheard meanwhile
                self._listening.set()
                self._wake_all()  # anything finished while not listening is seen now
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "subscribe":
                        confirmed = self._confirming.pop(message["channel"].decode(), None)
                        if confirmed is not None:
                            confirmed.set()
                        continue
                    if kind != "message":
                        continue
                    channel = message["channel"]
                    if channel.startswith(_EVENTS):
                        for queue in self._watchers.get(channel[len(_EVENTS) :].decode(), ()):
                            queue.put_nowait(message["data"])
                        continue
                    for line in message["data"].decode().split("\n"):
                        job_id, _, status = line.partition(" ")
                        self._pending_here.pop(job_id, None)
                        for event in self._waiters.get(job_id, ()):
                            event.set()
                        if status == JobStatus.CANCELLED.value:
                            self._on_cancelled(job_id)
            except _LOST as exc:
                _keep_cancellation()
                log.debug("job listener: %s", exc)
            finally:
                self._pubsub = None
                self._listening.clear()
                self._wake_all()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(_PING_EVERY_S / 2)

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)  # events may have been missed: read the job again

    @contextlib.contextmanager
    def _reachable(self, cancellable: bool = True) -> Iterator[None]:
        """Turns a lost connection into UNAVAILABLE naming Redis. A caller that was cancelled
        during the call ends with CancelledError even where redis-py dropped the cancellation
        (on Python 3.11 asyncio.wait_for, which redis-py writes commands through, returns
        normally when a cancellation meets the write's completion), so a stopping loop stops.
        cancellable=False (take): the call's result is returned all the same; its jobs are
        already claimed, and the job lanes hand them back."""
        try:
            yield
        except _LOST as exc:
            _keep_cancellation()
            raise Unavailable(
                f"the job store (Redis at {self.where}) is unreachable: {exc}; "
                "Predict and StreamPredict still work"
            ) from None
        if cancellable:
            _keep_cancellation()

    # --- accepting and reading ------------------------------------------------------------------

    async def add(self, job: Job) -> tuple[Job, bool, int]:
        """Joins the Submits of this loop iteration: they go to Redis as one script call."""
        assert job.payload is not None
        key = _key(job.tenant, job.idempotency_key) if job.idempotency_key else ""
        # Only the fields with something to say: HMGET reads a missing one as nil, which every
        # reader (the scripts, _job_from) takes for "" (fewer values for Redis and Lua to move).
        fields: list[Any] = [
            "model", job.model, "tenant", job.tenant, "rid", job.request_id, "status", _PENDING,
            "attempts", "0", "created", int(job.created_at * 1000), "ev", "1",
            "request", codec.encode_request(job.payload),
        ]  # fmt: skip
        if job.traceparent:
            fields += ("tp", job.traceparent)
        callback = job.callback
        if callback is not None:
            fields += ("cb", callback.url, "cbr", "1" if callback.include_result else "",
                       "hs", DeliveryState.PENDING.value, "hn", "0")  # fmt: skip
        item = (job.id, key, job.model, job.tenant, len(fields), *fields)
        outcome, value = await self._submits.call(item)
        if outcome == 0:
            existing = await self.get(value.decode(), job.tenant)
            if existing is not None:
                return existing, True, 0
            raise Unavailable("the job its idempotency key names just expired; submit again")
        if outcome == -2:
            raise ResourceExhausted(
                f"tenant '{job.tenant}' has {int(value)} unfinished jobs, its limit "
                "(--max-pending-jobs-per-tenant); retry later",
                retry_after_s=1.0,
            )
        if outcome == -1:
            raise ResourceExhausted(
                f"{int(value)} jobs are pending, the limit is {self._max_pending}; retry later",
                retry_after_s=1.0,
            )
        job.payload = None  # stored; whoever takes the job reads it back
        if job.callback is not None:
            job.delivery = Delivery()
        self._pending_here[job.id] = job.tenant
        while len(self._pending_here) > _KNOWN_PENDING:
            self._pending_here.popitem(last=False)
        return job, False, int(value)

    async def _submit_batch(self, batch: list[Any]) -> list[Any]:
        now_ms = _now_ms()
        args: list[Any] = [
            PREFIX, now_ms, self._ttl_ms, self._max_pending, self._max_per_tenant,
            len(self._models), *self._models, len(batch),
        ]  # fmt: skip
        for item in batch:
            args += item
        with self._reachable():
            replies = await self._direct.script(self._submit_many, args)
        return [(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    async def get(self, job_id: str, tenant: str = "") -> Job | None:
        with self._reachable():
            values = await self._client.hmget(_job(job_id), _FIELDS)
        fields = dict(zip(_FIELDS, values, strict=True))
        if fields["status"] is None or fields["tenant"].decode() != tenant:
            return None
        job = _job_from(job_id, fields, self._ttl_ms)
        if job.expires_at is not None and job.expires_at <= time.time():
            return None
        return job

    async def wait(self, job_id: str, tenant: str, timeout_s: float) -> Job | None:
        """Registers for the job's finish message before each read, so a finish between the
        read and the wait is not missed."""
        event = asyncio.Event()
        waiters = self._waiters.setdefault(job_id, set())
        waiters.add(event)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                event.clear()
                left = deadline - time.monotonic()
                finished = self._finished_locally(job_id, tenant)
                if finished is not None:
                    return finished  # recorded here a moment ago: what a read would say
                if left > 0 and (
                    self._pending_locally(job_id, tenant) or job_id in self._finishing
                ):
                    # Submitted here and not finished anywhere yet (a finish is always
                    # published, and this process is listening): nothing to read.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(left, _WAIT_SLICE_S)):
                            await event.wait()
                    continue
                job = await self.get(job_id, tenant)
                left = deadline - time.monotonic()
                if job is None or job.status.finished or left <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, _WAIT_SLICE_S)):
                        await event.wait()
        finally:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(job_id, None)

    async def find(
        self, status: JobStatus | None, limit: int, tenant: str = "", after: Cursor | None = None
    ) -> list[Job]:
        found: list[Job] = []
        now = time.time()
        page = max(limit * 2, 100)
        # Newest first: by creation time, then id, both descending (ZREVRANGEBYSCORE's order).
        top: Any = "+inf" if after is None else round(after[0] * 1000)
        with self._reachable():
            for start in range(0, _FIND_SCAN, page):
                scored = await self._client.zrevrangebyscore(
                    PREFIX + "jobs", top, "-inf", start=start, num=page, withscores=True
                )
                if not scored:
                    break
                ids = [
                    job_id
                    for job_id, score in scored
                    if after is None or score < top or job_id.decode() < after[1]
                ]
                if not ids:
                    continue
                async with self._client.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hmget(_job(job_id.decode()), _FIELDS)
                    rows = await pipe.execute()
                for job_id, values in zip(ids, rows, strict=True):
                    fields = dict(zip(_FIELDS, values, strict=True))
                    if fields["status"] is None or fields["tenant"].decode() != tenant:
                        continue
                    job = _job_from(job_id.decode(), fields, self._ttl_ms)
                    if status is not None and job.status is not status:
                        continue
                    if job.expires_at is not None and job.expires_at <= now:
                        continue
                    found.append(job)
                    if len(found) >= limit:
                        return found
        return found

    async def events(self, job_id: str, tenant: str) -> AsyncIterator[JobEvent]:
        """Subscribes to the job's channel (confirmed) before reading it, so no change falls
        between the read and the first message; the event number drops what the read already
        showed. A lost subscription (or a quiet while) reads the job again."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        await self._follow(job_id, queue)
        try:
            job, seq = await self._read(job_id, tenant)
            if job is None:
                return
            yield _snapshot(job)
            while not job.status.finished:
                try:
                    async with asyncio.timeout(_WAIT_SLICE_S):
                        raw = await queue.get()
                except TimeoutError:
                    raw = None
                if raw is None:
                    current, now_seq = await self._read(job_id, tenant)
                    if current is None:
                        return
                    if now_seq > seq:
                        job, seq = current, now_seq
                        yield _snapshot(job)
                    continue
                number, event = _parse_event(job, raw)
                if number <= seq:
                    continue
                seq = number
                job.status = event.status
                yield event
        finally:
            await self._unfollow(job_id, queue)

    async def _read(self, job_id: str, tenant: str) -> tuple[Job | None, int]:
        with self._reachable():
            values = await self._client.hmget(_job(job_id), _FIELDS)
        fields = dict(zip(_FIELDS, values, strict=True))
        if fields["status"] is None or fields["tenant"].decode() != tenant:
            return None, 0
        return _job_from(job_id, fields, self._ttl_ms), int(fields["ev"] or 0)

    async def _follow(self, job_id: str, queue: asyncio.Queue[bytes | None]) -> None:
        queues = self._watchers.setdefault(job_id, [])
        queues.append(queue)
        if len(queues) > 1:
            return
        channel = _events(job_id)
        confirmed = self._confirming[channel] = asyncio.Event()
        try:
            if self._pubsub is None:  # starting, or reconnecting: give it a moment
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_PING_EVERY_S * 2):
                        await self._listening.wait()
            if self._pubsub is None:
                raise Unavailable(
                    f"the job store (Redis at {self.where}) is unreachable; watch again later"
                )
            with self._reachable():
                await self._pubsub.subscribe(channel)
                try:
                    async with asyncio.timeout(_PING_EVERY_S * 5):
                        await confirmed.wait()
                except TimeoutError:
                    raise Unavailable(
                        f"the job store (Redis at {self.where}) did not confirm the watch; "
                        "watch again"
                    ) from None
        except BaseException:
            await self._unfollow(job_id, queue)
            raise
        finally:
            self._confirming.pop(channel, None)

    async def _unfollow(self, job_id: str, queue: asyncio.Queue[bytes | None]) -> None:
        queues = self._watchers.get(job_id, [])
        if queue in queues:
            queues.remove(queue)
        if queues:
            return
        self._watchers.pop(job_id, None)
        if self._pubsub is not None:
            with contextlib.suppress(*_LOST, redis.exceptions.RedisError):
                await self._pubsub.unsubscribe(_events(job_id))

    async def delete(self, job_id: str, tenant: str = "") -> Job | None:
        job = await self.get(job_id, tenant)
        if job is None or not job.status.finished:
            return job
        with self._reachable():
            await self._delete(keys=[_job(job_id)], args=[PREFIX, tenant, job_id])
        self._finished_here.pop(job_id, None)
        return job

    async def cancel(self, job_id: str, tenant: str = "") -> Job | None:
        with self._reachable():
            known = await self._cancel(
                keys=[_job(job_id)],
                args=[PREFIX, tenant, _now_ms(), self._ttl_ms, self._max_finished, job_id],
            )
        return await self.get(job_id, tenant) if known else None

    # --- running --------------------------------------------------------------------------------

    async def take(self, model: str, limit: int, wait_s: float) -> list[Job]:
        """Under load one script call reads and claims; otherwise (the last take found one entry
        or none) a blocking read waits up to wait_s for entries and a script call claims them."""
        stream = _stream(model)
        busy = model in self._busy
        self._busy.discard(model)
        with self._reachable(cancellable=False):
            taken: list[tuple[str, str]] = []  # (entry id, job id), when read here
            now = time.monotonic()
            if now >= self._next_reclaim.get(model, 0.0):
                # Jobs of replicas that stopped renewing their lease.
                self._next_reclaim[model] = now + self._reclaim_every_s
                _, claimed, _ = await self._client.xautoclaim(
                    stream, GROUP, self.consumer, self._lease_ms, "0-0", count=limit
                )
                taken = [(entry_id.decode(), fields[b"id"].decode())
                         for entry_id, fields in claimed if fields]  # fmt: skip
                if taken:
                    log.info("took over %d job(s) of %s from a silent replica", len(taken), model)
            try:
                # The last take found several: try reading and claiming in one call.
                claims = await self._claim(model, taken, limit) if taken or busy else []
                if not claims and not taken:
                    reply = await self._direct.command(
                        "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", limit,
                        "BLOCK", max(int(wait_s * 1000), 1), "STREAMS", stream, ">",
                        blocks_s=wait_s,
                    )  # fmt: skip
                    taken = [(entry_id.decode(), job_id.decode())
                             for entry_id, job_id in _read_entries(reply)]  # fmt: skip
                    if taken:
                        claims = await self._claim(model, taken, limit)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._prepare()  # Redis lost the group (restarted without AOF)
                return []
        if len(claims) > 3:  # more than one entry: jobs are arriving faster than they are taken
            self._busy.add(model)
        jobs = []
        for i in range(0, len(claims), 3):
            entry_id, job_id, claim = claims[i : i + 3]
            if not claim:
                continue
            model_name, tenant, rid, attempts, created, blob, traceparent, started, url, whole = (
                claim
            )
            tenant_name = tenant.decode()
            callback = Callback(url.decode(), whole == b"1") if url else None
            jobs.append(
                Job(
                    id=job_id.decode(),
                    model=model_name.decode(),
                    tenant=tenant_name,
                    request_id=rid.decode(),
                    status=JobStatus.RUNNING,
                    attempts=int(attempts),
                    created_at=int(created) / 1000,
                    payload=codec.decode_request(model_name.decode(), tenant_name, blob),
                    receipt=entry_id.decode(),
                    traceparent=traceparent.decode() if traceparent else "",
                    started_at=int(started) / 1000 if started else None,
                    callback=callback,
                    delivery=Delivery() if callback is not None else None,
                )
            )
        return jobs

    async def _claim(self, model: str, taken: list[tuple[str, str]], limit: int) -> list[Any]:
        """CLAIM_MANY of the entries read here, or (none) of up to limit new ones it reads."""
        args: list[Any] = [
            PREFIX, GROUP, self.consumer, self._max_attempts, _now_ms(), self._ttl_ms,
            self._max_finished, model, limit, len(taken),
        ]  # fmt: skip
        for pair in taken:
            args += pair
        claims: list[Any] = await self._direct.script(self._claim_many, args)
        return claims

    async def renew(self, jobs: list[Job]) -> None:
        by_model: dict[str, list[str]] = {}
        for job in jobs:
            if job.receipt:
                by_model.setdefault(job.model, []).append(job.receipt)
        with self._reachable():
            for model, receipts in by_model.items():
                await self._client.xclaim(
                    _stream(model), GROUP, self.consumer, 0, receipts, justid=True
                )

    async def retrying(self, job: Job) -> None:
        error = job.error
        with self._reachable():
            await self._retry(
                keys=[_job(job.id)],
                args=[
                    PREFIX,
                    job.id,
                    job.attempts,
                    error.code if error is not None else "",
                    str(error) if error is not None else "",
                    _now_ms(),
                ],
            )

    async def finish(self, job: Job) -> Job:
        """Joins the outcomes recorded in this loop iteration: one script call for them all."""
        self._finishing.add(job.id)
        try:
            return await self._finish(job)
        finally:
            self._finishing.discard(job.id)
            for event in self._waiters.get(job.id, ()):
                event.set()  # a waiter here that heard of the finish first looks again now

    async def _finish(self, job: Job) -> Job:
        error = job.error
        finished_ms = int((job.finished_at or time.time()) * 1000)
        outputs = codec.encode_outputs(job.outputs) if job.outputs is not None else b""
        final = await self._finishes.call(
            (
                job.receipt, job.status.value, finished_ms,
                error.code if error is not None else "", str(error) if error is not None else "",
                job.id, job.model, outputs,
            )
        )  # fmt: skip
        final_status = final.decode()
        if final_status == "NOT_OURS":
            log.info("job %s: handed on to another replica; the result here is dropped", job.id)
            stored = await self.get(job.id, job.tenant)
            return stored if stored is not None else job
        if final_status != job.status.value and final_status != "GONE":
            # Cancelled meanwhile (or recorded by another replica's run): that stands.
            stored = await self.get(job.id, job.tenant)
            if stored is not None:
                return stored
        job.finished_at = finished_ms / 1000  # as stored: what a read returns
        job.expires_at = finished_ms / 1000 + self._ttl_ms / 1000
        if final_status == job.status.value:
            self._remember_finished(job)
        if job.callback is not None:
            self.deliveries_due.set()
        return job

    async def _finish_batch(self, batch: list[Any]) -> list[Any]:
        args: list[Any] = [
            PREFIX, GROUP, self._ttl_ms, self._max_finished, self.consumer, len(batch),
        ]  # fmt: skip
        for item in batch:
            args += item
        with self._reachable():
            replies: list[Any] = await self._direct.script(self._finish_many, args)
        return replies

    # --- what this process knows without asking Redis ------------------------------------------

    def _remember_finished(self, job: Job) -> None:
        """A job this process recorded as finished: its waiters here need not read it back."""
        self._pending_here.pop(job.id, None)
        self._finished_here[job.id] = (time.monotonic() + _KEEP_FINISHED_S, job)
        while len(self._finished_here) > _KNOWN_FINISHED:
            self._finished_here.popitem(last=False)

    def _finished_locally(self, job_id: str, tenant: str) -> Job | None:
        kept = self._finished_here.get(job_id)
        if kept is None:
            return None
        until, job = kept
        if until < time.monotonic() or (job.expires_at or 0) <= time.time():
            del self._finished_here[job_id]
            return None
        return job if job.tenant == tenant else None

    def _pending_locally(self, job_id: str, tenant: str) -> bool:
        return self._listening.is_set() and self._pending_here.get(job_id) == tenant

    async def release(self, jobs: list[Job], started: bool) -> None:
        with self._reachable():
            await self._pipelined(
                self._release,
                [
                    (
                        [_job(job.id), _stream(job.model)],
                        [PREFIX, job.receipt, GROUP, self.consumer, "1" if started else "0",
                         job.id, _now_ms()],
                    )
                    for job in jobs
                ],
            )  # fmt: skip
        log.info("handed %d job(s) back to Redis for other replicas", len(jobs))

    async def _pipelined(
        self, script: AsyncScript, calls: list[tuple[list[Any], list[Any]]]
    ) -> list[Any]:
        """One script for many calls in one round trip, each an EVALSHA. (redis-py's own
        pipelined scripts first ask SCRIPT EXISTS, a round trip of its own every time.) A Redis
        that lost its scripts (restarted) gets this one loaded again and the calls repeated: a
        script missing fails every call of the pipeline alike, so none ran."""
        for attempt in (1, 2):
            async with self._client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                try:
                    results: list[Any] = await pipe.execute()
                    return results
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    script.sha = await self._client.script_load(script.script)
        raise AssertionError("unreachable")

    async def abandon(self, reason: str) -> list[Job]:
        return []  # queued jobs stay in Redis for the other replicas

    # --- webhooks -------------------------------------------------------------------------------

    async def due_deliveries(self, limit: int, lease_s: float) -> list[Job]:
        with self._reachable():
            ids = await self._hooks_due(args=[PREFIX, _now_ms(), int(lease_s * 1000), limit])
            if not ids:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(_job(job_id.decode()), _FIELDS)
                rows = await pipe.execute()
        due = []
        for job_id, values in zip(ids, rows, strict=True):
            fields = dict(zip(_FIELDS, values, strict=True))
            if fields["status"] is None:
                continue  # expired meanwhile: HOOK_DONE is not needed, remove() unlisted it
            job = _job_from(job_id.decode(), fields, self._ttl_ms)
            if job.delivery is not None and job.delivery.state is DeliveryState.PENDING:
                due.append(job)
        return due

    async def record_delivery(self, job: Job, next_at: float | None) -> None:
        delivery = job.delivery
        assert delivery is not None
        with self._reachable():
            await self._hook_done(
                keys=[_job(job.id)],
                args=[
                    PREFIX,
                    job.id,
                    delivery.state.value,
                    delivery.attempts,
                    delivery.last_error,
                    "" if next_at is None else int(next_at * 1000),
                    job.model,
                ],
            )

    def queued_here(self) -> int:
        return 0

    # --- housekeeping ---------------------------------------------------------------------------

    async def sweep(self) -> int:
        with self._reachable():
            removed = int(await self._sweep(args=[PREFIX, _now_ms() - self._ttl_ms, _SWEEP_BATCH]))
            await self._refresh_counts()
        return removed

    async def _refresh_counts(self) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(PREFIX + "count")
            for model in self._models:
                pipe.xlen(_stream(model))
                pipe.xpending(_stream(model), GROUP)
            replies = await pipe.execute(raise_on_error=False)
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        if isinstance(replies[0], dict):
            for status, count in replies[0].items():
                if status.decode() in counts:
                    counts[status.decode()] = int(count)
        for length, pending in zip(replies[1::2], replies[2::2], strict=True):
            if isinstance(length, int) and isinstance(pending, dict):
                counts["RUNNING"] += int(pending.get("pending", 0))
                counts["PENDING"] += max(length - int(pending.get("pending", 0)), 0)
        self._counts = counts

    def count_by_status(self) -> dict[str, int]:
        return dict(self._counts)


def _keep_cancellation() -> None:
    """redis-py can turn a cancelled call into a lost-connection error; where one is caught, a
    task that was being cancelled must still end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def _job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


_EVENTS = f"{PREFIX}ev:".encode()


def _events(job_id: str) -> str:
    return f"{PREFIX}ev:{job_id}"


def _snapshot(job: Job) -> JobEvent:
    return JobEvent(
        job_id=job.id,
        model=job.model,
        status=job.status,
        attempt=job.attempts,
        at=job.finished_at or job.started_at or job.created_at,
        error=job.error,
    )


def _parse_event(job: Job, raw: bytes) -> tuple[int, JobEvent]:
    """A message of the job's channel: (its event number, the event)."""
    seq, status, attempt, retry, at_ms, code, message = raw.decode().split("|", 6)
    return int(seq), JobEvent(
        job_id=job.id,
        model=job.model,
        status=JobStatus(status),
        attempt=int(attempt),
        at=int(at_ms) / 1000,
        error=codec.error_from(code, message) if code else None,
        retry=retry == "1",
    )


def _read_entries(reply: Any) -> list[tuple[bytes, bytes]]:
    """XREADGROUP's reply as Redis sends it (RESP2: [[stream, entries]]; RESP3: {stream:
    entries}; nothing read: nil), as (entry id, job id) pairs: each entry's fields are "id" and
    the job's id."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
    return [(entry_id, fields[1]) for entries in streams for entry_id, fields in entries if fields]


def _stream(model: str) -> str:
    return f"{PREFIX}q:{model}"


def _key(tenant: str, key: str) -> str:
    return f"{PREFIX}key:{len(tenant)}:{tenant}:{key}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _job_from(job_id: str, fields: dict[str, Any], ttl_ms: int) -> Job:
    status = JobStatus(fields["status"].decode())
    finished = fields["finished"].decode() if fields["finished"] else ""
    code = fields["code"].decode() if fields["code"] else ""
    error = codec.error_from(code, fields["message"].decode()) if code else None
    outputs = codec.decode_outputs(fields["outputs"]) if fields["outputs"] else None
    finished_at = int(finished) / 1000 if finished else None
    started = fields["started"].decode() if fields["started"] else ""
    url = fields["cb"].decode() if fields["cb"] else ""
    callback = Callback(url, fields["cbr"] == b"1") if url else None
    delivery = None
    if callback is not None:
        delivery = Delivery(
            DeliveryState(fields["hs"].decode()),
            int(fields["hn"] or 0),
            fields["he"].decode() if fields["he"] else "",
        )
    return Job(
        id=job_id,
        model=fields["model"].decode(),
        tenant=fields["tenant"].decode(),
        request_id=fields["rid"].decode(),
        status=status,
        attempts=int(fields["attempts"]),
        created_at=int(fields["created"]) / 1000,
        started_at=int(started) / 1000 if started else None,
        finished_at=finished_at,
        callback=callback,
        delivery=delivery,
        expires_at=None if finished_at is None else finished_at + ttl_ms / 1000,
        # A retried job keeps its last error while it runs again; only a finished one shows it.
        error=error if status.finished else None,
        outputs=outputs,
    )
