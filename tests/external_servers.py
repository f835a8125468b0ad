"""Real inference servers for the external backend's tests: models the tests build, and launch
profiles that start MECBench's own model server (OpenAI-compatible, Ollama and KServe v2 over
ONNX Runtime) or kserve's reference ModelServer from its own virtualenv."""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from model_server.models import ClassificationTask, build_bigram_lm, make_classification_task
from tests.controller.conftest import Stack, start_stack, stop_stack
from tests.servers.kserve_reference import KSERVE_PYTHON

ROOT = Path(__file__).resolve().parents[1]
LM_NAME = "tiny-lm"
CLASSIFIER_NAME = "classifier"

CORPUS = (
    b"The edge server answers the client. The network is slow at noon. A small model runs at the edge.\n"
    b"Latency is the time from the query to the answer. Throughput is the answers per second.\n"
    b"The benchmark measures the server under load. The client sends a query and waits.\n"
)

PROMPTS = [
    "The edge",
    "A small model",
    "Latency is",
    "The client sends",
    "Throughput",
    "The benchmark",
    "The network",
    "The server",
]


@dataclass(frozen=True)
class Models:
    directory: Path
    classifier: ClassificationTask


def build_models(directory: Path) -> Models:
    """A byte-level language model and a classifier with its dataset and labels, in one folder
    the model server serves (NAME.lm.onnx and NAME.onnx)."""
    directory.mkdir(parents=True, exist_ok=True)
    build_bigram_lm(CORPUS, directory / f"{LM_NAME}.lm.onnx")
    task = make_classification_task(directory / "task", samples=256, features=16, classes=4, seed=7)
    (directory / f"{CLASSIFIER_NAME}.onnx").write_bytes(task.model_path.read_bytes())
    return Models(directory, task)


def prompts_tar(path: Path, prompts: list[str] = PROMPTS) -> Path:
    """A dataset of prompts: one tar member per sample, ordered by name."""
    with tarfile.open(path, "w") as archive:
        for index, prompt in enumerate(prompts):
            data = prompt.encode()
            member = tarfile.TarInfo(f"prompt-{index:04d}.txt")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


MODEL_SERVER = """
  {name}:
    command: ["{{python}}", "-m", "model_server", "--host", "{{host}}", "--http-port", "{{port}}",
              "--grpc-port", "{{port2}}", "--models", "{{model_dir}}"{extra}]
    cwd: "{root}"
    ports: 2
    server_type: {server_type}
    endpoint: "{endpoint}"
    ready: {{http: "http://{{host}}:{{port}}/v2/health/ready", interval_s: 0.05}}
    live: {{http: "http://{{host}}:{{port}}/v2/health/live", interval_s: 0.2}}
    ready_timeout_s: 30
    stop_timeout_s: 5
"""

KSERVE_REFERENCE = """
  kserve-reference:
    command: ["{python}", "tests/servers/kserve_onnx_server.py", "--model_name", "{{model}}",
              "--model_path", "{{model_dir}}/{{model}}.onnx", "--http_port", "{{port}}", "--grpc_port", "{{port2}}",
              "--enable_latency_logging", "false"]
    cwd: "{root}"
    ports: 2
    server_type: kserve_v2_grpc
    endpoint: "{{host}}:{{port2}}"
    ready: {{http: "http://{{host}}:{{port}}/v2/health/ready", interval_s: 0.1}}
    ready_timeout_s: 60
    stop_timeout_s: 5
"""


def write_profiles(path: Path) -> Path:
    """Launch profiles: the model server as an OpenAI, Ollama or KServe v2 (gRPC, HTTP) server,
    one that starts slowly, and kserve's reference server."""
    http = "http://{host}:{port}"
    grpc = "{host}:{port2}"
    text = "profiles:\n"
    for name, server_type, endpoint, extra in (
        ("model-server", "openai", http, ""),
        ("model-server-ollama", "ollama", http, ""),
        ("model-server-kserve-http", "kserve_v2_http", http, ""),
        ("model-server-kserve-grpc", "kserve_v2_grpc", grpc, ""),
        ("slow-model-server", "openai", http, ', "--startup-delay", "1.5"'),
    ):
        text += MODEL_SERVER.format(
            name=name, server_type=server_type, endpoint=endpoint, extra=extra, root=ROOT
        )
    text += KSERVE_REFERENCE.format(python=KSERVE_PYTHON, root=ROOT)
    path.write_text(text)
    return path


@contextlib.contextmanager
def stack_with_servers(
    tmp_path_factory: pytest.TempPathFactory, profiles: Path, model_dir: Path, **env: str
) -> Iterator[Stack]:
    """A controller on loopback whose SUT agents read these launch profiles and this model folder
    (and any other `MECBENCH_*` setting in `env`) from the environment they inherit, as an
    operator would configure them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MECBENCH_SUT_SERVER_PROFILES", str(profiles))
        patch.setenv("MECBENCH_SUT_MODEL_DIR", str(model_dir))
        for name, value in env.items():
            patch.setenv(name, value)
        running = start_stack(tmp_path_factory.mktemp("controller"))
        try:
            yield running
        finally:
            stop_stack(running)
