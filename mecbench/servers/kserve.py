"""KServe v2 / Triton servers (the Open Inference Protocol), over HTTP/REST or gRPC.

A sample's payload is one input tensor's elements as little-endian row-major bytes, as the
dataset stores them; the samples of a request are stacked along a leading batch dimension.
The input's name, datatype and per-sample shape come from the model's metadata unless options
set them; a -1 dimension is worked out from the payload's size. The response given back to
LoadGen is the sample's row of the chosen output (the first one by default), as raw bytes.

Over HTTP the binary tensor extension carries the tensors (no JSON number lists to print and
parse); `binary=false` falls back to plain JSON for servers without it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from mecbench.core.channels import open_channel
from mecbench.core.errors import DeadlineExceeded, FailedPrecondition
from mecbench.kserve import inference_pb2, inference_pb2_grpc
from mecbench.servers.base import (
    AnswerDecoder,
    FirstTokenCallback,
    GrpcCall,
    HttpCall,
    InferenceResult,
    Options,
    ServerError,
    ServerType,
)
from mecbench.servers.http import HttpClient, check_status

DATATYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

# Where each datatype's elements live in InferTensorContents, for servers that answer typed.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class TensorPlan:
    """How samples become the request's input tensor, and which output goes back."""

    input_name: str
    datatype: str
    sample_shape: list[int]
    output_name: str

    @property
    def itemsize(self) -> int:
        return int(np.dtype(DATATYPES[self.datatype]).itemsize)

    def batch_shape(self, count: int, payload_bytes: int, batch_dim: bool) -> list[int]:
        """The request's shape for `count` samples of `payload_bytes` bytes each."""
        shape = list(self.sample_shape)
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            elements = payload_bytes // self.itemsize
            shape[shape.index(-1)] = elements // known if known else elements
        if math.prod(shape) * self.itemsize != payload_bytes:
            raise ServerError(
                f"a payload of {payload_bytes} bytes is not one {self.datatype} tensor of shape {self.sample_shape}"
            )
        return [count, *shape] if batch_dim else shape


class _KServe(ServerType):
    OPTIONS: ClassVar[dict[str, str]] = {
        "input_name": "the input the payload feeds (default: the model's first input)",
        "datatype": "the input's datatype, e.g. FP32 (default: from the model's metadata)",
        "shape": "one sample's shape, comma-separated, -1 for one dimension sized by the payload "
        "(default: the metadata's shape without its batch dimension)",
        "output_name": "the output given back to LoadGen (default: the first)",
        "batch_dim": "prefix a batch dimension to the input shape (default true)",
        "model_version": "the model version to ask for (default: the server's choice)",
    }

    def configure(self, opts: Options) -> None:
        self.batch_dim = opts.boolean("batch_dim", True)
        self.version = opts.text("model_version")
        datatype = opts.text("datatype").upper()
        if datatype and datatype not in DATATYPES:
            opts.violations.add(f"{self.field}.datatype", f"must be one of {', '.join(DATATYPES)}")
        self._wanted = (opts.text("input_name"), datatype, opts.integers("shape"), opts.text("output_name"))
        self.plan: TensorPlan | None = None

    def plan_from_metadata(self, inputs: list[tuple[str, str, list[int]]], outputs: list[str]) -> TensorPlan:
        """Options first, then what the server says about the model."""
        input_name, datatype, shape, output_name = self._wanted
        spec = next((item for item in inputs if item[0] == input_name), None) if input_name else None
        if spec is None and inputs and not input_name:
            spec = inputs[0]
        if spec is None and not (input_name and datatype and shape is not None):
            names = ", ".join(item[0] for item in inputs) or "none"
            raise FailedPrecondition(f"model {self.model!r} has no input {input_name or '(any)'}; its inputs: {names}")
        meta_name, meta_type, meta_shape = spec if spec is not None else (input_name, datatype, shape or [])
        datatype = datatype or meta_type.upper()
        if datatype not in DATATYPES:
            raise FailedPrecondition(f"input {meta_name!r} of model {self.model!r} has datatype {datatype}, "
                                     "which samples cannot carry as raw bytes")
        if shape is None:
            shape = list(meta_shape[1:] if self.batch_dim and meta_shape else meta_shape)
        if output_name and outputs and output_name not in outputs:
            raise FailedPrecondition(f"model {self.model!r} has no output {output_name!r}; its outputs: "
                                     f"{', '.join(outputs)}")
        return TensorPlan(meta_name, datatype, shape, output_name or (outputs[0] if outputs else ""))

    def warmup_payloads(self) -> list[bytes]:
        plan = self._ready_plan()
        elements = math.prod(1 if d == -1 else d for d in plan.sample_shape)
        return [bytes(elements * plan.itemsize)]

    def _ready_plan(self) -> TensorPlan:
        if self.plan is None:
            raise FailedPrecondition("the model was not prepared")
        return self.plan

    def split(self, output: bytes, count: int) -> list[bytes]:
        if count == 1:
            return [output]
        if len(output) % count:
            raise ServerError(f"an output of {len(output)} bytes does not split into {count} samples")
        size = len(output) // count
        return [output[i * size : (i + 1) * size] for i in range(count)]


class KServeHttpServer(_KServe):
    name = "kserve_v2_http"
    OPTIONS: ClassVar[dict[str, str]] = {
        **_KServe.OPTIONS,
        "binary": "send and ask for tensors with the binary data extension (default true)",
        "load": "ask the server's model repository to load the model when it is not ready (default true)",
    }

    def configure(self, opts: Options) -> None:
        super().configure(opts)
        self.binary = opts.boolean("binary", True)
        self.load = opts.boolean("load", True)
        self._http = HttpClient(self.endpoint, self.request_timeout_s, self.concurrency)
        version = f"/versions/{self.version}" if self.version else ""
        self._model_path = f"/v2/models/{self.model}{version}"

    def prepare(self, deadline: float) -> None:
        asked_to_load = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"model {self.model!r} was not ready on {self.endpoint} in time")
            status, _ = self._http.json("GET", f"{self._model_path}/ready", timeout_s=min(remaining, 10.0))
            if status == 200:
                break
            if self.load and not asked_to_load:
                asked_to_load = True
                # Triton and KServe load from their repository on request; a server without one
                # answers 4xx and the readiness wait below decides.
                self._http.json("POST", f"/v2/repository/models/{self.model}/load", {}, timeout_s=remaining)
                continue
            time.sleep(0.2)
        self._read_metadata()

    def prepare_client(self, deadline: float) -> None:
        """The model's metadata (input name, datatype, shape; outputs), read from the server the
        SUT agent prepared: the LoadGen side's direct client builds its requests from it."""
        if self.plan is None:
            self._read_metadata()

    def _read_metadata(self) -> None:
        metadata = self._http.json_ok("GET", self._model_path)
        inputs = [
            (str(item.get("name", "")), str(item.get("datatype", "")), [int(d) for d in item.get("shape", [])])
            for item in metadata.get("inputs", []) or []
        ]
        outputs = [str(item.get("name", "")) for item in metadata.get("outputs", []) or []]
        self.plan = self.plan_from_metadata(inputs, outputs)

    def _call(self, payloads: Sequence[bytes]) -> HttpCall:
        plan = self._ready_plan()
        count = len(payloads)
        data = payloads[0] if count == 1 else b"".join(payloads)
        shape = plan.batch_shape(count, len(payloads[0]), self.batch_dim)
        tensor: dict[str, Any] = {"name": plan.input_name, "shape": shape, "datatype": plan.datatype}
        request: dict[str, Any] = {"inputs": [tensor]}
        if plan.output_name:
            request["outputs"] = [{"name": plan.output_name, "parameters": {"binary_data": self.binary}}]
        path = f"{self._model_path}/infer"
        if self.binary:
            tensor["parameters"] = {"binary_data_size": len(data)}
            header = json.dumps(request).encode()
            headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
            return HttpCall("POST", path, header + data, headers, False)
        array = np.frombuffer(data, dtype=DATATYPES[plan.datatype])
        tensor["data"] = array.tolist()
        return HttpCall("POST", path, json.dumps(request).encode(), {"Content-Type": "application/json"}, False)

    def http_call(self, payload: bytes) -> HttpCall:
        return self._call([payload])

    def decoder(self) -> KServeDecoder:
        return KServeDecoder(self)

    def infer(self, payloads: Sequence[bytes], on_first_token: FirstTokenCallback | None) -> InferenceResult:
        call = self._call(payloads)
        response = self._http.request(call.method, call.path, call.body, call.headers)
        check_status(response, f"POST {self._model_path}/infer")
        return InferenceResult(self.split(self.decode_output(response.data, response.headers.get(HEADER_LENGTH)),
                                          len(payloads)))

    def decode_output(self, body: bytes, header_length: str | None) -> bytes:
        """The chosen output's bytes from an inference answer (binary extension or JSON)."""
        plan = self._ready_plan()
        binary = b""
        if header_length is not None:
            length = int(header_length)
            body, binary = body[:length], body[length:]
        try:
            answer = json.loads(body)
        except ValueError:
            raise ServerError("the inference answer is not JSON") from None
        offset = 0
        for output in answer.get("outputs", []):
            size = int((output.get("parameters") or {}).get("binary_data_size", 0))
            if not plan.output_name or output.get("name") == plan.output_name:
                if size or ("data" not in output and header_length is not None):
                    return binary[offset : offset + size]
                datatype = str(output.get("datatype", plan.datatype)).upper()
                return np.asarray(output.get("data", []), dtype=DATATYPES.get(datatype, np.float32)).tobytes()
            offset += size
        raise ServerError(f"the answer has no output {plan.output_name or '(any)'}")

    def close(self) -> None:
        self._http.close()


class KServeDecoder(AnswerDecoder):
    """One KServe v2 HTTP answer: the chosen output's bytes (no tokens)."""

    def __init__(self, server: KServeHttpServer) -> None:
        self.server = server
        self.data = b""

    def line(self, line: bytes) -> str:
        raise ServerError("KServe v2 answers are not streamed")

    def whole(self, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.data = self.server.decode_output(body, (headers or {}).get(HEADER_LENGTH))
        self.done = True

    def result(self) -> tuple[str, int]:
        return "", 0

    def output(self) -> bytes:
        return self.data


class KServeGrpcDecoder(AnswerDecoder):
    """One serialized ModelInferResponse: the chosen output's bytes (no tokens)."""

    def __init__(self, server: KServeGrpcServer) -> None:
        self.server = server
        self.data = b""

    def line(self, line: bytes) -> str:
        raise ServerError("ModelInfer answers are not streamed")

    def whole(self, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        try:
            response = inference_pb2.ModelInferResponse.FromString(body)
        except DecodeError:
            raise ServerError("the ModelInfer answer does not parse") from None
        self.data = self.server.output_of(response)
        self.done = True

    def result(self) -> tuple[str, int]:
        return "", 0

    def output(self) -> bytes:
        return self.data


class KServeGrpcServer(_KServe):
    name = "kserve_v2_grpc"

    def configure(self, opts: Options) -> None:
        super().configure(opts)
        # The inference server is not ours: MECBench's own TLS identity does not apply to it.
        self._channel = open_channel(self.endpoint.split("://", 1)[-1].rstrip("/"), plaintext=True)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def prepare(self, deadline: float) -> None:
        last = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"model {self.model!r} was not ready on {self.endpoint} in time ({last})")
            try:
                ready = self._stub.ModelReady(
                    inference_pb2.ModelReadyRequest(name=self.model, version=self.version), timeout=min(remaining, 10.0)
                ).ready
                if ready:
                    break
                last = "not ready"
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise FailedPrecondition(f"the server has no model {self.model!r} ({exc.details()})") from None
            time.sleep(0.2)
        self._read_metadata()

    def prepare_client(self, deadline: float) -> None:
        """The model's metadata, read from the server the SUT agent prepared (see the HTTP type)."""
        if self.plan is None:
            self._read_metadata()

    def _read_metadata(self) -> None:
        try:
            metadata = self._stub.ModelMetadata(
                inference_pb2.ModelMetadataRequest(name=self.model, version=self.version), timeout=10.0
            )
        except grpc.RpcError as exc:
            raise FailedPrecondition(f"model {self.model!r} metadata: {exc.code().name}: {exc.details()}") from None
        inputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]
        self.plan = self.plan_from_metadata(inputs, [t.name for t in metadata.outputs])

    def grpc_call(self, payload: bytes) -> GrpcCall:
        return GrpcCall("/inference.GRPCInferenceService/ModelInfer", self._request([payload]).SerializeToString())

    def decoder(self) -> KServeGrpcDecoder:
        return KServeGrpcDecoder(self)

    def infer(self, payloads: Sequence[bytes], on_first_token: FirstTokenCallback | None) -> InferenceResult:
        request = self._request(payloads)
        try:
            response = self._stub.ModelInfer(request, timeout=self.request_timeout_s)
        except grpc.RpcError as exc:
            raise ServerError(f"ModelInfer: {exc.code().name}: {exc.details()}") from None
        return InferenceResult(self.split(self.output_of(response), len(payloads)))

    def _request(self, payloads: Sequence[bytes]) -> inference_pb2.ModelInferRequest:
        plan = self._ready_plan()
        count = len(payloads)
        data = payloads[0] if count == 1 else b"".join(payloads)
        request = inference_pb2.ModelInferRequest(
            model_name=self.model,
            model_version=self.version,
            inputs=[inference_pb2.ModelInferRequest.InferInputTensor(
                name=plan.input_name, datatype=plan.datatype,
                shape=plan.batch_shape(count, len(payloads[0]), self.batch_dim),
            )],
            raw_input_contents=[data],
        )
        if plan.output_name:
            request.outputs.add(name=plan.output_name)
        return request

    def output_of(self, response: inference_pb2.ModelInferResponse) -> bytes:
        """The chosen output's bytes from a ModelInfer answer."""
        plan = self._ready_plan()
        for index, output in enumerate(response.outputs):
            if plan.output_name and output.name != plan.output_name:
                continue
            if index < len(response.raw_output_contents):
                return bytes(response.raw_output_contents[index])
            field = _CONTENTS_FIELD.get(output.datatype.upper())
            if field is None:
                raise ServerError(f"output {output.name} of datatype {output.datatype} came without raw contents")
            values = getattr(output.contents, field)
            return np.asarray(values, dtype=DATATYPES[output.datatype.upper()]).tobytes()
        raise ServerError(f"the answer has no output {plan.output_name or '(any)'}")

    def close(self) -> None:
        self._channel.close()
