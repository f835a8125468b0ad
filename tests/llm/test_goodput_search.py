"""A peak search on goodput: the highest Server rate at which at least 90% of the requests meet
the TTFT and TPOT SLOs, found by bisection over runs of the direct client against the model
server; every probe's verdict is what its own goodput says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.experiments import goodput_fraction
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from tests.controller.conftest import Stack, short_settings
from tests.external_servers import LM_NAME, Models, prompts_tar, stack_with_servers
from tests.llm.conftest import write_llm_profiles

pytestmark = pytest.mark.slow

MIN_GOODPUT = 0.9


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_llm_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


def test_peak_search_on_goodput(stack: Stack, tmp_path: Path) -> None:
    spec = controller_pb2.ExperimentSpec(
        experiment_id="goodput-peak",
        sut=sut_agent_pb2.SutConfig(
            external=sut_agent_pb2.ExternalBackendConfig(
                profile="llm", model=LM_NAME, options={"max_tokens": "16", "ignore_eos": "true"}
            )
        ),
        loadgen=controller_pb2.LoadGenSide(
            data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT)
        ),
        dataset=common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar"))),
        settings=short_settings(
            common_pb2.SCENARIO_SERVER,
            min_duration=durations.from_seconds(1),
            use_token_latencies=True,
            ttft_latency=durations.from_seconds(0.100),
            tpot_latency=durations.from_seconds(0.020),
        ),
        sweep=controller_pb2.Sweep(scenarios=[common_pb2.SCENARIO_SERVER], server_target_qps=[20]),
        search=controller_pb2.PeakSearch(
            latency_bound=durations.from_seconds(5),
            low_qps=20,
            high_qps=600,
            tolerance=0.5,
            min_goodput_fraction=MIN_GOODPUT,
        ),
        skip_calibration=True,
    )
    stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=spec))
    final = stack.app.experiments.wait("goodput-peak", timeout=300)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    peak = final.peaks[0]
    assert 20 <= peak.peak_qps < 600, peak
    # Each probe passed exactly when its goodput reached the bound; the peak is the highest pass.
    passed = []
    for run_id in peak.run_ids:
        run = stack.app.runs.get_run(run_id)
        fraction = goodput_fraction(run.results[-1])
        assert run.results[-1].clients[0].result.llm_metrics["requests_ok"] > 0
        if fraction >= MIN_GOODPUT and run.results[-1].aggregate.performance_constraints_met:
            passed.append(run.spec.settings.server_target_qps)
    assert passed and max(passed) == peak.peak_qps
    assert len(peak.run_ids) >= 3
