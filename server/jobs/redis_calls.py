"""The job path's calls to Redis (the batched Submits, the feeder's reads and claims, the batched
outcomes), each packed once by hiredis and sent on a connection kept for these calls.

redis-py's client spends some 360 Python calls on every command before and after the round trip
(the pool's lock and bookkeeping, observability hooks, the retry wrapper, packing each argument on
its own); a call here spends about 80: the arguments are packed in one C call and the connection is
taken from a plain list. Replies come as Redis sends them (no response callbacks). Connections are
made with the settings of the store's pool (its URL, TLS and password) and read by the same hiredis
reader, so the replies and errors are redis-py's. One timer bounds each call, in place of socket
timeouts (which in redis-py cost a task per write and a timeout per read).

A call that finds Redis without the script (it restarted) loads it and sends again: a missing
script fails before running anything. A connection that was lost while idle (a Redis restart closes
them all) is replaced and the call sent once more on a fresh one, as redis-py's own retry does; a
failure on a fresh connection is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.commands.core import AsyncScript

# What a lost, refused or unanswered connection raises (the store maps it to UNAVAILABLE).
LOST: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


class DirectCalls:
    def __init__(self, pool: ConnectionPool, timeout_s: float) -> None:
        """timeout_s: the longest a call waits for its answer (a blocking read: beyond its
        block time). One timer bounds the whole call: the connections have no socket timeout
        of their own, which in redis-py costs a task per write and a timeout per read."""
        self._pool = pool
        self._timeout_s = timeout_s
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._idle: list[AbstractConnection] = []

    async def script(self, script: AsyncScript, args: Sequence[Any]) -> Any:
        """EVALSHA of the script (no keys: the job scripts name their keys from the prefix)."""
        return await self._call(script, args, self._timeout_s)

    async def command(self, *args: Any, blocks_s: float = 0.0) -> Any:
        """One command, e.g. command("XREADGROUP", "GROUP", ...); blocks_s: how long Redis
        may hold it before answering (BLOCK)."""
        return await self._call(None, args, self._timeout_s + blocks_s)

    async def _call(self, script: AsyncScript | None, args: Sequence[Any], timeout_s: float) -> Any:
        reused = bool(self._idle)
        connection = self._idle.pop() if reused else self._connection()
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    reply = await self._send(connection, script, args)
                except LOST:
                    if not reused:
                        raise
                    await connection.disconnect(nowait=True)  # closed while idle: once more
                    reply = await self._send(connection, script, args)
        except redis.exceptions.ResponseError:
            self._idle.append(connection)  # an error reply leaves the connection in step
            raise
        except BaseException as exc:
            # Lost, timed out or cancelled mid-call: a reply may still be on its way.
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            if type(exc) is TimeoutError:  # the call's timer (redis-py's own errors are others)
                raise redis.exceptions.TimeoutError(
                    f"no answer from Redis within {timeout_s:g} s"
                ) from None
            raise
        self._idle.append(connection)
        return reply

    def _connection(self) -> AbstractConnection:
        connection: AbstractConnection = self._pool.connection_class(**self._kwargs)
        return connection

    @staticmethod
    async def _send(
        connection: AbstractConnection, script: AsyncScript | None, args: Sequence[Any]
    ) -> Any:
        if script is None:
            return await _ask(connection, args)
        try:
            return await _ask(connection, ("EVALSHA", script.sha, 0, *args))
        except redis.exceptions.NoScriptError:
            script.sha = (await _ask(connection, ("SCRIPT", "LOAD", script.script))).decode()
            return await _ask(connection, ("EVALSHA", script.sha, 0, *args))

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.disconnect()


async def _ask(connection: AbstractConnection, args: Sequence[Any]) -> Any:
    packed = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # the stub's one-tuple
    await connection.send_packed_command([packed], check_health=False)
    return await connection.read_response()
