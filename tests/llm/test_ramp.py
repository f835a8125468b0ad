"""A load ramp through the direct client: the samples LoadGen issues at once (Offline) go out
stage by stage, each at its own rate or concurrency, against the model server's OpenAI face;
each stage's achieved rate, read back from the per-request records, is the one asked. A bad
ramp is refused with every wrong field named, before anything starts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from tests.controller.conftest import Stack
from tests.external_servers import LM_NAME, Models, prompts_tar, stack_with_servers, write_profiles

pytestmark = pytest.mark.slow

STAGE_S = 1.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


def stage(duration_s: float, rate: float = 0.0, concurrency: int = 0) -> loadgen_agent_pb2.LoadStage:
    return loadgen_agent_pb2.LoadStage(rate=rate, concurrency=concurrency, duration=durations.from_seconds(duration_s))


def ramp_spec(
    stages: list[loadgen_agent_pb2.LoadStage], min_query_count: int, dataset: str, **fields: object
) -> controller_pb2.RunSpec:
    settings = common_pb2.LoadGenSettings(
        scenario=fields.pop("scenario", common_pb2.SCENARIO_OFFLINE),  # type: ignore[arg-type]
        min_query_count=min_query_count,
        min_duration=durations.from_seconds(0.1),
        offline_expected_qps=1.0,
    )
    data_plane = loadgen_agent_pb2.DataPlaneOptions(
        ramp=loadgen_agent_pb2.LoadRamp(stages=stages, uniform_arrivals=True), **fields  # type: ignore[arg-type]
    )
    return controller_pb2.RunSpec(
        experiment_id="ramp",
        sut_id="ramp-llm",
        settings=settings,
        dataset=common_pb2.DatasetSpec(uri=dataset),
        data_plane=data_plane,
    )


def test_a_bad_ramp_is_refused_naming_each_field(stack: Stack) -> None:
    spec = ramp_spec(
        [stage(1.0, rate=10.0, concurrency=2), stage(0.0, rate=5.0), stage(1.0, rate=float("nan"))],
        1,
        "/nowhere.tar",
        scenario=common_pb2.SCENARIO_SERVER,
        transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP,
        max_in_flight=4,
    )
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    for field in (
        "spec.data_plane.ramp.stages[0].rate",
        "spec.data_plane.ramp.stages[1].duration",
        "spec.data_plane.ramp.stages[2].rate",
        "spec.settings.scenario",
        "spec.data_plane.transport",
        "spec.data_plane.max_in_flight",
        "spec.settings.min_query_count",
    ):
        assert field in details, (field, details)
    assert "spec.data_plane.ramp.stages[1].rate" not in details


def test_each_stage_reaches_the_rate_or_concurrency_it_asks(stack: Stack, tmp_path: object) -> None:
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(
            profile="model-server", model=LM_NAME, options={"max_tokens": "4", "ignore_eos": "true"}
        )
    )
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="ramp-llm", config=config))
    dataset = prompts_tar(tmp_path / "prompts.tar")  # type: ignore[operator]
    rates = (20.0, 60.0)
    sent_by_rates = int(sum(rate * STAGE_S for rate in rates))
    spec = ramp_spec(
        [stage(STAGE_S, rate=rates[0]), stage(STAGE_S, rate=rates[1]), stage(0.5, concurrency=3)],
        sent_by_rates + 40,
        str(dataset),
    )
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    metrics = dict(result.llm_metrics)
    reply = stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["llm_requests.jsonl"])
    )
    rows = [json.loads(line) for f in reply.files for line in f.data.splitlines()]
    assert rows and all(row["ok"] for row in rows) and result.failed_samples == 0
    # The stage figures are the records' own: every request is in the stage it was sent in.
    for index in range(3):
        assert metrics[f"stage{index}_sent"] == sum(1 for row in rows if row["stage"] == index)
    assert sum(metrics[f"stage{index}_sent"] for index in range(3)) == len(rows) == metrics["requests_ok"]
    for index, rate in enumerate(rates):
        assert metrics[f"stage{index}_target_rate_per_s"] == rate
        assert metrics[f"stage{index}_duration_s"] == pytest.approx(STAGE_S, rel=0.05)
        assert metrics[f"stage{index}_requests_per_s"] == pytest.approx(rate, rel=0.1), metrics
        assert metrics[f"stage{index}_ttft_p50_s"] > 0
    # The concurrency stage sends what is left, 3 at a time.
    assert metrics["stage2_target_concurrency"] == 3
    assert metrics["stage2_sent"] > 0
    assert 2.0 <= metrics["stage2_concurrency_mean"] <= 3.05, metrics
    stack.app.pool.remove_sut("ramp-llm")
