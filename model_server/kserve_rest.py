"""KServe v2 (Open Inference Protocol) over REST, with Triton's binary tensor data extension and
model repository extension.

Binary extension: a request with an `Inference-Header-Content-Length: N` header carries N bytes of
JSON followed by the raw little-endian bytes of the inputs whose `parameters.binary_data_size`
says how many bytes are theirs, in input order. Outputs are answered the same way when the
request asks (`parameters.binary_data_output` for all, `parameters.binary_data` per output).
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import unquote

from model_server import SERVER_NAME, SERVER_VERSION
from model_server.models import MODEL_VERSION, ModelNotFoundError, ModelRepository, TensorModel
from model_server.routing import Request, Response, Route, json_object, json_response
from model_server.tensors import (
    Array,
    TensorError,
    checked_shape,
    datatype_of,
    from_json_data,
    from_raw,
    to_json_data,
    to_raw,
)

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"


class BadRequest(ValueError):
    pass


def routes(repository: ModelRepository) -> list[Route]:
    api = KServeRest(repository)
    return [
        Route("GET", r"/v2/health/live", api.live),
        Route("GET", r"/v2/health/ready", api.ready),
        Route("GET", r"/v2", api.server_metadata),
        Route("GET", _MODEL, api.model_metadata),
        Route("GET", _MODEL + r"/ready", api.model_ready),
        Route("POST", _MODEL + r"/infer", api.infer),
        Route("POST", r"/v2/repository/index", api.repository_index),
        Route("POST", r"/v2/repository/models/(?P<name>[^/]+)/load", api.load),
        Route("POST", r"/v2/repository/models/(?P<name>[^/]+)/unload", api.unload),
    ]


def error(status: int, message: str) -> Response:
    return json_response({"error": message}, status=status)


class KServeRest:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def live(self, _request: Request) -> Response:
        return json_response({"live": True})

    def ready(self, _request: Request) -> Response:
        ready = self.repository.ready
        # The protocol answers a health question with the status code: 200 yes, 4xx no.
        return json_response({"ready": ready}, status=200 if ready else 400)

    def server_metadata(self, _request: Request) -> Response:
        return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    def _model(self, request: Request) -> TensorModel:
        name = unquote(request.params["name"])
        version = request.params.get("version")
        model = self.repository.tensor_model(name)
        if version is not None and unquote(version) != MODEL_VERSION:
            raise ModelNotFoundError(f"{name} version {unquote(version)}")
        return model

    def model_metadata(self, request: Request) -> Response:
        try:
            return json_response(self._model(request).metadata())
        except ModelNotFoundError as exc:
            return error(404, str(exc))

    def model_ready(self, request: Request) -> Response:
        try:
            model = self._model(request)
        except ModelNotFoundError as exc:
            return error(404, str(exc))
        return json_response({"name": model.name, "ready": True})

    def repository_index(self, request: Request) -> Response:
        try:
            json_object(request.body)
        except ValueError as exc:
            return error(400, str(exc))
        loaded = {model.name for model in self.repository.tensor_models()}
        return json_response(
            [
                {"name": name, "version": MODEL_VERSION, "state": "READY" if name in loaded else "UNAVAILABLE"}
                for name in sorted(loaded | set(self.repository.available()))
            ]
        )

    def load(self, request: Request) -> Response:
        try:
            json_object(request.body)
            self.repository.load(unquote(request.params["name"]))
        except ModelNotFoundError as exc:
            return error(404, f"{exc} in the model repository")
        except ValueError as exc:
            return error(400, str(exc))
        return json_response({})

    def unload(self, request: Request) -> Response:
        try:
            json_object(request.body)
            self.repository.unload(unquote(request.params["name"]))
        except ModelNotFoundError as exc:
            return error(404, str(exc))
        except ValueError as exc:
            return error(400, str(exc))
        return json_response({})

    def infer(self, request: Request) -> Response:
        try:
            model = self._model(request)
        except ModelNotFoundError as exc:
            return error(404, str(exc))
        try:
            return infer(model, request)
        except ValueError as exc:
            return error(400, str(exc))


def infer(model: TensorModel, request: Request) -> Response:
    body = memoryview(request.body)
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is None:
        header, binary = body, body[:0]
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} {header_length!r} is not a length within the body")
        header, binary = body[: int(header_length)], body[int(header_length) :]
    payload = json_object(header)
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id must be a string")
    arrays = _inputs(model, payload.get("inputs"), binary)
    requested = _requested_outputs(payload)
    results = model.infer(arrays, [name for name, _ in requested])
    binary_by_name = dict(requested)
    default_binary = _parameters(payload).get("binary_data_output") is True

    outputs: list[dict[str, Any]] = []
    raw_parts: list[bytes] = []
    for name, array in results:
        output: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        wants_binary = binary_by_name.get(name)
        if default_binary if wants_binary is None else wants_binary:
            raw = to_raw(array)
            output["parameters"] = {"binary_data_size": len(raw)}
            raw_parts.append(raw)
        else:
            output["data"] = to_json_data(array)
        outputs.append(output)
    response = {
        "model_name": model.name,
        "model_version": MODEL_VERSION,
        "id": request_id if request_id is not None else str(uuid.uuid4()),
        "outputs": outputs,
    }
    if not raw_parts:
        return json_response(response)
    header_bytes = json_response(response).body
    return Response(
        status=200,
        body=b"".join([header_bytes, *raw_parts]),
        content_type="application/octet-stream",
        headers=(("Inference-Header-Content-Length", str(len(header_bytes))),),
    )


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be an object")
    return parameters


def _inputs(model: TensorModel, inputs: Any, binary: memoryview) -> dict[str, Array]:
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("inputs must be a non-empty list")
    arrays: dict[str, Array] = {}
    offset = 0
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise BadRequest(f"inputs[{index}] must be an object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise BadRequest(f"inputs[{index}] needs a string name and datatype and a list shape")
        if name in arrays:
            raise BadRequest(f"input {name!r} is given twice")
        dims = checked_shape(name, shape)
        model.check_input(name, datatype, dims)
        binary_size = _parameters(item).get("binary_data_size")
        if binary_size is None:
            if "data" not in item:
                raise BadRequest(f"input {name!r} has neither data nor parameters.binary_data_size")
            arrays[name] = from_json_data(name, datatype, dims, item["data"])
            continue
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + binary_size > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {binary_size} runs past the end of the body")
        arrays[name] = from_raw(name, datatype, dims, binary[offset : offset + binary_size])
        offset += binary_size
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


def _requested_outputs(payload: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """The outputs asked for, each with its own binary_data choice (None: the request's default)."""
    outputs = payload.get("outputs")
    if outputs is None:
        return []
    if not isinstance(outputs, list):
        raise BadRequest("outputs must be a list")
    requested: list[tuple[str, bool | None]] = []
    for index, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a string name")
        binary = _parameters(item).get("binary_data")
        requested.append((item["name"], None if binary is None else bool(binary)))
    return requested
