"""The KServe reference server (kserve's own ModelServer from PyPI, serving an ONNX model) answers the
Open Inference Protocol v2 over REST (JSON and the binary tensor extension) and gRPC as the KServe v2
adapters expect."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import urllib3
from onnx import TensorProto, helper, numpy_helper

from mecbench.kserve import inference_pb2, inference_pb2_grpc
from tests.servers.kserve_reference import KSERVE_PYTHON, KServeReference, kserve_available, start_kserve_reference

pytestmark = [
    pytest.mark.skipif(not kserve_available(), reason=f"{KSERVE_PYTHON} not found: scripts/setup makes .venv-kserve"),
    pytest.mark.slow,
]

MODEL_NAME = "tiny"
WEIGHT = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.0) / 7.0
INPUT = np.array([[1.0, 2.0, 3.0, 4.0], [-0.5, 0.25, 8.0, -3.0]], dtype=np.float32)


def write_tiny_model(path: Path) -> None:
    """input float32 [-1, 4] -> MatMul(WEIGHT) -> logits float32 [-1, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 3])],
        [numpy_helper.from_array(WEIGHT, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what the pinned ONNX Runtimes read
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeReference]:
    directory = tmp_path_factory.mktemp("kserve")
    model_path = directory / "tiny.onnx"
    write_tiny_model(model_path)
    reference = start_kserve_reference(model_path, MODEL_NAME)
    yield reference
    reference.stop()
    assert reference.process.returncode is not None


@pytest.fixture(scope="module")
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=10.0))
    yield pool
    pool.clear()


def expected_logits() -> np.ndarray:
    return INPUT @ WEIGHT


def test_model_metadata_lists_the_onnx_inputs_and_outputs(server: KServeReference, http: urllib3.PoolManager) -> None:
    response = http.request("GET", f"{server.http_url}/v2/models/{MODEL_NAME}")
    assert response.status == 200
    metadata = response.json()
    assert metadata["name"] == MODEL_NAME
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]

    assert http.request("GET", f"{server.http_url}/v2/models/{MODEL_NAME}/ready").status == 200
    missing = http.request("GET", f"{server.http_url}/v2/models/no-such-model")
    assert missing.status == 404
    assert "error" in missing.json()


def test_json_infer_matches_numpy(server: KServeReference, http: urllib3.PoolManager) -> None:
    body = {"id": "json-1", "inputs": [{"name": "input", "shape": list(INPUT.shape), "datatype": "FP32", "data": INPUT.ravel().tolist()}]}
    response = http.request(
        "POST", f"{server.http_url}/v2/models/{MODEL_NAME}/infer",
        body=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    assert response.status == 200, response.data
    answer = response.json()
    assert answer["id"] == "json-1"
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [2, 3])
    np.testing.assert_allclose(np.array(output["data"], dtype=np.float32).reshape(output["shape"]), expected_logits(), rtol=1e-6)


def test_json_infer_of_an_unknown_model_is_404(server: KServeReference, http: urllib3.PoolManager) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    response = http.request(
        "POST", f"{server.http_url}/v2/models/no-such-model/infer",
        body=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    assert response.status == 404
    assert "no-such-model" in response.json()["error"]


def test_binary_tensor_extension(server: KServeReference, http: urllib3.PoolManager) -> None:
    header = json.dumps({
        "id": "binary-1",
        "inputs": [{"name": "input", "shape": list(INPUT.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": INPUT.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    response = http.request(
        "POST", f"{server.http_url}/v2/models/{MODEL_NAME}/infer", body=header + INPUT.tobytes(),
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status == 200, response.data
    json_length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.data[:json_length])
    assert answer["id"] == "binary-1"
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [2, 3])
    assert "data" not in output
    size = output["parameters"]["binary_data_size"]
    assert size == len(response.data) - json_length == 2 * 3 * 4
    logits = np.frombuffer(response.data[json_length:json_length + size], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(logits, expected_logits(), rtol=1e-6)


def test_grpc_raw_infer(server: KServeReference) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=10).ready
        metadata = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name=MODEL_NAME), timeout=10)
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 4])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("logits", "FP32", [-1, 3])]

        request = inference_pb2.ModelInferRequest(
            model_name=MODEL_NAME, id="grpc-1",
            inputs=[inference_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(INPUT.shape))],
            raw_input_contents=[INPUT.tobytes()],
        )
        response = stub.ModelInfer(request, timeout=10)
        assert response.id == "grpc-1"
        [output] = response.outputs
        assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [2, 3])
        # Raw in, raw out: the data is in raw_output_contents, not in typed contents.
        assert len(response.raw_output_contents) == 1
        assert not output.HasField("contents")
        logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(output.shape))
        np.testing.assert_allclose(logits, expected_logits(), rtol=1e-6)

        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(inference_pb2.ModelInferRequest(model_name="no-such-model", inputs=request.inputs,
                                                            raw_input_contents=request.raw_input_contents), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_typed_contents_infer(server: KServeReference) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = inference_pb2.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(INPUT.shape),
            contents=inference_pb2.InferTensorContents(fp32_contents=INPUT.ravel().tolist()),
        )
        response = stub.ModelInfer(inference_pb2.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor]), timeout=10)
        # Typed in, typed out.
        assert not response.raw_output_contents
        [output] = response.outputs
        logits = np.array(output.contents.fp32_contents, dtype=np.float32).reshape(list(output.shape))
        np.testing.assert_allclose(logits, expected_logits(), rtol=1e-6)
