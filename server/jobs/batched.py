"""Calls to one service, sent as few round trips as the load allows: each caller awaits its own
answer, and the calls that arrive while a batch is on its way go together in the next one (the
Redis job store's Submits and outcomes).

With no batch in flight, a call goes at the end of the loop iteration it was made in (call_soon),
so a lone call costs one loop turn; under load, the calls made during one round trip share the
next. `linger_s`: while batches hold more than one call on average (calls are arriving together),
the next waits that long for company before it goes: fewer, fuller round trips for a little
latency, paid only under load (one caller at a time makes batches of one, which ends lingering).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tensorgate.server.futures import settle_error, settle_result

# Lingering starts once batches average this many calls, smoothed with this weight per batch.
_LINGER_ABOVE = 1.25
_SMOOTHING = 0.2


class Batched:
    def __init__(
        self, send: Callable[[list[Any]], Awaitable[list[Any]]], linger_s: float = 0.0
    ) -> None:
        """send(items) -> one answer per item, in order; what it raises, every caller gets."""
        self._send = send
        self._linger_s = linger_s
        self._waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._in_flight: asyncio.Task[None] | None = None
        self._mean_size = 1.0  # batch size, smoothed over the last several batches

    async def call(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((item, future))
        if not self._scheduled and self._in_flight is None:
            self._schedule(loop)
        # Awaited directly: a caller that goes away cancels only its own future, which the
        # batch then finds settled (its item is sent all the same).
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: bool = False) -> None:
        """The next batch goes after this loop turn (now: at once), or lingers under load."""
        if self._linger_s and self._mean_size > _LINGER_ABOVE:
            self._scheduled = True
            loop.call_later(self._linger_s, self._flush)
        elif now:
            self._flush()
        else:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._waiting = self._waiting, []
        self._mean_size += _SMOOTHING * (len(batch) - self._mean_size)
        if batch:
            self._in_flight = asyncio.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            answers = await self._send([item for item, _ in batch])
        except Exception as exc:
            for _, future in batch:
                settle_error(future, exc)
        except BaseException:
            for _, future in batch:
                settle_error(future, asyncio.CancelledError())
            raise
        else:
            for (_, future), answer in zip(batch, answers, strict=True):
                settle_result(future, answer)
        finally:
            self._in_flight = None
            if self._waiting and not self._scheduled:
                self._schedule(asyncio.get_running_loop(), now=True)  # what arrived meanwhile
