"""What does the external backend add to a request? One command, one process run:

    .venv/bin/python -m bench.external [--requests N]

starts MECBench's model server once and, against the same model on it, times requests one at a
time (i) straight from this process with the protocol's plain client and (ii) through the SUT
agent's external backend (queue, worker thread, adapter, completion callback). It prints each
protocol's median and p99 and the ratio (ii)/(i): the cost of the adapter path, measured
against the protocol itself in the same run, since this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import urllib3

from mecbench.kserve import inference_pb2, inference_pb2_grpc
from mecbench.v1 import sut_agent_pb2
from model_server.models import build_bigram_lm, make_classification_task
from sut_agent.backends.base import Completion
from sut_agent.lifecycle import BackendManager
from sut_agent.settings import SutAgentSettings


def _start_server(models: Path, port_file: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    server = subprocess.Popen(
        [sys.executable, "-m", "model_server", "--models", str(models), "--http-port", "0", "--grpc-port", "0",
         "--port-file", str(port_file), "--log-level", "warning"],
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("the model server did not start")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    return server, int(ports["http_port"]), int(ports["grpc_port"])


def _times(call: Callable[[], object], requests: int) -> np.ndarray:
    for _ in range(min(50, requests)):
        call()  # warm connections, caches and the server's sessions
    samples = []
    for _ in range(requests):
        started = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - started)
    return np.array(samples) / 1e3


def _through_backend(manager: BackendManager, payload: bytes) -> Callable[[], None]:
    backend = manager.ready_backend()
    done = threading.Event()

    def on_done(completion: Completion) -> None:
        if not completion.first_tokens:
            done.set()

    def call() -> None:
        done.clear()
        backend.submit([1], [0], [payload], on_done)
        done.wait()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    requests = parser.parse_args().requests
    with tempfile.TemporaryDirectory() as scratch:
        models = Path(scratch)
        task = make_classification_task(models / "task", samples=64)
        (models / "classifier.onnx").write_bytes(task.model_path.read_bytes())
        build_bigram_lm(b"The edge server answers the client. A small model runs at the edge.\n", models / "lm.lm.onnx")
        server, http_port, grpc_port = _start_server(models, models / "ports.json")
        try:
            sample = np.load(task.samples_path)[0:1]
            payload = sample.tobytes()
            rows: list[tuple[str, np.ndarray, np.ndarray]] = []

            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = inference_pb2.ModelInferRequest(
                model_name="classifier",
                inputs=[inference_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 16])],
                raw_input_contents=[payload],
            )
            direct_grpc = _times(lambda: stub.ModelInfer(request), requests)

            pool = urllib3.HTTPConnectionPool("127.0.0.1", http_port, maxsize=1)
            body = json.dumps({"model": "lm", "prompt": "The edge", "max_tokens": 8, "stream": True}).encode()

            def openai_direct() -> None:
                response = pool.urlopen("POST", "/v1/completions", body=body,
                                        headers={"Content-Type": "application/json"}, preload_content=False)
                while response.read1(65536):
                    pass
                response.release_conn()

            direct_openai = _times(openai_direct, requests // 4)

            manager = BackendManager(SutAgentSettings(tcp_data_plane=False))
            try:
                manager.start(sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
                    server_type="kserve_v2_grpc", endpoint=f"127.0.0.1:{grpc_port}", model="classifier",
                    max_concurrency=1)), restart=False)
                rows.append(("kserve_v2_grpc", direct_grpc, _times(_through_backend(manager, payload), requests)))
                manager.start(sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
                    server_type="openai", endpoint=f"127.0.0.1:{http_port}", model="lm", max_concurrency=1,
                    options={"api": "completions", "max_tokens": "8"})), restart=True)
                rows.append(("openai stream", direct_openai,
                             _times(_through_backend(manager, b"The edge"), requests // 4)))
            finally:
                manager.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"external backend overhead, {requests} requests one at a time, {time.strftime('%Y-%m-%d')}")
    header = ("protocol", "direct p50 us", "backend p50 us", "ratio", "direct p99", "backend p99")
    print(f"{header[0]:<16}{header[1]:>14}{header[2]:>16}{header[3]:>7}{header[4]:>12}{header[5]:>13}")
    for name, direct, through in rows:
        d50, b50 = np.percentile(direct, 50), np.percentile(through, 50)
        print(f"{name:<16}{d50:>14.0f}{b50:>16.0f}{b50 / d50:>7.2f}"
              f"{np.percentile(direct, 99):>12.0f}{np.percentile(through, 99):>13.0f}")


if __name__ == "__main__":
    main()
