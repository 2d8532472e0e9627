"""Many sequences of a stateful model over one stream, each chunk answered as its own awaitable.

    async with AsyncTensorgateClient(target) as client:
        async with client.sequences("silero_vad") as stream:
            first = await stream.send("call-1", {"audio": chunk}, start=True)
            ...
            last = await stream.send("call-1", {"audio": chunk}, end=True)

send() may be called from many tasks at once (one per live sequence, say): the chunks share the
stream and the server batches them across sequences. A chunk that fails raises SequenceError
with the server's status code and message; the stream and its other sequences go on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from types import TracebackType

import grpc
import numpy as np

from tensorgate.client import codec
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc


class SequenceError(Exception):
    """One chunk failed; the stream and its other sequences go on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class SequenceStream:
    """A StreamPredict call carrying chunks of many sequences of one model."""

    def __init__(
        self,
        stub: pb_grpc.InferenceStub,
        model: str,
        metadata: tuple[tuple[str, str], ...] | None,
        timeout_s: float | None,
    ) -> None:
        self._stub = stub
        self._model = model
        self._metadata = metadata
        self._timeout_s = timeout_s
        self._outbox: asyncio.Queue[pb.PredictRequest | None] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[dict[str, np.ndarray]]] = {}
        self._ids = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def __aenter__(self) -> SequenceStream:
        call = self._stub.StreamPredict(
            self._requests(), timeout=self._timeout_s, metadata=self._metadata
        )
        self._reader = asyncio.create_task(self._read(call), name="sequence-stream-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(
        self,
        sequence_id: str,
        inputs: Mapping[str, np.ndarray],
        *,
        start: bool = False,
        end: bool = False,
    ) -> dict[str, np.ndarray]:
        """Sends one chunk of sequence_id and waits for its outputs."""
        return await self.submit(sequence_id, inputs, start=start, end=end)

    def submit(
        self,
        sequence_id: str,
        inputs: Mapping[str, np.ndarray],
        *,
        start: bool = False,
        end: bool = False,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Sends one chunk now and returns the future of its outputs: the next chunk of the
        sequence may go before this one is answered (the server runs them in order)."""
        if self._failure is not None:
            raise self._failure
        request_id = f"{sequence_id}#{next(self._ids)}"
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._outbox.put_nowait(
            codec.predict_request(
                self._model,
                inputs,
                (),
                request_id,
                sequence_id=sequence_id,
                sequence_start=start,
                sequence_end=end,
            )
        )
        return future

    async def close(self) -> None:
        """Half-closes the stream once every chunk sent is answered: the server then frees the
        sequences this stream was driving."""
        self._outbox.put_nowait(None)
        if self._reader is not None:
            try:
                await self._reader
            except grpc.aio.AioRpcError:
                pass

    async def _requests(self) -> AsyncIterator[pb.PredictRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for response in call:
                result = codec.stream_result(response)
                future = self._waiting.pop(result.id, None)
                if future is None or future.done():
                    continue
                if result.ok:
                    assert result.outputs is not None
                    future.set_result(result.outputs)
                else:
                    assert result.error_code is not None
                    future.set_exception(SequenceError(result.error_code, result.error_message))
        except grpc.aio.AioRpcError as error:
            self._failure = error
            raise
        finally:
            failure = self._failure or SequenceError(
                grpc.StatusCode.CANCELLED, "the stream ended before this chunk was answered"
            )
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(failure)
            self._waiting.clear()
