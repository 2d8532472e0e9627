"""Calls made in one loop iteration, sent as one: each caller awaits its own answer from one
round trip for all of them (the Redis job store's Submits and outcomes).

Nothing waits to fill a batch: the batch goes when the loop has run the iteration's ready
callbacks (call_soon), so a lone call costs one loop turn and a burst shares one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tensorgate.server.futures import settle_error, settle_result


class Batched:
    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        """send(items) -> one answer per item, in order; what it raises, every caller gets."""
        self._send = send
        self._waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((item, future))
        return await asyncio.shield(future)

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            answers = await self._send([item for item, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                settle_error(
                    future, exc if isinstance(exc, Exception) else asyncio.CancelledError()
                )
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            settle_result(future, answer)
