"""How long one large request stalls everyone else: small KServe calls from one process, timed
around a single 40 MB ModelInfer from another, against `tensorgate serve` and against a bare
grpc.aio server whose handler does nothing (gRPC's own cost of receiving the bytes).

    python -m bench.large_message_stall

Prints, per case, the largest small-call latency before and around the large call.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

from bench.serverproc import ROOT, ServeProcess

ROWS = 39_062  # × 256 FP32 = 40 MB; refused for its batch size once decoded, as intended
LIMIT = 1 << 27


def _pinger(target: str, out: Any, seconds: float) -> None:
    import grpc
    import numpy as np

    from tensorgate.kserve import grpc_service_pb2 as kpb
    from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc

    async def run() -> None:
        small = kpb.ModelInferRequest(model_name="mlp")
        small.inputs.add(name="input", datatype="FP32", shape=[1, 256])
        small.raw_input_contents.append(np.ones((1, 256), np.float32).tobytes())
        async with grpc.aio.insecure_channel(target) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            samples = []
            end = time.time() + seconds
            while time.time() < end:
                started = time.time()
                await stub.ModelInfer(small)
                samples.append((started, time.time() - started))
            out.put(samples)

    asyncio.run(run())


def _sender(target: str, out: Any, typed: bool) -> None:
    import grpc
    import numpy as np

    from tensorgate.kserve import grpc_service_pb2 as kpb

    big = kpb.ModelInferRequest(model_name="mlp")
    tensor = big.inputs.add(name="input", datatype="FP32", shape=[ROWS, 256])
    data = np.ones(ROWS * 256, np.float32)
    if typed:
        tensor.contents.fp32_contents.extend(data)
    else:
        big.raw_input_contents.append(data.tobytes())
    payload = big.SerializeToString()  # before the clock starts
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", LIMIT)])
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    time.sleep(1.0)
    started = time.time()
    try:
        call(payload, timeout=30)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    out.put((started, time.time(), code))


def _bare_server(port_out: Any) -> None:
    import grpc

    async def run() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT)])

        async def infer(request: bytes, context: Any) -> bytes:
            return b""

        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
        )
        server.add_generic_rpc_handlers((handler,))
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def measure(target: str, typed: bool) -> str:
    out: Any = mp.Queue()
    pinger = mp.Process(target=_pinger, args=(target, out, 3.0))
    sender = mp.Process(target=_sender, args=(target, out, typed))
    pinger.start()
    sender.start()
    first, second = out.get(), out.get()
    samples, (start, end, code) = (first, second) if isinstance(first, list) else (second, first)
    pinger.join()
    sender.join()
    before = [lat for t, lat in samples if t + lat < start]
    around = [lat for t, lat in samples if t + lat >= start and t <= end + 0.05]
    return (
        f"large call {code} in {(end - start) * 1e3:.0f} ms; small calls max "
        f"{max(before) * 1e3:.1f} ms before, {max(around) * 1e3:.1f} ms around it"
    )


def main() -> None:
    server = ServeProcess(ROOT / "engines", ["mlp"], extra_args=["--max-message-bytes", str(LIMIT)])
    try:
        for typed in (False, True):
            kind = "typed fp32_contents" if typed else "raw_input_contents"
            print(f"tensorgate, {kind:19}: {measure(server.target, typed)}", flush=True)
    finally:
        server.stop()
    port: Any = mp.Queue()
    bare = mp.Process(target=_bare_server, args=(port,), daemon=True)
    bare.start()
    print(f"bare grpc.aio, typed fp32_contents: {measure(f'127.0.0.1:{port.get()}', True)}")
    bare.terminate()


if __name__ == "__main__":
    main()
