"""The thread an instance runs its blocking calls on, one at a time, in order.

A daemon thread rather than a ThreadPoolExecutor: the pool's threads are joined at interpreter
exit, so one engine call that never returns would hold the process long after SIGTERM. A worker
the watchdog gave up on is abandoned and dies with the process.

A call from the event loop (start) gets a future of that loop, which the thread settles with one
call_soon_threadsafe; a blocking caller (call, submit) gets a concurrent future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tensorgate.server.futures import settle_error, settle_result

log = logging.getLogger(__name__)

T = TypeVar("T")


class _ThreadReply:
    """A concurrent future, for a caller that blocks on it."""

    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self.future = future

    def running(self) -> bool:
        return self.future.set_running_or_notify_cancel()

    def ok(self, result: Any) -> None:
        self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        self.future.set_exception(error)

    def cancel(self) -> None:
        self.future.cancel()


class _LoopReply:
    """A future of an event loop, settled on that loop (nothing else is thread-safe there)."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.loop, self.future = loop, future

    def running(self) -> bool:
        return not self.future.done()  # cancelled before it started: skipped

    def ok(self, result: Any) -> None:
        self._post(settle_result, result)

    def fail(self, error: BaseException) -> None:
        self._post(settle_error, error)

    def cancel(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.future.cancel)

    def _post(self, settle: Callable[[asyncio.Future[Any], Any], bool], value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(settle, self.future, value)


_Call = tuple[Callable[[], Any], _ThreadReply | _LoopReply]


class Worker:
    """Runs submitted calls on one daemon thread; results come back as futures."""

    def __init__(self, name: str, initializer: Callable[[], None] | None = None) -> None:
        """initializer runs first on the thread (e.g. cudaSetDevice, which is per thread)."""
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._initializer = initializer
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError(f"worker {self.name} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((fn, _ThreadReply(future)))
        return future

    def start(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """From the event loop: runs fn on the thread; the loop's future holds its outcome."""
        if self._closed:
            raise RuntimeError(f"worker {self.name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((fn, _LoopReply(loop, future)))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the thread and blocks until it returns (load-time warm-up)."""
        return self.submit(fn).result()

    def abandon(self) -> None:
        """Gives up on a thread stuck in a call: it cannot be killed, so it is left to finish
        (or not) on its own; calls still queued are cancelled."""
        self._closed = True
        self._calls.put(None)

    def close(self, timeout_s: float | None = None) -> bool:
        """Lets queued calls finish and stops the thread; False if it did not end in time."""
        self._closed = True
        self._calls.put(None)
        if self._thread is threading.current_thread():
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except BaseException as exc:  # every later call reports the cause
                self._fail_all(exc)
                return
        while True:
            item = self._calls.get()
            if item is None:
                self._cancel_queued()
                return
            fn, reply = item
            if not reply.running():
                continue
            try:
                result = fn()
            except BaseException as exc:
                reply.fail(exc)
            else:
                reply.ok(result)

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].cancel()

    def _fail_all(self, error: BaseException) -> None:
        log.error("worker %s could not start: %s", self.name, error)
        while True:
            item = self._calls.get()
            if item is None:
                self._cancel_queued()
                return
            if item[1].running():
                item[1].fail(error)
