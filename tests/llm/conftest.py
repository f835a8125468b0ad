"""Real LLM servers for the LLM-serving tests: MECBench's model server (OpenAI-compatible and
Ollama faces over a byte-level ONNX language model) started as a subprocess on loopback, with
optional fault injection, and launch profiles that make the SUT agent start it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.external_servers import MODEL_SERVER, ROOT, Models, build_models
from tests.servers.kserve_reference import KSERVE_PYTHON


@dataclass
class ModelServer:
    process: subprocess.Popen[bytes]
    http_port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.http_port}"


def start_model_server(models: Path, port_file: Path, *extra: str) -> ModelServer:
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "model_server",
            "--models",
            str(models),
            "--http-port",
            "0",
            "--port-file",
            str(port_file),
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the model server did not start")
        time.sleep(0.05)
    return ModelServer(process, int(json.loads(port_file.read_text())["http_port"]))


def stop_model_server(server: ModelServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def write_llm_profiles(path: Path, fail_every: int = 5) -> Path:
    """Launch profiles: the model server as an OpenAI server, and one that fails every
    `fail_every`-th generation request with HTTP 500."""
    http = "http://{host}:{port}"
    text = "profiles:\n"
    text += MODEL_SERVER.format(name="llm", server_type="openai", endpoint=http, extra="", root=ROOT)
    text += MODEL_SERVER.format(
        name="llm-failing", server_type="openai", endpoint=http, extra=f', "--fail-every", "{fail_every}"', root=ROOT
    )
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def model_server(tmp_path: Path, models: Models) -> Iterator[ModelServer]:
    server = start_model_server(models.directory, tmp_path / "port.json")
    yield server
    stop_model_server(server)


NETNS_PROFILE = """
  {name}:
    command: ["{{python}}", "-m", "model_server", "--host", "{{host}}", "--http-port", "{{port}}",
              "--grpc-port", "{{port2}}", "--models", "{{model_dir}}"]
    cwd: "{root}"
    host: 0.0.0.0
    ports: 2
    server_type: {server_type}
    endpoint: "{endpoint}"
    ready: {{http: "http://127.0.0.1:{{port}}/v2/health/ready", interval_s: 0.05}}
    ready_timeout_s: 30
    stop_timeout_s: 5
"""

# Launch profile name -> (server type, endpoint): the model server's faces.
NETNS_FACES = {
    "llm-edge": ("openai", "http://{host}:{port}"),
    "llm-edge-ollama": ("ollama", "http://{host}:{port}"),
    "llm-edge-kserve-http": ("kserve_v2_http", "http://{host}:{port}"),
    "llm-edge-kserve-grpc": ("kserve_v2_grpc", "{host}:{port2}"),
}


# kserve's reference server (its own virtualenv), on every address of the edge namespace too.
NETNS_KSERVE_REFERENCE = """
  kserve-reference-edge:
    command: ["{python}", "tests/servers/kserve_onnx_server.py", "--model_name", "{{model}}",
              "--model_path", "{{model_dir}}/{{model}}.onnx", "--http_port", "{{port}}", "--grpc_port", "{{port2}}",
              "--enable_latency_logging", "false"]
    cwd: "{root}"
    host: 0.0.0.0
    ports: 2
    server_type: kserve_v2_grpc
    endpoint: "{{host}}:{{port2}}"
    ready: {{http: "http://127.0.0.1:{{port}}/v2/health/ready", interval_s: 0.1}}
    ready_timeout_s: 60
    stop_timeout_s: 5
"""


def write_netns_profiles(path: Path) -> Path:
    """The model server listening on every address of the edge namespace, so LoadGen clients in
    their own namespaces reach it through the data link (the direct client path): one profile
    per face (NETNS_FACES), and kserve's reference server."""
    text = "profiles:\n"
    for name, (server_type, endpoint) in NETNS_FACES.items():
        text += NETNS_PROFILE.format(name=name, server_type=server_type, endpoint=endpoint, root=ROOT)
    text += NETNS_KSERVE_REFERENCE.format(python=KSERVE_PYTHON, root=ROOT)
    path.write_text(text)
    return path
