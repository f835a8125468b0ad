"""The direct client path for KServe v2 over HTTP and gRPC: the LoadGen session reads the model's
metadata from the server the SUT agent prepared and sends each sample itself (a binary-extension
inference request; a ModelInfer call on a grpc.aio channel). An accuracy run through it scores
what the model itself scores."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from tests.controller.conftest import Stack, short_settings
from tests.external_servers import CLASSIFIER_NAME, Models, stack_with_servers, write_profiles
from tests.servers.kserve_reference import kserve_available

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


@pytest.mark.parametrize(
    "profile",
    [
        "model-server-kserve-http",
        "model-server-kserve-grpc",
        pytest.param(
            "kserve-reference",
            marks=pytest.mark.skipif(not kserve_available(), reason="kserve's virtualenv is made by scripts/setup"),
        ),
    ],
)
def test_kserve_v2_accuracy_run_through_the_direct_client(stack: Stack, models: Models, profile: str) -> None:
    task = models.classifier
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(profile=profile, model=CLASSIFIER_NAME)
    )
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id=profile, config=config))
    spec = controller_pb2.RunSpec(
        experiment_id="kserve-direct",
        sut_id=profile,
        settings=short_settings(common_pb2.SCENARIO_OFFLINE, mode=common_pb2.TEST_MODE_ACCURACY_ONLY),
        dataset=common_pb2.DatasetSpec(uri=str(task.samples_path)),
        accuracy=common_pb2.AccuracySpec(scorer="top1", labels_uri=str(task.labels_path)),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(
            transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT, max_in_flight=8
        ),
    )
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    session = ort.InferenceSession(str(task.model_path), providers=["CPUExecutionProvider"])
    samples = np.load(task.samples_path)
    logits = session.run(None, {session.get_inputs()[0].name: samples})[0]
    expected = float(np.mean(np.argmax(logits, axis=1) == np.load(task.labels_path)))
    assert result.accuracy["top1"] == pytest.approx(expected, abs=1e-12)
    assert result.failed_samples == 0
    # The requests went straight to the server: the SUT agent relayed none, the records say so.
    assert final.results[0].sut_stats.samples_completed == 0
    assert result.llm_metrics["requests_ok"] == 256
    stack.app.pool.remove_sut(profile)
