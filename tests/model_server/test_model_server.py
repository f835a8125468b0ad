"""The model server as a real subprocess on loopback, spoken to over plain HTTP and gRPC."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import urllib3

from mecbench.kserve import inference_pb2, inference_pb2_grpc
from model_server.models import ClassificationTask, build_bigram_lm, make_classification_task

CORPUS = b"""The quick brown fox jumps over the lazy dog.
A model server answers requests over the network.
Benchmarks measure the latency and the throughput of inference servers.
The cat sat on the mat and the dog sat on the log.
Edge networks add delay and loss to every packet that crosses them.
"""
PROMPT = "The server "
START_TIMEOUT_S = 20.0


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    task: ClassificationTask
    models: Path


def wait_for_port_file(path: Path, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            ports: dict[str, Any] = json.loads(path.read_text())
            return ports
        assert process.poll() is None, f"server exited with {process.returncode}"
        time.sleep(0.05)
    raise TimeoutError("the server wrote no port file")


def server_command(models: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "model_server", "--host", "127.0.0.1", "--models", str(models), *flags]


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("model_server")
    models = root / "models"
    models.mkdir()
    build_bigram_lm(CORPUS, models / "tiny.lm.onnx")
    task = make_classification_task(root / "task")
    shutil.copy(task.model_path, models / "classifier.onnx")
    # A model of its own for the unload/load test, so the others never disappear.
    shutil.copy(task.model_path, models / "scratch.onnx")
    port_file = root / "ports.json"
    with (root / "server.log").open("wb") as log_file:
        process = subprocess.Popen(
            server_command(
                models, "--http-port", "0", "--grpc-port", "0", "--port-file", str(port_file), "--log-level", "warning"
            ),
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        ports = wait_for_port_file(port_file, process)
        yield Server(process, ports["http_port"], ports["grpc_port"], task, models)
    finally:
        if process.poll() is None:
            assert stop(process) == 0
        assert process.stdout is not None
        assert process.stdout.read() == b"", "the server printed on stdout"
        process.stdout.close()
        server_log = (root / "server.log").read_text()
        assert '"level": "error"' not in server_log and "Traceback" not in server_log, server_log


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[urllib3.HTTPConnectionPool]:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.http_port, maxsize=4, timeout=10.0, retries=False)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def grpc_stub(server: Server) -> Iterator[inference_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def post(http: urllib3.HTTPConnectionPool, path: str, payload: Any, **kwargs: Any) -> urllib3.BaseHTTPResponse:
    return http.request(
        "POST", path, body=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, **kwargs
    )


def samples(task: ClassificationTask, count: int) -> np.ndarray:
    loaded: np.ndarray = np.load(task.samples_path)
    return loaded[:count]


def local_logits(task: ClassificationTask, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(task.model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": inputs})
    return np.asarray(logits)


def sse_payloads(chunks: list[bytes]) -> list[str]:
    """The data of each server-sent event, checking each chunk is exactly one event."""
    payloads = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1, chunk
        payloads.append(chunk[len(b"data: ") : -2].decode())
    return payloads


def stream_chunks(
    http: urllib3.HTTPConnectionPool, path: str, payload: Any
) -> tuple[urllib3.BaseHTTPResponse, list[bytes]]:
    response = http.request(
        "POST",
        path,
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        preload_content=False,
    )
    assert response.status == 200, response.data
    assert response.headers.get("Transfer-Encoding") == "chunked"
    chunks = list(response.read_chunked())
    response.release_conn()
    return response, chunks


# KServe v2 over REST.


def test_v2_health_and_metadata(http: urllib3.HTTPConnectionPool) -> None:
    assert http.request("GET", "/v2/health/live").json() == {"live": True}
    assert http.request("GET", "/v2/health/ready").json() == {"ready": True}
    assert http.request("GET", "/health").status == 200
    server_metadata = http.request("GET", "/v2").json()
    assert server_metadata["name"] == "mecbench-model-server"
    assert "binary_tensor_data" in server_metadata["extensions"]
    metadata = http.request("GET", "/v2/models/classifier").json()
    assert metadata == {
        "name": "classifier",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert http.request("GET", "/v2/models/classifier/versions/1").json() == metadata
    assert http.request("GET", "/v2/models/classifier/ready").status == 200
    lm = http.request("GET", "/v2/models/tiny").json()
    assert lm["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}]
    assert lm["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 257]}]


def test_v2_json_infer_matches_onnxruntime(server: Server, http: urllib3.HTTPConnectionPool) -> None:
    inputs = samples(server.task, 8)
    request: dict[str, Any] = {
        "id": "request-1",
        "inputs": [{"name": "input", "shape": [8, 16], "datatype": "FP32", "data": inputs.ravel().tolist()}],
    }
    response = post(http, "/v2/models/classifier/infer", request)
    assert response.status == 200, response.data
    body = response.json()
    assert body["model_name"] == "classifier"
    assert body["id"] == "request-1"
    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [8, 4])
    served = np.asarray(output["data"], dtype=np.float32).reshape(8, 4)
    np.testing.assert_allclose(served, local_logits(server.task, inputs), rtol=1e-5, atol=1e-6)

    # Nested data is the same tensor.
    request["inputs"][0]["data"] = inputs.tolist()
    nested = post(http, "/v2/models/classifier/infer", request).json()
    assert nested["outputs"][0]["data"] == output["data"]


def binary_infer(http: urllib3.HTTPConnectionPool, inputs: np.ndarray, binary_output: bool) -> urllib3.BaseHTTPResponse:
    raw = inputs.astype("<f4").tobytes()
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(inputs.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    if binary_output:
        header["outputs"] = [{"name": "logits", "parameters": {"binary_data": True}}]
    header_bytes = json.dumps(header).encode()
    return http.request(
        "POST",
        "/v2/models/classifier/infer",
        body=header_bytes + raw,
        headers={"Inference-Header-Content-Length": str(len(header_bytes)), "Content-Type": "application/octet-stream"},
    )


def test_v2_binary_infer_matches_onnxruntime(server: Server, http: urllib3.HTTPConnectionPool) -> None:
    inputs = np.load(server.task.samples_path)
    response = binary_infer(http, inputs, binary_output=True)
    assert response.status == 200, response.data
    assert response.headers["Content-Type"] == "application/octet-stream"
    header_length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.data[:header_length])
    (output,) = header["outputs"]
    assert output["parameters"]["binary_data_size"] == len(response.data) - header_length == inputs.shape[0] * 4 * 4
    assert "data" not in output
    served = np.frombuffer(response.data[header_length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(served, local_logits(server.task, inputs), rtol=1e-5, atol=1e-6)
    # The served classifier is as accurate as the task says (a near-tie may flip one sample).
    accuracy = float(np.mean(served.argmax(axis=1) == np.load(server.task.labels_path)))
    assert abs(accuracy - server.task.expected_top1) <= 1 / len(inputs)
    assert 0.5 < server.task.expected_top1 < 1.0

    # Binary in, JSON out: the same numbers.
    json_out = binary_infer(http, inputs[:4], binary_output=False)
    assert json_out.headers["Content-Type"] == "application/json"
    assert "Inference-Header-Content-Length" not in json_out.headers
    np.testing.assert_array_equal(
        np.asarray(json_out.json()["outputs"][0]["data"], dtype=np.float32), served[:4].ravel()
    )

    # binary_data_output at the top level asks the same as per-output binary_data.
    raw = inputs[:2].tobytes()
    header_bytes = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [2, 16], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    top_level = http.request(
        "POST",
        "/v2/models/classifier/infer",
        body=header_bytes + raw,
        headers={"Inference-Header-Content-Length": str(len(header_bytes))},
    )
    split = int(top_level.headers["Inference-Header-Content-Length"])
    np.testing.assert_array_equal(np.frombuffer(top_level.data[split:], dtype="<f4"), served[:2].ravel())


def test_v2_errors(http: urllib3.HTTPConnectionPool) -> None:
    unknown = post(http, "/v2/models/missing/infer", {"inputs": []})
    assert unknown.status == 404 and "error" in unknown.json()
    assert http.request("GET", "/v2/models/missing").status == 404
    assert http.request("GET", "/v2/models/missing/ready").status == 404
    assert http.request("GET", "/v2/models/classifier/versions/7").status == 404

    def bad(request: Any) -> str:
        response = post(http, "/v2/models/classifier/infer", request)
        assert response.status == 400, response.data
        message: str = response.json()["error"]
        return message

    one_row = list(range(16))
    assert "datatype" in bad({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "INT64", "data": one_row}]})
    assert "shape" in bad({"inputs": [{"name": "input", "shape": [1, 15], "datatype": "FP32", "data": one_row[:15]}]})
    assert "elements" in bad({"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32", "data": one_row}]})
    assert "no input" in bad({"inputs": [{"name": "nope", "shape": [1, 16], "datatype": "FP32", "data": one_row}]})
    assert "outputs" in bad(
        {
            "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": one_row}],
            "outputs": [{"name": "nope"}],
        }
    )
    malformed = http.request("POST", "/v2/models/classifier/infer", body=b"{not json")
    assert malformed.status == 400 and "error" in malformed.json()
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]}
    ).encode()
    short = http.request(
        "POST",
        "/v2/models/classifier/infer",
        body=header + b"\0" * 10,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert short.status == 400 and "past the end" in short.json()["error"]
    assert http.request("GET", "/v2/no/such/path").status == 404
    assert http.request("DELETE", "/v2/models/classifier").status == 405


def test_v2_repository_unload_and_load(http: urllib3.HTTPConnectionPool) -> None:
    assert http.request("POST", "/v2/repository/models/scratch/unload").status == 200
    assert http.request("GET", "/v2/models/scratch/ready").status == 404
    index = {entry["name"]: entry["state"] for entry in http.request("POST", "/v2/repository/index").json()}
    assert index["scratch"] == "UNAVAILABLE" and index["classifier"] == "READY"
    assert http.request("POST", "/v2/repository/models/scratch/load").status == 200
    assert http.request("GET", "/v2/models/scratch/ready").status == 200
    assert http.request("POST", "/v2/repository/models/missing/load").status == 404
    assert http.request("POST", "/v2/repository/models/missing/unload").status == 404


# KServe v2 over gRPC.


def test_grpc_health_metadata_and_infer(server: Server, grpc_stub: inference_pb2_grpc.GRPCInferenceServiceStub) -> None:
    assert grpc_stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=5).live
    assert grpc_stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=5).ready
    assert grpc_stub.ModelReady(inference_pb2.ModelReadyRequest(name="classifier"), timeout=5).ready
    metadata = grpc_stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="classifier"), timeout=5)
    assert (metadata.platform, metadata.inputs[0].datatype, list(metadata.inputs[0].shape)) == (
        "onnxruntime_onnx",
        "FP32",
        [-1, 16],
    )

    inputs = samples(server.task, 5)
    expected = local_logits(server.task, inputs)
    tensor = inference_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[5, 16])
    raw_reply = grpc_stub.ModelInfer(
        inference_pb2.ModelInferRequest(
            model_name="classifier", id="g1", inputs=[tensor], raw_input_contents=[inputs.tobytes()]
        ),
        timeout=5,
    )
    assert raw_reply.id == "g1"
    (output,) = raw_reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [5, 4])
    served = np.frombuffer(raw_reply.raw_output_contents[0], dtype="<f4").reshape(5, 4)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)

    typed = inference_pb2.ModelInferRequest.InferInputTensor(
        name="input",
        datatype="FP32",
        shape=[5, 16],
        contents=inference_pb2.InferTensorContents(fp32_contents=inputs.ravel().tolist()),
    )
    typed_reply = grpc_stub.ModelInfer(
        inference_pb2.ModelInferRequest(model_name="classifier", inputs=[typed]), timeout=5
    )
    np.testing.assert_array_equal(np.frombuffer(typed_reply.raw_output_contents[0], dtype="<f4").reshape(5, 4), served)


def test_grpc_errors(grpc_stub: inference_pb2_grpc.GRPCInferenceServiceStub) -> None:
    tensor = inference_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 16])
    with pytest.raises(grpc.RpcError) as missing:
        grpc_stub.ModelInfer(
            inference_pb2.ModelInferRequest(model_name="missing", inputs=[tensor], raw_input_contents=[b"\0" * 64]),
            timeout=5,
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as metadata_missing:
        grpc_stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="missing"), timeout=5)
    assert metadata_missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as short:
        grpc_stub.ModelInfer(
            inference_pb2.ModelInferRequest(model_name="classifier", inputs=[tensor], raw_input_contents=[b"\0" * 60]),
            timeout=5,
        )
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wrong_type = inference_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=[1, 16])
    with pytest.raises(grpc.RpcError) as bad_type:
        grpc_stub.ModelInfer(
            inference_pb2.ModelInferRequest(
                model_name="classifier", inputs=[wrong_type], raw_input_contents=[b"\0" * 128]
            ),
            timeout=5,
        )
    assert bad_type.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# OpenAI-compatible API.


def test_openai_models(http: urllib3.HTTPConnectionPool) -> None:
    listing = http.request("GET", "/v1/models").json()
    assert listing["object"] == "list"
    assert [(card["id"], card["object"], card["owned_by"]) for card in listing["data"]] == [
        ("tiny", "model", "mecbench")
    ]
    assert isinstance(listing["data"][0]["created"], int)


def test_openai_completion(http: urllib3.HTTPConnectionPool) -> None:
    body = post(http, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 64}).json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    text = choice["text"]
    assert text, "the model generated nothing"
    assert choice["finish_reason"] == "stop"
    # Byte-level tokens: one token per byte of ASCII text.
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT.encode()),
        "completion_tokens": len(text.encode()),
        "total_tokens": len(PROMPT.encode()) + len(text.encode()),
    }
    # A list of one prompt, and the prompt as token ids, are the same request.
    assert (
        post(http, "/v1/completions", {"model": "tiny", "prompt": [PROMPT], "max_tokens": 64}).json()["choices"][0][
            "text"
        ]
        == text
    )
    as_ids = post(http, "/v1/completions", {"model": "tiny", "prompt": list(PROMPT.encode()), "max_tokens": 64})
    assert as_ids.json()["choices"][0]["text"] == text

    short = post(http, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).json()
    assert short["choices"][0] == {"index": 0, "text": text[:2], "logprobs": None, "finish_reason": "length"}
    assert short["usage"]["completion_tokens"] == 2
    default = post(http, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "ignore_eos": True}).json()
    assert default["usage"]["completion_tokens"] == 16


def test_openai_completion_stream_matches_non_stream(http: urllib3.HTTPConnectionPool) -> None:
    request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 64}
    expected = post(http, "/v1/completions", request).json()
    response, chunks = stream_chunks(
        http, "/v1/completions", {**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert response.headers["Content-Type"].startswith("text/event-stream")
    payloads = sse_payloads(chunks)
    assert payloads[-1] == "[DONE]"
    events = [json.loads(payload) for payload in payloads[:-1]]
    assert all(event["object"] == "text_completion" and event["id"] == events[0]["id"] for event in events)
    *tokens, final, usage = events
    # One event per generated token, each sent as it was generated.
    assert len(tokens) == expected["usage"]["completion_tokens"]
    assert all(
        len(event["choices"][0]["text"]) == 1 and event["choices"][0]["finish_reason"] is None for event in tokens
    )
    assert "".join(event["choices"][0]["text"] for event in tokens) == expected["choices"][0]["text"]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"] == expected["usage"]
    assert all(event["usage"] is None for event in [*tokens, final])

    # Without include_usage: no usage chunk, no usage fields.
    _, plain_chunks = stream_chunks(http, "/v1/completions", {**request, "stream": True})
    plain = [json.loads(payload) for payload in sse_payloads(plain_chunks)[:-1]]
    assert len(plain) == len(tokens) + 1 and all("usage" not in event for event in plain)


def test_openai_stream_sends_each_token_as_generated(http: urllib3.HTTPConnectionPool) -> None:
    request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    response = http.request("POST", "/v1/completions", body=json.dumps(request).encode(), preload_content=False)
    arrivals = [time.monotonic() - started for _ in response.read_chunked()]
    response.release_conn()
    assert len(arrivals) == 3000 + 2
    # A server that buffered the stream would deliver the first token with the last.
    assert arrivals[0] < arrivals[-1] / 2


def test_client_hanging_up_mid_stream(server: Server, http: urllib3.HTTPConnectionPool) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as connection:
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 5000, "ignore_eos": True, "stream": True})
        connection.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        assert connection.recv(1024).startswith(b"HTTP/1.1 200")
    assert http.request("GET", "/v2/health/ready").status == 200


def test_openai_ignore_eos_runs_to_max_tokens(http: urllib3.HTTPConnectionPool) -> None:
    body = post(
        http, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
    ).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 200 == len(body["choices"][0]["text"].encode())


def test_openai_chat(http: urllib3.HTTPConnectionPool) -> None:
    messages = [
        {"role": "system", "content": "The "},
        {"role": "user", "content": [{"type": "text", "text": "server "}]},
    ]
    body = post(http, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 64}).json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    # The prompt is the messages' contents run together.
    completion = post(http, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 64}).json()
    assert choice["message"]["content"] == completion["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == len(PROMPT)

    _, chunks = stream_chunks(
        http,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": messages,
            "max_tokens": 64,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = sse_payloads(chunks)
    assert payloads[-1] == "[DONE]"
    events = [json.loads(payload) for payload in payloads[:-1]]
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    role, *tokens, final, usage = events
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(event["choices"][0]["delta"]["content"] for event in tokens) == choice["message"]["content"]
    assert final["choices"][0]["finish_reason"] == "stop" and final["choices"][0]["delta"] == {}
    assert usage["usage"] == body["usage"]


def test_openai_errors(http: urllib3.HTTPConnectionPool) -> None:
    unknown = post(http, "/v1/completions", {"model": "missing", "prompt": "x"})
    assert unknown.status == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error"
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert (
        post(http, "/v1/chat/completions", {"model": "missing", "messages": [{"role": "user", "content": "x"}]}).status
        == 404
    )
    malformed = http.request("POST", "/v1/completions", body=b'{"model": "tiny", ')
    assert malformed.status == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    assert post(http, "/v1/completions", {"prompt": "x"}).status == 400
    assert post(http, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}).status == 400
    assert post(http, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**6}).status == 400
    assert post(http, "/v1/chat/completions", {"model": "tiny", "messages": []}).status == 400


# Ollama's API.


def test_ollama_tags_version_show(http: urllib3.HTTPConnectionPool) -> None:
    tags = http.request("GET", "/api/tags").json()
    (model,) = tags["models"]
    assert model["name"] == model["model"] == "tiny:latest"
    assert len(model["digest"]) == 64 and model["size"] > 0
    assert "version" in http.request("GET", "/api/version").json()
    for name in ("tiny", "tiny:latest"):
        show = post(http, "/api/show", {"model": name})
        assert show.status == 200 and show.json()["details"]["format"] == "onnx"
    missing = post(http, "/api/show", {"model": "tiny:7b"})
    assert missing.status == 404 and "error" in missing.json()


def test_ollama_pull(http: urllib3.HTTPConnectionPool) -> None:
    assert post(http, "/api/pull", {"model": "tiny", "stream": False}).json() == {"status": "success"}
    response = post(http, "/api/pull", {"model": "tiny:latest"})
    assert response.headers["Content-Type"] == "application/x-ndjson"
    statuses = [json.loads(line)["status"] for line in response.data.splitlines()]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"

    missing = post(http, "/api/pull", {"model": "missing", "stream": False})
    assert missing.status == 500
    assert missing.json() == {"error": "pull model manifest: file does not exist"}
    streamed = post(http, "/api/pull", {"model": "missing"})
    assert streamed.status == 200
    lines = [json.loads(line) for line in streamed.data.splitlines()]
    assert lines[-1] == {"error": "pull model manifest: file does not exist"}


def test_ollama_generate(http: urllib3.HTTPConnectionPool) -> None:
    expected = post(http, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 64}).json()
    response, chunks = stream_chunks(http, "/api/generate", {"model": "tiny", "prompt": PROMPT})
    assert response.headers["Content-Type"] == "application/x-ndjson"
    # One NDJSON line per chunk, one chunk per token.
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in chunks)
    lines = [json.loads(chunk) for chunk in chunks]
    *tokens, final = lines
    assert all(line["model"] == "tiny" and line["done"] is False for line in tokens)
    assert "".join(line["response"] for line in tokens) == expected["choices"][0]["text"]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["eval_count"] == len(tokens)
    assert final["prompt_eval_count"] == len(PROMPT)
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert final["created_at"].endswith("Z")

    limited = post(
        http,
        "/api/generate",
        {"model": "tiny:latest", "prompt": PROMPT, "stream": False, "options": {"num_predict": 3}},
    )
    body = limited.json()
    assert body["response"] == expected["choices"][0]["text"][:3]
    assert (body["done"], body["done_reason"], body["eval_count"]) == (True, "length", 3)
    assert body["context"] == list(PROMPT.encode()) + list(body["response"].encode())

    loaded = post(http, "/api/generate", {"model": "tiny"}).json()
    assert (loaded["done"], loaded["done_reason"]) == (True, "load")


def test_ollama_chat(http: urllib3.HTTPConnectionPool) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    _, chunks = stream_chunks(http, "/api/chat", {"model": "tiny", "messages": messages})
    *tokens, final = [json.loads(chunk) for chunk in chunks]
    text = "".join(line["message"]["content"] for line in tokens)
    assert all(line["message"]["role"] == "assistant" for line in tokens)
    assert final["done"] is True and final["eval_count"] == len(tokens)
    whole = post(http, "/api/chat", {"model": "tiny", "messages": messages, "stream": False}).json()
    assert whole["message"] == {"role": "assistant", "content": text}


def test_ollama_errors(http: urllib3.HTTPConnectionPool) -> None:
    for path, payload in [
        ("/api/generate", {"model": "missing", "prompt": "x"}),
        ("/api/chat", {"model": "missing", "messages": [{"role": "user", "content": "x"}]}),
    ]:
        response = post(http, path, payload)
        assert response.status == 404 and "error" in response.json()
    malformed = http.request("POST", "/api/generate", body=b"{")
    assert malformed.status == 400 and "error" in malformed.json()
    assert post(http, "/api/generate", {"prompt": "x"}).status == 400


# HTTP itself.


def test_keep_alive_and_chunked_requests(server: Server) -> None:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.http_port, maxsize=1, block=True, timeout=10.0, retries=False)
    try:
        stream_chunks(pool, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "stream": True})
        assert post(pool, "/v1/completions", {"model": "missing", "prompt": "x"}).status == 404
        stream_chunks(pool, "/api/generate", {"model": "tiny", "prompt": PROMPT})
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 4}).encode()
        chunked = pool.urlopen("POST", "/v1/completions", body=iter([body[:10], body[10:]]), chunked=True)
        assert chunked.status == 200 and chunked.json()["usage"]["completion_tokens"] == 4
        assert post(pool, "/v2/models/classifier/infer", {"inputs": "nope"}).status == 400
        # Every request and response was framed right: they all shared one connection.
        assert pool.num_connections == 1
    finally:
        pool.close()


# Process life cycle.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_startup_delay_then_sigterm(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(server.task.model_path, models / "classifier.onnx")
    port = free_port()
    port_file = tmp_path / "ports.json"
    delay = 1.0
    probe = urllib3.HTTPConnectionPool("127.0.0.1", port, timeout=1.0, retries=False)
    started = time.monotonic()
    process = subprocess.Popen(
        server_command(models, "--http-port", str(port), "--startup-delay", str(delay), "--port-file", str(port_file)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            assert time.monotonic() - started < START_TIMEOUT_S, "the server never became ready"
            assert process.poll() is None, f"server exited with {process.returncode}"
            try:
                if probe.request("GET", "/v2/health/ready").status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            time.sleep(0.05)
        assert time.monotonic() - started >= delay
        # The port file is written once the ports are bound, which may be just after the first
        # request is answered.
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() - started < START_TIMEOUT_S, "no port file"
            time.sleep(0.02)
        assert json.loads(port_file.read_text()) == {"http_port": port, "grpc_port": None}
    finally:
        probe.close()
        assert stop(process) == 0
