"""A server whose handlers do nothing (tensorgate.v1 Predict, Submit, GetResult, StreamPredict and
KServe ModelInfer answer an empty response at once): what the load generator itself can drive,
and what the transport alone costs, reported beside every result.

    python -m bench.echo_server PORT [--uvloop]   # --uvloop: the loop tensorgate serve runs on
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

import grpc  # noqa: E402

from tensorgate.kserve import grpc_service_pb2 as kpb  # noqa: E402
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402
from tensorgate.v1 import inference_pb2 as pb  # noqa: E402
from tensorgate.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402


class Echo(pb_grpc.InferenceServicer):
    async def Predict(self, request, context):  # type: ignore[no-untyped-def]
        return pb.PredictResponse(model=request.model, id=request.id)

    async def Submit(self, request, context):  # type: ignore[no-untyped-def]
        return pb.SubmitResponse(job_id="0" * 32, status=pb.PENDING)

    async def GetResult(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetResultResponse(
            job_id=request.job_id, status=pb.SUCCEEDED, result=pb.PredictResponse()
        )

    async def StreamPredict(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for request in request_iterator:
            yield pb.StreamPredictResponse(
                id=request.id, response=pb.PredictResponse(model=request.model, id=request.id)
            )


class KEcho(kpb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        return kpb.ModelInferResponse(model_name=request.model_name, id=request.id)


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(Echo(), server)
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(KEcho(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if "--uvloop" in sys.argv[2:]:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    else:
        asyncio.run(main(int(sys.argv[1])))
