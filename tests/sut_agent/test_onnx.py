"""The ONNX Runtime backend with a small model built here with the `onnx` helper API."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mecbench.v1 import common_pb2, sut_agent_pb2
from tests.conftest import field_violations
from tests.sut_agent.conftest import Agent

FEATURES, OUTPUTS = 16, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """relu(x @ W + b) on x of shape [N, 16] with a symbolic batch dimension N."""
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((FEATURES, OUTPUTS)).astype(np.float32)
    bias = rng.standard_normal(OUTPUTS).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "dense_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUTPUTS])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path = tmp_path_factory.mktemp("models") / "dense.onnx"
    onnx.save(proto, str(path))
    return path, weights, bias


def onnx_config(path: Path, **fields: object) -> sut_agent_pb2.SutConfig:
    base: dict[str, object] = {
        "model_path": str(path),
        "sample_shape": [FEATURES],
        "data_type": common_pb2.DATA_TYPE_FLOAT32,
        "max_batch_size": 8,
        "max_concurrency": 2,
        "intra_op_threads": 1,
    }
    base |= fields
    return sut_agent_pb2.SutConfig(onnxruntime=sut_agent_pb2.OnnxRuntimeBackendConfig(**base))  # type: ignore[arg-type]


def test_outputs_match_numpy(agent: Agent, model: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, weights, bias = model
    status = agent.start(onnx_config(path))
    assert status.state == sut_agent_pb2.BACKEND_STATE_READY and status.backend == "onnxruntime"
    inputs = np.random.default_rng(2).standard_normal((20, FEATURES)).astype(np.float32)
    ids = list(range(100, 120))
    reply = agent.infer(ids, [row.tobytes() for row in inputs])
    assert not reply.errors
    outputs = {
        sample_id: np.frombuffer(out, dtype=np.float32)
        for sample_id, out in zip(reply.sample_ids, reply.outputs, strict=True)
    }
    assert sorted(outputs) == ids
    expected = np.maximum(inputs @ weights + bias, 0)
    for position, sample_id in enumerate(ids):
        np.testing.assert_allclose(outputs[sample_id], expected[position], rtol=1e-5, atol=1e-5)
    stats = agent.stats()
    assert stats.samples_completed == 20
    # Twenty samples arrived together: they were run in batches of up to eight, not one by one.
    assert 3 <= stats.batches < 20 and stats.mean_batch_size > 1
    assert stats.compute.max.ToNanoseconds() > 0


def test_model_shape_is_taken_from_the_model_when_static(
    agent: Agent, model: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    path, weights, bias = model
    agent.start(onnx_config(path, sample_shape=[], data_type=common_pb2.DATA_TYPE_UNSPECIFIED, input_name="x"))
    row = np.ones(FEATURES, dtype=np.float32)
    reply = agent.infer([1], [row.tobytes()])
    np.testing.assert_allclose(
        np.frombuffer(reply.outputs[0], dtype=np.float32), np.maximum(row @ weights + bias, 0), rtol=1e-5
    )


def test_bad_payloads_fail_per_sample(agent: Agent, model: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, _ = model
    agent.start(onnx_config(path))
    good = np.zeros(FEATURES, dtype=np.float32).tobytes()
    reply = agent.infer([1, 2, 3], [good, b"short", good])
    errors = dict(zip(reply.sample_ids, reply.errors, strict=True))
    assert errors[1] == "" and errors[3] == "" and "64 bytes" in errors[2]
    reply = agent.infer([4, 5])  # no payloads: this backend needs them
    assert all("no payload" in error for error in reply.errors)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model_path": "/nonexistent/model.onnx"}, ["config.onnxruntime.model_path"]),
        ({"input_name": "nope"}, ["config.onnxruntime.input_name"]),
        ({"sample_shape": [15]}, ["config.onnxruntime.sample_shape"]),
        ({"sample_shape": [4, 4]}, ["config.onnxruntime.sample_shape"]),
        ({"data_type": common_pb2.DATA_TYPE_INT64}, ["config.onnxruntime.data_type"]),
        ({"providers": ["NoSuchExecutionProvider"]}, ["config.onnxruntime.providers"]),
        ({"model_path": ""}, ["config.onnxruntime.model_path"]),
    ],
)
def test_bad_onnx_configs_are_invalid(
    agent: Agent, model: tuple[Path, np.ndarray, np.ndarray], fields: dict[str, object], expected: list[str]
) -> None:
    path, _, _ = model
    agent.stub.Stop(sut_agent_pb2.StopRequest())
    with pytest.raises(grpc.RpcError) as info:
        agent.start(onnx_config(path, **fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(info.value)) == expected
    reply: sut_agent_pb2.GetStatusResponse = agent.stub.GetStatus(sut_agent_pb2.GetStatusRequest())
    assert reply.status.state == sut_agent_pb2.BACKEND_STATE_STOPPED


def test_a_file_that_is_not_a_model_is_invalid(agent: Agent, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(grpc.RpcError) as info:
        agent.start(onnx_config(junk))
    assert list(field_violations(info.value)) == ["config.onnxruntime.model_path"]
