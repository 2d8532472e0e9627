"""Settling a result future exactly once.

A request's future can be settled from several places: the batch that ran it, the queue that
expired it, a shutdown that fails what is left, and the caller, who cancels it by going away. A
cancellation lands at any moment, and the queue hears of it only on a later loop iteration
(done-callbacks run through call_soon), so every place that settles a future must find it
possibly settled already. These two helpers are the only way the server settles an asyncio
future; `tests/test_architecture.py` holds the rest of the code to that.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


def settle_result(future: asyncio.Future[T], result: T) -> bool:
    """Sets the result unless the future is settled already; True if this call settled it."""
    if future.done():
        return False
    future.set_result(result)
    return True


def settle_error(future: asyncio.Future[T], error: BaseException) -> bool:
    """Sets the error unless the future is settled already; True if this call settled it."""
    if future.done():
        return False
    future.set_exception(error)
    return True
