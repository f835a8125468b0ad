"""A real KServe model server (the `kserve` package's ModelServer, Open Inference Protocol v2 over REST
and gRPC) serving one ONNX model with ONNX Runtime: the reference the KServe v2 adapters are tested and
benchmarked against.

It runs in its own virtual environment, as kserve pins protobuf<7:

    .venv-kserve/bin/python tests/servers/kserve_onnx_server.py --model_name NAME --model_path FILE.onnx \
        --http_port N --grpc_port M

Every other kserve ModelServer option (--workers, --enable_latency_logging, ...) is accepted too.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput
from kserve.logging import logger
from kserve.model_server import parser as kserve_parser
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

# ONNX Runtime's type strings to the v2 protocol's datatype names.
ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
NUMPY_TO_V2 = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
}

def _tensor_metadata(node: Any) -> dict[str, Any]:
    """An ONNX Runtime NodeArg as v2 tensor metadata; a symbolic or unknown dimension is -1."""
    shape = [dim if isinstance(dim, int) else -1 for dim in (node.shape or [])]
    return {"name": node.name, "datatype": ORT_TO_V2.get(node.type, node.type), "shape": shape}


class OnnxModel(Model):
    """One ONNX model, run by ONNX Runtime on the CPU."""

    def __init__(self, name: str, model_path: Path) -> None:
        super().__init__(name)
        self.model_path = model_path
        self.session: ort.InferenceSession | None = None
        self.inputs: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []

    def load(self) -> bool:
        self.session = ort.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
        self.inputs = [_tensor_metadata(node) for node in self.session.get_inputs()]
        self.outputs = [_tensor_metadata(node) for node in self.session.get_outputs()]
        self.ready = True
        return self.ready

    # kserve's default metadata lists no tensors; these make GET /v2/models/NAME (and gRPC
    # ModelMetadata) report the ONNX model's inputs and outputs.
    def get_input_types(self) -> list[dict[str, Any]]:
        return self.inputs

    def get_output_types(self) -> list[dict[str, Any]]:
        return self.outputs

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput(f"model {self.name} takes v2 inference requests only")
        assert self.session is not None
        expected = {tensor["name"]: tensor for tensor in self.inputs}
        feed: dict[str, np.ndarray] = {}
        for tensor in payload.inputs:
            spec = expected.get(tensor.name)
            if spec is None:
                raise InvalidInput(f"unexpected input {tensor.name!r} for model {self.name}; it takes {sorted(expected)}")
            if tensor.datatype != spec["datatype"]:
                raise InvalidInput(f"input {tensor.name!r} of model {self.name} is {spec['datatype']}, not {tensor.datatype}")
            try:
                feed[tensor.name] = tensor.as_numpy()
            except ValueError as error:  # the data does not fill the shape
                raise InvalidInput(f"input {tensor.name!r} of model {self.name}: {error}") from error
        missing = sorted(set(expected) - set(feed))
        if missing:
            raise InvalidInput(f"model {self.name} is missing inputs {missing}")
        names = [output.name for output in payload.request_outputs] if payload.request_outputs else None
        known = {tensor["name"] for tensor in self.outputs}
        for name in names or []:
            if name not in known:
                raise InvalidInput(f"unexpected output {name!r} for model {self.name}; it has {sorted(known)}")
        try:
            results = self.session.run(names, feed)
        except InvalidArgument as error:  # a shape the model does not take: the client's fault
            raise InvalidInput(f"model {self.name}: {error}") from error
        # As kserve's own servers do (kserve.utils.utils.get_predict_response): binary tensor data
        # when the request asked for it: gRPC raw_input_contents in -> raw_output_contents out;
        # REST binary_data_output -> binary extension.
        binary = payload.use_binary_outputs
        outputs = []
        for name, result in zip(names or [tensor["name"] for tensor in self.outputs], results, strict=True):
            array = np.asarray(result)
            output = InferOutput(name=name, shape=list(array.shape), datatype=NUMPY_TO_V2[array.dtype])
            output.set_data_from_numpy(array, binary_data=binary)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=binary,
            requested_outputs=payload.request_outputs,
        )


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve_parser], description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", type=Path, required=True, help="The ONNX file to serve.")
    args = parser.parse_args()
    # ModelServer configures kserve's logging; the model loads after it so that its log line shows.
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers)
    model = OnnxModel(args.model_name, args.model_path)
    model.load()
    logger.info("loaded %s from %s: inputs %s, outputs %s", args.model_name, args.model_path, model.inputs, model.outputs)
    server.start([model])


if __name__ == "__main__":
    main()
