"""A token-latency run against a real OpenAI-compatible server that fails every 5th request on
purpose (the model server's fault injection): LoadGen's token statistics stay in range (no
INT64_MIN first-token latency, no negative TPOT), and the result names the failures by kind
with their messages and is INVALID. Plus the sanity check on LoadGen's own broken summary."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loadgen_agent.results import apply_integrity, parse_result
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from tests.controller.conftest import Stack, short_settings
from tests.external_servers import LM_NAME, Models, prompts_tar, stack_with_servers
from tests.llm.conftest import write_llm_profiles

FAIL_EVERY = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_llm_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml", FAIL_EVERY)
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize(
    "transport",
    [loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP, loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT],
    ids=["relay", "direct"],
)
def test_failed_samples_keep_token_statistics_sane_and_are_named(
    stack: Stack, tmp_path: Path, transport: loadgen_agent_pb2.DataPlaneTransport.ValueType
) -> None:
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(
            profile="llm-failing", model=LM_NAME, options={"max_tokens": "8", "ignore_eos": "true"}
        )
    )
    sut_id = f"failing-{transport}"
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id=sut_id, config=config))
    settings = short_settings(
        common_pb2.SCENARIO_SERVER,
        server_target_qps=50.0,
        min_query_count=100,
        server_target_latency=durations.from_seconds(1.0),
        use_token_latencies=True,
        ttft_latency=durations.from_seconds(1.0),
        tpot_latency=durations.from_seconds(0.5),
    )
    spec = controller_pb2.RunSpec(
        experiment_id="failures",
        sut_id=sut_id,
        settings=settings,
        dataset=common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar"))),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=transport),
    )
    started = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.wait(started.run_id, 120)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    # The warm-up request counts too, so about a fifth of the samples failed, all with HTTP 500.
    assert result.sample_count >= 100
    assert result.failed_samples == pytest.approx(result.sample_count / FAIL_EVERY, abs=2)
    assert dict(result.failed_samples_by_kind) == {"http_500": result.failed_samples}
    assert result.sample_errors and all("injected failure" in m for m in result.sample_errors)
    assert len(result.sample_errors) <= 10
    assert not result.valid
    assert any("samples failed at the SUT" in r and "http_500" in r for r in result.invalid_reasons)
    # LoadGen's token statistics are in range: every sample had a first token and 2+ tokens.
    assert list(result.value_errors) == []
    for stats in (result.ttft, result.tpot, result.latency):
        assert durations.to_ns(stats.min) >= 0
        assert 0 < durations.to_ns(stats.max) < 60 * 10**9
    assert 0 < durations.to_ns(result.ttft.p50) <= durations.to_ns(result.latency.p50)
    assert "-9223372036854775808" not in result.summary_fields.get("Min First Token latency (ns)", "")
    # The SUT agent scraped the server's own metrics page over the repeat, whichever the path.
    server_metrics = final.results[0].sut_stats.server_metrics
    assert server_metrics['model_server_requests_total{path="/v1/chat/completions"}'] == result.sample_count
    assert server_metrics['model_server_failures_total{path="/v1/chat/completions"}'] == result.failed_samples
    # Each sample's token latencies, for pooling over clients: relay and direct alike.
    reply = stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["token_latencies.npy"])
    )
    rows = np.load(io.BytesIO(reply.files[0].data))
    assert rows.shape == (result.sample_count, 5)
    assert int(rows[:, 4].sum()) == result.failed_samples
    ok = rows[rows[:, 4] == 0]
    assert (ok[:, 1] > 0).all() and (ok[:, 1] <= ok[:, 2]).all() and (ok[:, 3] == 8).all()
    if transport == loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT:
        # No relay: the SUT agent saw none of the requests; the client's records tell them.
        assert final.results[0].sut_stats.samples_completed == 0
        assert result.llm_metrics["requests_failed"] == result.failed_samples
        assert result.llm_metrics["requests_ok"] == result.sample_count - result.failed_samples
        reply = stack.stub.GetResult(
            controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["llm_requests.jsonl"])
        )
        rows = [json.loads(line) for f in reply.files for line in f.data.splitlines()]
        assert len(rows) == result.sample_count
        assert sum(1 for row in rows if row["error_kind"] == "http_500") == result.failed_samples
    else:
        assert final.results[0].sut_stats.samples_failed == result.failed_samples
    stack.app.pool.remove_sut(sut_id)


BROKEN_SUMMARY = """================================================
MLPerf Results Summary
================================================
SUT name : x
Scenario : Server
Mode     : PerformanceOnly
Completed samples per second    : 99.00
Completed tokens per second: 1433.95
Result is : VALID
Min latency (ns)                : 1000
Max latency (ns)                : 9000
Mean latency (ns)               : 5000
50.00 percentile latency (ns)   : 5000
Min First Token latency (ns)                : -9223372036854775808
Max First Token latency (ns)                : 3274133
Mean First Token latency (ns)               : 48544063353262160
50.00 percentile first token latency (ns)   : 1500000
Min Time per Output Token (ns)                : -1709109
Max Time per Output Token (ns)                : 140234707354827
Mean Time per Output Token (ns)               : 1232251069368
"""


def test_out_of_range_summary_values_are_flagged_as_a_bug() -> None:
    """The summary LoadGen wrote when a failed sample had no first token (measured before the fix)."""
    result = parse_result(BROKEN_SUMMARY)
    assert result.valid
    apply_integrity(result, {}, [])
    assert not result.valid
    assert set(result.value_errors) == {
        "ttft.min = -9223372036854775808 ns",
        "ttft.mean = 48544063353262160 ns",
        "tpot.min = -1709109 ns",
    }
    assert any("out of range" in reason for reason in result.invalid_reasons)


def test_failures_by_kind_make_the_result_invalid() -> None:
    result = parse_result(
        BROKEN_SUMMARY.replace("-9223372036854775808", "1000")
        .replace("-1709109", "10")
        .replace("48544063353262160", "2000")
    )
    apply_integrity(result, {"timeout": 2, "http_503": 1}, ["POST /v1/chat/completions: HTTP 503: busy"])
    assert not result.valid and result.failed_samples == 3
    assert dict(result.failed_samples_by_kind) == {"timeout": 2, "http_503": 1}
    assert list(result.value_errors) == []
    assert "3 samples failed at the SUT (http_503 1, timeout 2; first: POST /v1/chat/completions: HTTP 503: busy)" in (
        result.invalid_reasons
    )
