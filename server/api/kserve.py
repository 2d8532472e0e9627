"""The KServe v2 / Open Inference Protocol front end (inference.GRPCInferenceService): a thin
adapter over the same data plane, queue and validation as tensorgate.v1, so Triton and KServe
clients work unchanged. Errors on ModelStreamInfer go back as the response's error_message and
the stream goes on, as those clients expect."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tensorgate.server.api import kserve_codec as codec
from tensorgate.server.api.frontend import Frontend
from tensorgate.server.api.status import MAX_MESSAGE_CHARS, as_domain_error
from tensorgate.server.api.stream import pump
from tensorgate.server.api.unary import Call, rpc
from tensorgate.server.errors import InvalidArgument, Unavailable, clip
from tensorgate.server.records import ModelInfo, ModelStatistics, Request, SequenceControl
from tensorgate.server.tensors import Outputs

SERVER_NAME = "tensorgate"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("model_configuration", "statistics", "model_repository")

# backend -> the platform name Triton reports for the same kind of model
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "python": "python"}


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    SERVICE = "inference.GRPCInferenceService"

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self._plane = frontend.plane

    @rpc()
    async def ServerLive(
        self, request: kpb.ServerLiveRequest, call: Call
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    @rpc()
    async def ServerReady(
        self, request: kpb.ServerReadyRequest, call: Call
    ) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._plane.server_ready())

    @rpc()
    async def ModelReady(
        self, request: kpb.ModelReadyRequest, call: Call
    ) -> kpb.ModelReadyResponse:
        return kpb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    @rpc()
    async def ServerMetadata(
        self,
        request: kpb.ServerMetadataRequest,
        call: Call,
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    @rpc()
    async def ModelMetadata(
        self,
        request: kpb.ModelMetadataRequest,
        call: Call,
    ) -> kpb.ModelMetadataResponse:
        model = self._loaded_model(request.name, request.version)
        meta = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version] if request.version else model.versions,
            platform=_PLATFORMS.get(model.backend, model.backend),
            inputs=[meta(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.inputs],
            outputs=[meta(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.outputs],
        )

    @rpc("unary")
    async def ModelInfer(
        self, request: kpb.ModelInferRequest, call: Call
    ) -> kpb.ModelInferResponse:
        bound = call.bind(_request(request))
        outputs = await self._plane.infer(bound, call.span)
        return call.encode(
            lambda: codec.infer_response(
                request.model_name, request.id, outputs, bound.model_version
            )
        )

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[kpb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        async for response in pump(
            self.frontend,
            self.SERVICE,
            "ModelStreamInfer",
            request_iterator,
            context,
            _request,
            _stream_response,
            _stream_error,
        ):
            yield response

    @rpc()
    async def ModelConfig(
        self, request: kpb.ModelConfigRequest, call: Call
    ) -> kpb.ModelConfigResponse:
        model = self._loaded_model(request.name, request.version)
        kind = (
            kpb.ModelInstanceGroup.KIND_GPU
            if model.backend == "tensorrt"
            else (kpb.ModelInstanceGroup.KIND_CPU)
        )
        return kpb.ModelConfigResponse(
            config=kpb.ModelConfig(
                name=model.name,
                platform=_PLATFORMS.get(model.backend, model.backend),
                backend=model.backend,
                max_batch_size=model.max_batch_size,
                input=[
                    kpb.ModelInput(
                        name=s.name, data_type=codec.CONFIG_DATATYPE[s.datatype], dims=s.shape[1:]
                    )
                    for s in model.inputs
                ],
                output=[
                    kpb.ModelOutput(
                        name=s.name, data_type=codec.CONFIG_DATATYPE[s.datatype], dims=s.shape[1:]
                    )
                    for s in model.outputs
                ],
                dynamic_batching=kpb.ModelDynamicBatching(
                    preferred_batch_size=model.preferred_batch_sizes,
                    max_queue_delay_microseconds=round(model.max_queue_delay_s * 1e6),
                ),
                instance_group=[
                    kpb.ModelInstanceGroup(
                        name=f"{model.name}_0", kind=kind, count=model.instance_count
                    )
                ],
            )
        )

    @rpc()
    async def ModelStatistics(
        self,
        request: kpb.ModelStatisticsRequest,
        call: Call,
    ) -> kpb.ModelStatisticsResponse:
        stats = self._plane.statistics(request.name, request.version)
        return kpb.ModelStatisticsResponse(model_stats=[_statistics(m) for m in stats])

    # --- the model repository extension ---------------------------------------------------------

    @rpc()
    async def RepositoryIndex(
        self, request: kpb.RepositoryIndexRequest, call: Call
    ) -> kpb.RepositoryIndexResponse:
        self.frontend.check_admin(call.tenant)
        index = kpb.RepositoryIndexResponse.ModelIndex
        return kpb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in await self._plane.repository_index(request.ready)
            ]
        )

    @rpc()
    async def RepositoryModelLoad(
        self, request: kpb.RepositoryModelLoadRequest, call: Call
    ) -> kpb.RepositoryModelLoadResponse:
        self.frontend.check_admin(call.tenant)
        _no_parameters(request.parameters)
        await self._plane.load_model(_model_name(request.model_name))
        return kpb.RepositoryModelLoadResponse()

    @rpc()
    async def RepositoryModelUnload(
        self, request: kpb.RepositoryModelUnloadRequest, call: Call
    ) -> kpb.RepositoryModelUnloadResponse:
        self.frontend.check_admin(call.tenant)
        _no_parameters(request.parameters, allowed=("unload_dependents",))
        await self._plane.unload_model(_model_name(request.model_name))
        return kpb.RepositoryModelUnloadResponse()

    def _loaded_model(self, name: str, version: str = "") -> ModelInfo:
        model = self._plane.model_info(name, version)
        if not model.inputs:  # never loaded
            raise Unavailable(model.reason)
        return model


def _request(message: kpb.ModelInferRequest) -> Request:
    parameters = codec.parameters(message.parameters)
    return Request(
        model=message.model_name,
        inputs=codec.tensor_inputs(message),
        requested_outputs=[output.name for output in message.outputs],
        id=message.id,
        parameters=parameters,
        priority=_priority(parameters.get("priority", 0)),
        sequence=_sequence(parameters),
        model_version=message.model_version,
    )


def _model_name(name: str) -> str:
    if not name:
        raise InvalidArgument("model_name is empty: name the model to load or unload")
    return name


def _no_parameters(parameters: object, allowed: tuple[str, ...] = ()) -> None:
    """Triton's load parameters (a config or files sent with the call) are not supported: the
    model is loaded from the repository as it is on disk."""
    unknown = sorted(set(parameters) - set(allowed))  # type: ignore[call-overload]
    if unknown:
        raise InvalidArgument(
            f"parameters {', '.join(unknown)} are not supported: the model is loaded from the "
            "repository as it is on disk"
        )


def _sequence(parameters: dict[str, object]) -> SequenceControl | None:
    """Triton's sequence parameters, as tritonclient sends them: sequence_id an int64 or a
    string (0 or "" = none), sequence_start and sequence_end bools. An integer id is the same
    sequence as its decimal string."""
    sequence_id = parameters.get("sequence_id", 0)
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, (int, str)):
        raise InvalidArgument(
            f"parameter 'sequence_id' must be an integer or a string, got {sequence_id!r}"
        )
    flags = {}
    for name in ("sequence_start", "sequence_end"):
        value = parameters.get(name, False)
        if not isinstance(value, bool):
            raise InvalidArgument(f"parameter '{name}' must be a bool, got {value!r}")
        flags[name] = value
    if sequence_id in (0, ""):
        if flags["sequence_start"] or flags["sequence_end"]:
            raise InvalidArgument("parameters sequence_start/sequence_end need a sequence_id")
        return None
    return SequenceControl(str(sequence_id), flags["sequence_start"], flags["sequence_end"])


def _priority(level: object) -> int:
    """Triton's `priority` parameter: level 1 is the highest, 0 the default. As tensorgate
    priorities (higher first, 0 the default): level L becomes 100 - L, above the default."""
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise InvalidArgument(f"parameter 'priority' must be an integer >= 0, got {level!r}")
    return 0 if level == 0 else max(100 - level, 1)


def _stream_response(
    message: kpb.ModelInferRequest, outputs: Outputs
) -> kpb.ModelStreamInferResponse:
    response = kpb.ModelStreamInferResponse()
    codec.infer_response(message.model_name, message.id, outputs, into=response.infer_response)
    return response


def _stream_error(
    message: kpb.ModelInferRequest, error: BaseException
) -> kpb.ModelStreamInferResponse:
    error = as_domain_error(error)
    if not isinstance(message, kpb.ModelInferRequest):  # bytes that did not decode
        message = kpb.ModelInferRequest()
    return kpb.ModelStreamInferResponse(
        error_message=clip(f"{error.code}: {error}", MAX_MESSAGE_CHARS),
        infer_response=kpb.ModelInferResponse(model_name=message.model_name, id=message.id),
    )


def _duration(count: int, seconds: float) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=count, ns=int(seconds * 1e9))


def _statistics(stats: ModelStatistics) -> kpb.ModelStatistics:
    return kpb.ModelStatistics(
        name=stats.name,
        version=stats.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.rows,
        execution_count=stats.batches,
        inference_stats=kpb.InferStatistics(
            success=_duration(stats.requests, stats.success_s_total),
            fail=_duration(stats.failed_requests, stats.failed_s_total),
            queue=_duration(stats.requests + stats.failed_requests, stats.queue_s_total),
            compute_infer=_duration(stats.batches, stats.compute_s_total),
        ),
        batch_stats=[
            kpb.InferBatchStatistics(batch_size=size, compute_infer=_duration(count, seconds))
            for size, (count, seconds) in stats.by_batch_size.items()
        ],
    )
