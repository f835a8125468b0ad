"""KServe v2 over gRPC (`inference.GRPCInferenceService`), on a grpcio thread-pool server."""

from __future__ import annotations

from concurrent import futures
from typing import Any, NoReturn

import grpc

from mecbench.core.logging import get_logger
from mecbench.kserve import inference_pb2, inference_pb2_grpc
from model_server import SERVER_NAME, SERVER_VERSION
from model_server.kserve_rest import EXTENSIONS
from model_server.models import MODEL_VERSION, PLATFORM, ModelNotFoundError, ModelRepository, TensorModel
from model_server.tensors import Array, TensorError, checked_shape, datatype_of, from_contents, from_raw, to_raw

log = get_logger("model_server")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _abort(context: Any, code: Any, message: str) -> NoReturn:
    context.abort(code, message)
    # abort() raises; this line only tells the type checker so.
    raise AssertionError("unreachable")


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def ServerLive(self, request: Any, context: Any) -> inference_pb2.ServerLiveResponse:  # noqa: N802
        return inference_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> inference_pb2.ServerReadyResponse:  # noqa: N802
        return inference_pb2.ServerReadyResponse(ready=self.repository.ready)

    def ServerMetadata(self, request: Any, context: Any) -> inference_pb2.ServerMetadataResponse:  # noqa: N802
        return inference_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    def _model(self, name: str, version: str, context: Any) -> TensorModel:
        try:
            model = self.repository.tensor_model(name)
        except ModelNotFoundError as exc:
            _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        if version and version != MODEL_VERSION:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r}")
        return model

    def ModelReady(self, request: Any, context: Any) -> inference_pb2.ModelReadyResponse:  # noqa: N802
        self._model(request.name, request.version, context)
        return inference_pb2.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request: Any, context: Any) -> inference_pb2.ModelMetadataResponse:  # noqa: N802
        model = self._model(request.name, request.version, context)
        tensor = inference_pb2.ModelMetadataResponse.TensorMetadata
        return inference_pb2.ModelMetadataResponse(
            name=model.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.outputs],
        )

    def ModelInfer(self, request: Any, context: Any) -> inference_pb2.ModelInferResponse:  # noqa: N802
        model = self._model(request.model_name, request.model_version, context)
        try:
            arrays = _inputs(model, request)
            results = model.infer(arrays, [output.name for output in request.outputs])
            outputs = [
                inference_pb2.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=datatype_of(array), shape=list(array.shape)
                )
                for name, array in results
            ]
            raw = [to_raw(array) for _, array in results]
        except TensorError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return inference_pb2.ModelInferResponse(
            model_name=model.name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=outputs,
            raw_output_contents=raw,
        )


def _inputs(model: TensorModel, request: Any) -> dict[str, Array]:
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise TensorError(f"{len(raw_contents)} raw_input_contents for {len(request.inputs)} inputs")
    arrays: dict[str, Array] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise TensorError(f"input {tensor.name!r} is given twice")
        shape = checked_shape(tensor.name, list(tensor.shape))
        model.check_input(tensor.name, tensor.datatype, shape)
        if raw_contents:
            arrays[tensor.name] = from_raw(tensor.name, tensor.datatype, shape, raw_contents[index])
        else:
            arrays[tensor.name] = from_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return arrays


def start_grpc_server(repository: ModelRepository, host: str, port: int, max_workers: int = 64) -> tuple[Any, int]:
    """Start the server on HOST:PORT (0: any free port); returns it with the port bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Two servers must never share a port by accident.
            ("grpc.so_reuseport", 0),
        ],
    )
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(repository), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind gRPC to {address}")
    server.start()
    return server, bound
