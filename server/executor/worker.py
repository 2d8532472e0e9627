"""The thread an instance runs its blocking calls on, one at a time, in order.

A daemon thread rather than a ThreadPoolExecutor: the pool's threads are joined at interpreter
exit, so one engine call that never returns would hold the process long after SIGTERM. A worker
the watchdog gave up on is abandoned and dies with the process.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_Call = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


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
        self._calls.put((fn, future))
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
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

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
            if item[1].set_running_or_notify_cancel():
                item[1].set_exception(error)
