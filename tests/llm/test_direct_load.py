"""The direct client under load, through the controller on loopback: a Server-scenario run at
600 queries/s of 8-token streams against the model server's OpenAI face completes every sample
without a failure (keep-alive connections reused, each answer read to its end), and the run's
LLM figures (goodput under the TTFT/TPOT SLOs, tokens per second, TTFT percentiles) are what its
own per-request records say."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from tests.controller.conftest import Stack, short_settings
from tests.external_servers import LM_NAME, Models, prompts_tar, stack_with_servers
from tests.llm.conftest import write_llm_profiles

pytestmark = pytest.mark.slow

TARGET_QPS = 600.0
TTFT_SLO_S = 0.004
TPOT_SLO_S = 0.002


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_llm_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


def test_direct_client_at_600_qps_has_no_failures_and_its_figures_match_its_records(
    stack: Stack, tmp_path: Path
) -> None:
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(
            profile="llm", model=LM_NAME, options={"max_tokens": "8", "ignore_eos": "true"}
        )
    )
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="llm", config=config))
    settings = short_settings(
        common_pb2.SCENARIO_SERVER,
        server_target_qps=TARGET_QPS,
        min_duration=durations.from_seconds(2.0),
        min_query_count=1000,
        server_target_latency=durations.from_seconds(1.0),
        use_token_latencies=True,
        ttft_latency=durations.from_seconds(TTFT_SLO_S),
        tpot_latency=durations.from_seconds(TPOT_SLO_S),
    )
    spec = controller_pb2.RunSpec(
        experiment_id="direct-load",
        sut_id="llm",
        settings=settings,
        dataset=common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar"))),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT),
    )
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    assert result.sample_count >= 1000
    assert result.failed_samples == 0, list(result.sample_errors)
    assert not result.value_errors
    reply = stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["llm_requests.jsonl", "llm_requests.csv"])
    )
    files = {f.name: f.data for f in reply.files}
    rows = [json.loads(line) for line in files["llm_requests.jsonl"].splitlines()]
    assert len(rows) == result.sample_count
    assert len(files["llm_requests.csv"].splitlines()) == len(rows) + 1
    assert all(row["ok"] and row["output_tokens"] == 8 for row in rows)
    metrics = result.llm_metrics
    print(
        f"achieved {result.completed_samples_per_second:.0f}/s of {TARGET_QPS:.0f}; "
        f"TTFT p50 {metrics['ttft_p50_s'] * 1000:.2f} ms; goodput {metrics['goodput_fraction']:.3f}"
    )
    # The figures are the records': goodput under the SLOs, tokens, TTFT percentiles.
    good = [r for r in rows if r["ttft_s"] <= TTFT_SLO_S and r["tpot_s"] <= TPOT_SLO_S]
    assert metrics["goodput_requests"] == len(good)
    assert metrics["goodput_fraction"] == pytest.approx(len(good) / len(rows))
    assert metrics["output_tokens"] == 8 * len(rows)
    assert metrics["ttft_p50_s"] == pytest.approx(float(np.percentile([r["ttft_s"] for r in rows], 50)), abs=1e-6)
    assert metrics["requests_ok"] == len(rows) and metrics["requests_failed"] == 0
    span = max(r["start_s"] + r["e2e_s"] for r in rows) - min(r["start_s"] for r in rows)
    assert metrics["output_tokens_per_s"] == pytest.approx(8 * len(rows) / span, rel=1e-3)
    stack.app.pool.remove_sut("llm")


def test_a_reused_session_follows_the_server_the_sut_agent_restarts(stack: Stack, tmp_path: Path) -> None:
    """The same SUT deployed again with another config: its agent starts a new server (a new
    port); the LoadGen session, reused, reaches the new one."""
    dataset = common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar")))
    outputs = []
    ports = []
    sessions = []
    for max_tokens in ("4", "6"):
        config = sut_agent_pb2.SutConfig(
            external=sut_agent_pb2.ExternalBackendConfig(
                profile="llm", model=LM_NAME, options={"max_tokens": max_tokens, "ignore_eos": "true"}
            )
        )
        stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="again", config=config))
        ports.append(stack.app.pool.sut_status(stack.app.pool.get_sut("again")).server_endpoint)
        spec = controller_pb2.RunSpec(
            experiment_id="again",
            sut_id="again",
            settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=20, use_token_latencies=True),
            dataset=dataset,
            data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT),
        )
        run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
        final = stack.wait(run.run_id, 120)
        assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
        result = final.results[0].aggregate
        assert result.failed_samples == 0, list(result.sample_errors)
        outputs.append(result.llm_metrics["output_tokens_mean"])
        sessions.append(set(stack.app.pool.loadgen_for_client(0).sessions.values()))
    assert ports[0] != ports[1]
    assert sessions[0] & sessions[1], "the second run opened a new session: nothing was followed"
    assert outputs == [4.0, 6.0]
    stack.app.pool.remove_sut("again")
