"""The external backend against real servers on loopback, started from launch profiles: MECBench's
own model server (OpenAI-compatible, Ollama, KServe v2 over HTTP and gRPC), driven through the
BackendManager (plain Python, no gRPC), with its readiness, slow-start, crash and stop paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mecbench.core import durations
from mecbench.core.errors import DeadlineExceeded, InvalidArgument
from mecbench.v1 import sut_agent_pb2
from sut_agent.backends.base import Completion
from sut_agent.external.registry import server_types
from sut_agent.lifecycle import BackendManager
from sut_agent.settings import SutAgentSettings
from tests.external_servers import CLASSIFIER_NAME, LM_NAME, PROMPTS, Models, build_models, write_profiles

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def manager(tmp_path: Path, models: Models) -> Iterator[BackendManager]:
    settings = SutAgentSettings(
        server_profiles=write_profiles(tmp_path / "servers.yaml"),
        server_log_dir=tmp_path / "logs",
        model_dir=models.directory,
        tcp_data_plane=False,
    )
    (tmp_path / "logs").mkdir()
    running = BackendManager(settings)
    yield running
    running.close()


def external(profile: str, model: str, **fields: object) -> sut_agent_pb2.SutConfig:
    options = fields.pop("options", {})
    config = sut_agent_pb2.ExternalBackendConfig(profile=profile, model=model, **fields)  # type: ignore[arg-type]
    config.options.update(options)  # type: ignore[arg-type]
    return sut_agent_pb2.SutConfig(external=config)


class Collector:
    """Completions in arrival order, with a wait for `count` finished samples."""

    def __init__(self) -> None:
        self.completions: list[Completion] = []
        self._cond = threading.Condition()

    def __call__(self, completion: Completion) -> None:
        with self._cond:
            self.completions.append(completion)
            self._cond.notify_all()

    def finished(self) -> list[Completion]:
        return [c for c in self.completions if not c.first_tokens]

    def wait(self, count: int, timeout: float = 30.0) -> list[Completion]:
        with self._cond:
            assert self._cond.wait_for(lambda: sum(len(c) for c in self.finished()) >= count, timeout)
        return self.finished()

    def by_sample(self) -> dict[int, tuple[bytes, str, int]]:
        found: dict[int, tuple[bytes, str, int]] = {}
        for completion in self.finished():
            for position, sample_id in enumerate(completion.sample_ids):
                output = completion.outputs[position] if completion.outputs else b""
                error = completion.errors[position] if completion.errors else ""
                tokens = completion.token_counts[position] if completion.token_counts else 0
                found[sample_id] = (output, error, tokens)
        return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_built_in_server_types_are_registered_by_entry_points() -> None:
    assert {"openai", "ollama", "kserve_v2_http", "kserve_v2_grpc"} <= set(server_types())


def test_openai_streaming_gives_first_tokens_then_completions_and_stop_ends_the_server(
    manager: BackendManager,
) -> None:
    status = manager.start(external("model-server", LM_NAME, options={"max_tokens": "12"}), restart=False)
    assert status.state == sut_agent_pb2.BACKEND_STATE_READY, status.message
    assert status.server_pid > 0 and status.server_endpoint.startswith("http://127.0.0.1:")
    backend = manager.ready_backend()
    collector = Collector()
    prompts = [p.encode() for p in PROMPTS[:4]]
    backend.submit([10, 11, 12, 13], [0, 1, 2, 3], prompts, collector)
    collector.wait(4)
    answers = collector.by_sample()
    assert set(answers) == {10, 11, 12, 13}
    for output, error, tokens in answers.values():
        assert not error
        assert output and 0 < tokens <= 12
    # Every sample's first token came before its completion, and was the start of its text.
    seen_first: dict[int, bytes] = {}
    for completion in collector.completions:
        for position, sample_id in enumerate(completion.sample_ids):
            if completion.first_tokens:
                assert completion.outputs is not None
                seen_first[sample_id] = completion.outputs[position]
            else:
                assert sample_id in seen_first
    assert all(answers[i][0].startswith(seen_first[i]) for i in answers)

    pid = status.server_pid
    manager.stop()
    assert not pid_alive(pid)
    log = manager.read_server_log(0)
    assert b"starting server model-server" in log
    assert manager.status().server_log_size == len(log)


def test_non_streaming_openai_completions_and_ollama_agree(manager: BackendManager) -> None:
    """The same greedy model over two protocols, streamed and not, gives the same text."""
    texts: dict[str, bytes] = {}
    for name, profile, options in (
        ("completions", "model-server", {"api": "completions", "stream": "false", "max_tokens": "10"}),
        ("chat-stream", "model-server", {"api": "chat", "max_tokens": "10"}),
        ("ollama", "model-server-ollama", {"num_predict": "10"}),
    ):
        manager.start(external(profile, LM_NAME, options=options), restart=True)
        collector = Collector()
        manager.ready_backend().submit([1], [0], [PROMPTS[0].encode()], collector)
        collector.wait(1)
        output, error, tokens = collector.by_sample()[1]
        assert not error and tokens > 0, (name, error)
        texts[name] = output
    assert texts["completions"] == texts["chat-stream"] == texts["ollama"]


@pytest.mark.parametrize("profile", ["model-server-kserve-grpc", "model-server-kserve-http"])
def test_kserve_v2_outputs_are_the_models_logits(manager: BackendManager, models: Models, profile: str) -> None:
    task = models.classifier
    samples = np.load(task.samples_path)[:20]
    session = ort.InferenceSession(str(task.model_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: samples})[0]
    manager.start(external(profile, CLASSIFIER_NAME, max_batch_size=4, max_concurrency=3), restart=False)
    collector = Collector()
    ids = list(range(100, 120))
    manager.ready_backend().submit(ids, list(range(20)), [row.tobytes() for row in samples], collector)
    completions = collector.wait(20)
    # Batched four samples to a request: five requests.
    assert sum(c.batches for c in completions) == 5
    answers = collector.by_sample()
    for index, sample_id in enumerate(ids):
        output, error, _ = answers[sample_id]
        assert not error
        np.testing.assert_allclose(np.frombuffer(output, dtype=np.float32), expected[index], rtol=1e-6)


def test_a_server_slower_than_the_ready_timeout_is_refused_and_stopped(manager: BackendManager) -> None:
    config = external("slow-model-server", LM_NAME, ready_timeout=durations.from_seconds(0.5))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="not ready within"):
        manager.start(config, restart=False)
    assert time.monotonic() - started < 10
    assert manager.status().state == sut_agent_pb2.BACKEND_STATE_FAILED
    # Nothing is left running: no model server process of this test's log.
    assert b"starting server slow-model-server" in manager.read_server_log(0)
    assert "model_server" not in subprocess.run(
        ["pgrep", "-af", f"model_server.*{manager.settings.model_dir}"], capture_output=True, text=True
    ).stdout.replace("pgrep", "")

    started = time.monotonic()
    status = manager.start(external("slow-model-server", LM_NAME, ready_timeout=durations.from_seconds(20)), False)
    assert status.state == sut_agent_pb2.BACKEND_STATE_READY
    assert time.monotonic() - started >= 1.5


def test_a_server_that_dies_fails_the_backend_and_its_samples(manager: BackendManager) -> None:
    status = manager.start(external("model-server", LM_NAME, options={"max_tokens": "4"}), restart=False)
    os.kill(status.server_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while manager.status().state != sut_agent_pb2.BACKEND_STATE_FAILED:
        assert time.monotonic() < deadline, "the crash was not noticed"
        time.sleep(0.05)
    assert "exited" in manager.status().message
    collector = Collector()
    manager.ready_backend().submit([1, 2], [0, 1], [b"The", b"A"], collector)
    answers = collector.wait(2)
    assert all(error and "exited" in error for _, error, _ in collector.by_sample().values()), answers
    # A restart with the same config brings a fresh server up.
    status = manager.start(external("model-server", LM_NAME, options={"max_tokens": "4"}), restart=True)
    assert status.state == sut_agent_pb2.BACKEND_STATE_READY and pid_alive(status.server_pid)


def test_bad_configs_are_refused_before_any_server_starts(manager: BackendManager) -> None:
    cases = {
        "config.external.options.bogus": external("model-server", LM_NAME, options={"bogus": "1"}),
        "config.external.options.max_tokens": external("model-server", LM_NAME, options={"max_tokens": "lots"}),
        "config.external.profile": external("no-such-profile", LM_NAME),
        "config.external.server_type": external("model-server", LM_NAME, server_type="gopher"),
        "config.external.model": external("kserve-reference", "--evil"),
        "config.external.endpoint": sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(model="m")),
    }
    for field, config in cases.items():
        with pytest.raises(InvalidArgument) as info:
            manager.start(config, restart=False)
        assert field in {v.field for v in info.value.violations}, (field, info.value)
    assert manager.read_server_log(0) == b""


def test_a_running_server_is_used_at_its_endpoint_and_left_running(manager: BackendManager, models: Models,
                                                                    tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "model_server", "--host", "127.0.0.1", "--http-port", "0", "--models",
         str(models.directory), "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["http_port"]
        config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
            server_type="ollama", endpoint=f"127.0.0.1:{port}", model=LM_NAME, options={"num_predict": "5"}))
        status = manager.start(config, restart=False)
        assert status.server_pid == 0 and status.server_endpoint == f"127.0.0.1:{port}"
        collector = Collector()
        manager.ready_backend().submit([7], [0], [b"The edge"], collector)
        collector.wait(1)
        assert collector.by_sample()[7][0]
        manager.stop()
        assert server.poll() is None, "a server the agent did not start is not the agent's to stop"
    finally:
        server.terminate()
        server.wait(10)


PLUGIN = '''
from sut_agent.external.base import InferenceResult, ServerType


class EchoServer(ServerType):
    """A server type from another package: answers each sample with its own payload reversed."""

    name = "echo"
    OPTIONS = {"suffix": "bytes added to each answer"}

    def configure(self, options):
        self.suffix = options.text("suffix").encode()

    def warmup_payloads(self):
        return [b"warm"]

    def infer(self, payloads, on_first_token):
        return InferenceResult([p[::-1] + self.suffix for p in payloads])
'''


def test_a_server_type_from_another_package_is_found_through_its_entry_point(
    manager: BackendManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "echo_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "echo_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (site / "echo_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[mecbench.server_types]\necho = echo_plugin:EchoServer\n"
    )
    (site / "echo_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    assert server_types()["echo"] == "echo_plugin:EchoServer"
    config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
        server_type="echo", endpoint="127.0.0.1:9", model="any", options={"suffix": "!"}))
    manager.start(config, restart=False)
    collector = Collector()
    manager.ready_backend().submit([1, 2], [0, 1], [b"abc", b"xy"], collector)
    collector.wait(2)
    assert {k: v[0] for k, v in collector.by_sample().items()} == {1: b"cba!", 2: b"yx!"}


def test_commands_in_requests_run_only_where_the_operator_allows_them(
    manager: BackendManager, models: Models, tmp_path: Path
) -> None:
    from mecbench.core.errors import PermissionDenied

    command = [sys.executable, "-m", "model_server", "--host", "{host}", "--http-port", "{port}",
               "--models", str(models.directory)]
    config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
        server_type="openai", model=LM_NAME, command=command, options={"max_tokens": "4"}))
    with pytest.raises(PermissionDenied, match="MECBENCH_SUT_ALLOW_REQUEST_COMMANDS"):
        manager.start(config, restart=False)
    assert manager.read_server_log(0) == b""  # nothing ran

    allowing = BackendManager(SutAgentSettings(
        allow_request_commands=True, server_log_dir=tmp_path, model_dir=models.directory, tcp_data_plane=False))
    try:
        status = allowing.start(config, restart=False)
        assert status.state == sut_agent_pb2.BACKEND_STATE_READY and status.server_pid > 0
        collector = Collector()
        allowing.ready_backend().submit([1], [0], [b"The edge"], collector)
        collector.wait(1)
        assert collector.by_sample()[1][0]
    finally:
        allowing.close()
