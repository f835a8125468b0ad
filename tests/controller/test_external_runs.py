"""Whole runs through the controller against real servers the SUT agent starts from launch
profiles: token latencies from a streaming OpenAI-compatible server, kserve's own reference
server over the KServe v2 gRPC protocol, accuracy runs scored, and a server that dies mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from tests.controller.conftest import Stack, short_settings
from tests.external_servers import (
    CLASSIFIER_NAME,
    LM_NAME,
    Models,
    build_models,
    prompts_tar,
    stack_with_servers,
    write_profiles,
)
from tests.servers.kserve_reference import kserve_available

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    """SUT agents started by this controller read their launch profiles and model folder from
    the environment they inherit."""
    profiles = write_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


def run(stack: Stack, sut_id: str, config: sut_agent_pb2.SutConfig, settings: common_pb2.LoadGenSettings,
        dataset: common_pb2.DatasetSpec, timeout: float = 120, **fields: object) -> controller_pb2.Run:
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id=sut_id, config=config))
    spec = controller_pb2.RunSpec(
        experiment_id="external", sut_id=sut_id, settings=settings, dataset=dataset, **fields  # type: ignore[arg-type]
    )
    started = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    return stack.wait(started.run_id, timeout)


def files_of(stack: Stack, run_id: str, names: list[str]) -> dict[str, bytes]:
    reply = stack.stub.GetResult(controller_pb2.GetResultRequest(run_id=run_id, include_files=names))
    return {f.name: f.data for f in reply.files}


def test_streaming_openai_run_reports_ttft_and_tpot(stack: Stack, tmp_path: Path) -> None:
    config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
        profile="model-server", model=LM_NAME, options={"max_tokens": "24", "ignore_eos": "true"}))
    settings = short_settings(
        common_pb2.SCENARIO_SERVER, server_target_qps=20.0, min_query_count=40,
        server_target_latency=durations.from_seconds(1.0), use_token_latencies=True,
        ttft_latency=durations.from_seconds(1.0), tpot_latency=durations.from_seconds(0.5),
    )
    dataset = common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar")))
    final = run(stack, "openai", config, settings, dataset)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    # A short test: LoadGen's early stopping wants more queries than 40 for a VALID token run.
    assert not any("SUT" in reason for reason in result.invalid_reasons), list(result.invalid_reasons)
    assert final.results[0].sut_stats.samples_failed == 0
    ttft, tpot, latency = (durations.to_ns(result.ttft.p50), durations.to_ns(result.tpot.p50),
                           durations.to_ns(result.latency.p50))
    # The first token comes before the whole answer; 24 tokens take more than one token's time.
    assert 0 < ttft < latency
    assert 0 < tpot < latency
    assert result.tokens_per_second > 0
    files = files_of(stack, final.run_id, ["logs/server.log"])
    assert b"model_server" in files["logs/server.log"] or files["logs/server.log"]
    stack.app.pool.remove_sut("openai")


@pytest.mark.skipif(not kserve_available(), reason="kserve's virtualenv (.venv-kserve) is made by scripts/setup")
def test_kserve_reference_server_over_grpc(stack: Stack, models: Models) -> None:
    config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
        profile="kserve-reference", model=CLASSIFIER_NAME, max_concurrency=4))
    dataset = common_pb2.DatasetSpec(uri=str(models.classifier.samples_path))
    # Through the SUT agent's relay (the direct path to this server: tests/llm/test_direct_kserve.py).
    final = run(stack, "kserve", config, short_settings(
        common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=100,
        single_stream_expected_latency=durations.from_seconds(0.001)),
                dataset, data_plane=loadgen_agent_pb2.DataPlaneOptions(
                    transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP))
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    assert result.valid, list(result.invalid_reasons)
    assert final.results[0].sut_stats.samples_completed >= result.sample_count >= 100
    assert final.results[0].sut_stats.samples_failed == 0
    stack.app.pool.remove_sut("kserve")


def expected_top1(models: Models) -> float:
    """What the model itself scores, computed here with ONNX Runtime on the same samples."""
    task = models.classifier
    session = ort.InferenceSession(str(task.model_path), providers=["CPUExecutionProvider"])
    samples = np.load(task.samples_path)
    logits = session.run(None, {session.get_inputs()[0].name: samples})[0]
    return float(np.mean(np.argmax(logits, axis=1) == np.load(task.labels_path)))


@pytest.mark.parametrize("backend", ["onnxruntime", "kserve_v2_http"])
def test_accuracy_only_run_is_scored(stack: Stack, models: Models, backend: str) -> None:
    task = models.classifier
    if backend == "onnxruntime":
        config = sut_agent_pb2.SutConfig(onnxruntime=sut_agent_pb2.OnnxRuntimeBackendConfig(
            model_path=str(task.model_path), sample_shape=[16], data_type=common_pb2.DATA_TYPE_FLOAT32))
    else:
        config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
            profile="model-server-kserve-http", model=CLASSIFIER_NAME, max_batch_size=8))
    settings = short_settings(common_pb2.SCENARIO_OFFLINE, mode=common_pb2.TEST_MODE_ACCURACY_ONLY)
    accuracy = common_pb2.AccuracySpec(scorer="top1", labels_uri=str(task.labels_path))
    final = run(stack, f"accuracy-{backend.replace('_', '-')}", config, settings,
                common_pb2.DatasetSpec(uri=str(task.samples_path)), accuracy=accuracy)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    assert result.accuracy_scorer == "top1"
    assert result.accuracy["top1"] == pytest.approx(expected_top1(models), abs=1e-12)
    assert result.accuracy["top1"] == pytest.approx(task.expected_top1, abs=0.02)
    assert result.accuracy["distinct_samples"] == 256
    files = files_of(stack, final.run_id, ["mlperf_log_accuracy.json", "accuracy.json"])
    records = json.loads(files["mlperf_log_accuracy.json"])
    assert len({r["qsl_idx"] for r in records}) == 256
    assert json.loads(files["accuracy.json"])["metrics"]["top1"] == result.accuracy["top1"]


def test_bad_accuracy_spec_is_refused_naming_the_field(stack: Stack, models: Models) -> None:
    import grpc

    spec = controller_pb2.RunSpec(
        experiment_id="external", sut_id="nothing", settings=short_settings(common_pb2.SCENARIO_OFFLINE),
        accuracy=common_pb2.AccuracySpec(scorer="top5", labels_uri="ftp://x/y", options={"dtype": "complex"}),
    )
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.accuracy.scorer" in info.value.details() and "spec.accuracy.labels_uri" in info.value.details()


def test_a_server_that_dies_mid_run_fails_the_run_and_keeps_what_was_measured(
    stack: Stack, tmp_path: Path
) -> None:
    config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
        profile="model-server", model=LM_NAME, options={"max_tokens": "8"}))
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="doomed", config=config))
    pid = stack.app.pool.sut_status(stack.app.pool.get_sut("doomed")).server_pid
    assert pid > 0
    settings = short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=50.0,
                              min_duration=durations.from_seconds(4), server_target_latency=durations.from_seconds(1))
    spec = controller_pb2.RunSpec(
        experiment_id="external", sut_id="doomed", settings=settings,
        dataset=common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar"))),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(response_timeout=durations.from_seconds(10)),
    )
    started = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    deadline = time.monotonic() + 30
    while stack.app.runs.get_run(started.run_id).state != common_pb2.RUN_STATE_RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    final = stack.wait(started.run_id, 60)
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "SUT failed during repeat 1" in final.error and "exited" in final.error
    # What LoadGen measured is stored, marked invalid, with the server's own log beside it.
    assert len(final.results) == 1
    result = final.results[0].aggregate
    assert not result.valid
    assert any("failed at the SUT" in reason for reason in result.invalid_reasons)
    files = files_of(stack, final.run_id, ["logs/server.log", "mlperf_log_summary.txt"])
    assert files["mlperf_log_summary.txt"] and files["logs/server.log"]
