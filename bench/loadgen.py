"""A load generator over real gRPC on loopback: closed loop (a fixed number of requests in flight)
or open loop (Poisson arrivals at a fixed rate), spread over several processes so that it is not
the limit. Speaks tensorgate.v1 (unary Predict, Submit + GetResult jobs, StreamPredict) and, where
the server offers it, the KServe v2 protocol (ModelInfer), so one generator drives every server.

Each process keeps its share of the in-flight requests on one channel and records (start, latency,
status) for requests that start after the warm-up; the parent merges them.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class LoadSpec:
    target: str
    model: str
    protocol: str = "tensorgate"  # tensorgate | kserve
    mode: str = "unary"  # unary | job (Submit + GetResult) | submit (Submit only) | stream
    concurrency: int = 1  # requests in flight (closed loop), summed over processes
    streams: int = 1  # stream mode: streams, each keeping concurrency // streams in flight
    rate: float = 0.0  # > 0: open loop at this many requests per second instead
    seconds: float = 10.0
    warmup_s: float = 1.0
    rows: int = 1
    input_name: str = "input"
    features: int = 256
    processes: int = 1
    max_requests: int = 5_000_000  # a bound on any one run


@dataclass(slots=True)
class LoadResult:
    requests: int
    errors: dict[str, int]
    seconds: float
    req_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(spec: LoadSpec) -> LoadResult:
    """Runs the load and returns the merged figures of the measured window."""
    processes = max(1, min(spec.processes, spec.concurrency if spec.rate <= 0 else spec.processes))
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        start_at = time.time() + 1.0 + 0.2 * processes  # every process starts together
        parts = pool.starmap(
            _process_main, [(spec, i, processes, start_at) for i in range(processes)]
        )
    latencies = np.concatenate([p[0] for p in parts]) if parts else np.array([])
    errors: collections.Counter[str] = collections.Counter()
    for _, part_errors in parts:
        errors.update(part_errors)
    measured = spec.seconds
    ok = latencies.size
    # The measured window on the wall clock, for readings taken beside the load (server CPU).
    window = {"window": (start_at + spec.warmup_s, start_at + spec.warmup_s + spec.seconds)}
    if ok == 0:
        return LoadResult(0, dict(errors), measured, 0.0, *(float("nan"),) * 5, extra=window)
    ms = np.sort(latencies) * 1000.0
    return LoadResult(
        requests=ok,
        errors=dict(errors),
        seconds=measured,
        req_per_s=ok / measured,
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(ms[-1]),
        mean_ms=float(ms.mean()),
        extra=window,
    )


def _process_main(
    spec: LoadSpec, index: int, processes: int, start_at: float
) -> tuple[np.ndarray, dict[str, int]]:
    return asyncio.run(_Process(spec, index, processes, start_at).run())


class _Process:
    def __init__(self, spec: LoadSpec, index: int, processes: int, start_at: float) -> None:
        import grpc  # imported in the worker process

        self.spec = spec
        self.share = _share(spec.concurrency, processes, index)
        self.streams = _share(spec.streams, processes, index) if spec.mode == "stream" else 0
        self.rate = spec.rate / processes
        self.start_at = start_at
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.grpc = grpc
        self.channel: Any = None
        self.measure_from = 0.0
        self.stop_at = 0.0
        rng = np.random.default_rng(index)
        self.x = rng.standard_normal((spec.rows, spec.features)).astype(np.float32)

    async def run(self) -> tuple[np.ndarray, dict[str, int]]:
        grpc = self.grpc
        self.channel = grpc.aio.insecure_channel(
            self.spec.target, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        call = self._caller()
        await asyncio.sleep(max(0.0, self.start_at - time.time()))
        now = time.perf_counter()
        self.measure_from = now + self.spec.warmup_s
        self.stop_at = self.measure_from + self.spec.seconds
        if self.spec.mode == "stream":
            await asyncio.gather(*(self._stream(i) for i in range(self.streams)))
        elif self.rate > 0:
            await self._open_loop(call)
        else:
            await asyncio.gather(*(self._closed_loop(call) for _ in range(self.share)))
        await self.channel.close()
        return np.array(self.latencies, dtype=np.float64), dict(self.errors)

    def _record(self, started: float, error: str | None) -> None:
        if started < self.measure_from or started >= self.stop_at:
            return
        if error is None:
            self.latencies.append(time.perf_counter() - started)
        else:
            self.errors[error] += 1

    async def _closed_loop(self, call: Any) -> None:
        while time.perf_counter() < self.stop_at and len(self.latencies) < self.spec.max_requests:
            started = time.perf_counter()
            self._record(started, await call())

    async def _open_loop(self, call: Any) -> None:
        """Poisson arrivals; latency counts from the scheduled arrival, so a server that falls
        behind shows it (no coordinated omission)."""
        pending: set[asyncio.Task[None]] = set()
        arrival = time.perf_counter()

        async def one(at: float) -> None:
            self._record(at, await call())

        while arrival < self.stop_at and len(pending) < 20_000:
            arrival += random.expovariate(self.rate)
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(arrival))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)

    def _caller(self) -> Any:
        spec, grpc = self.spec, self.grpc
        if spec.protocol == "kserve":
            from tensorgate.kserve import grpc_service_pb2 as kpb
            from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc

            stub = kpb_grpc.GRPCInferenceServiceStub(self.channel)
            request = kpb.ModelInferRequest(
                model_name=spec.model,
                inputs=[kpb.ModelInferRequest.InferInputTensor(
                    name=spec.input_name, datatype="FP32", shape=self.x.shape)],
                raw_input_contents=[self.x.tobytes()],
            )  # fmt: skip
            method = stub.ModelInfer
        else:
            from tensorgate.client import codec
            from tensorgate.v1 import inference_pb2 as pb
            from tensorgate.v1 import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.InferenceStub(self.channel)
            request = codec.predict_request(spec.model, {spec.input_name: self.x})
            method = stub.Predict
            if spec.mode == "submit":
                accept = pb.SubmitRequest(request=request)

                async def submit_only() -> str | None:
                    try:
                        await stub.Submit(accept, timeout=60)
                        return None
                    except grpc.aio.AioRpcError as exc:
                        return exc.code().name

                return submit_only
            if spec.mode == "job":
                submit = pb.SubmitRequest(request=request)

                async def job() -> str | None:
                    try:
                        accepted = await stub.Submit(submit, timeout=60)
                        result = await stub.GetResult(
                            pb.GetResultRequest(job_id=accepted.job_id, wait_timeout_seconds=30),
                            timeout=60,
                        )
                        return (
                            None
                            if result.status == pb.SUCCEEDED
                            else pb.JobStatus.Name(result.status)
                        )
                    except grpc.aio.AioRpcError as exc:
                        return exc.code().name

                return job

        async def unary() -> str | None:
            try:
                await method(request, timeout=60)
                return None
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        return unary

    async def _stream(self, index: int) -> None:
        """One stream keeping `depth` requests in flight until the window ends."""
        from tensorgate.client import codec
        from tensorgate.v1 import inference_pb2_grpc as pb_grpc

        spec = self.spec
        depth = max(1, spec.concurrency // max(spec.streams, 1))
        stub = pb_grpc.InferenceStub(self.channel)
        slots = asyncio.Semaphore(depth)
        started: dict[str, float] = {}

        async def requests():  # type: ignore[no-untyped-def]
            n = 0
            while time.perf_counter() < self.stop_at:
                await slots.acquire()
                request_id = f"{index}-{n}"
                n += 1
                started[request_id] = time.perf_counter()
                yield codec.predict_request(spec.model, {spec.input_name: self.x}, (), request_id)

        async for response in stub.StreamPredict(requests(), timeout=spec.seconds + 120):
            at = started.pop(response.id)
            self._record(at, response.error.message[:40] if response.HasField("error") else None)
            slots.release()


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)
