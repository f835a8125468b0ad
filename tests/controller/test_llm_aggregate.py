"""Multi-client LLM results: the aggregate's TTFT and TPOT are the percentiles of the pooled
per-request figures of every client (LoadGen's rule, as for latency), tokens/s add up, and the
duration spans the clients; against a real streaming OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from controller.aggregate import aggregate_results, latency_stats, read_token_latencies, token_latency_samples
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, sut_agent_pb2
from store.layout import TOKEN_LATENCIES_NAME
from tests.controller.conftest import Stack, short_settings
from tests.external_servers import LM_NAME, build_models, prompts_tar, stack_with_servers, write_profiles

pytestmark = pytest.mark.slow


def test_pooled_token_percentiles_follow_loadgens_rule() -> None:
    # client 0: TTFT 1..4 ms; client 1: 10 ms and a failed request that must not count.
    first = np.array([[0, 1_000_000, 5_000_000, 5, 0], [0, 2_000_000, 4_000_000, 3, 0],
                      [0, 3_000_000, 3_000_000, 1, 0], [0, 4_000_000, 8_000_000, 5, 0]], dtype=np.int64)
    second = np.array([[0, 10_000_000, 14_000_000, 3, 0], [0, -1, 60_000_000, 0, 1]], dtype=np.int64)
    results = [common_pb2.TestResult(tokens_per_second=100.0), common_pb2.TestResult(tokens_per_second=50.0)]
    results[0].test_duration.FromSeconds(3)
    results[1].test_duration.FromSeconds(4)
    aggregate = aggregate_results(results, None, [first, second])
    assert aggregate.tokens_per_second == 150.0
    assert aggregate.test_duration.ToSeconds() == 4
    ttft = np.array([1, 2, 3, 4, 10]) * 1_000_000
    assert aggregate.ttft == latency_stats(ttft)
    assert durations.to_ns(aggregate.ttft.p50) == 3_000_000  # index floor(5 * 0.5) of the sorted five
    # TPOT = (latency - TTFT) / (tokens - 1), requests of one token have none.
    assert aggregate.tpot == latency_stats(np.array([1_000_000, 1_000_000, 1_000_000, 2_000_000]))
    # Without every client's per-request figures there is no pooled TTFT at all.
    assert not aggregate_results(results, None, [first, None]).HasField("ttft")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    models = build_models(tmp_path_factory.mktemp("models"))
    profiles = write_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


def test_two_streaming_clients_aggregate_the_pooled_token_latencies(stack: Stack, tmp_path: Path) -> None:
    config = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(
        profile="model-server", model=LM_NAME, options={"max_tokens": "16", "ignore_eos": "true"}))
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="lm", config=config))
    settings = short_settings(
        common_pb2.SCENARIO_SERVER, server_target_qps=40.0, min_query_count=40,
        server_target_latency=durations.from_seconds(1.0), use_token_latencies=True,
        ttft_latency=durations.from_seconds(1.0), tpot_latency=durations.from_seconds(0.5),
    )
    spec = controller_pb2.RunSpec(experiment_id="llm-agg", sut_id="lm", settings=settings, clients=2,
                                  dataset=common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "p.tar"))))
    final = stack.wait(stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    repeat = final.results[0]
    names = [f"client-{c}/{TOKEN_LATENCIES_NAME}" for c in range(2)]
    reply = stack.stub.GetResult(controller_pb2.GetResultRequest(run_id=final.run_id, include_files=names))
    files = {f.name: f.data for f in reply.files}
    assert sorted(files) == sorted(names)
    rows = [read_token_latencies(files[name]) for name in names]
    ttft = np.concatenate([token_latency_samples(r)[0] for r in rows])
    tpot = np.concatenate([token_latency_samples(r)[1] for r in rows])
    assert len(ttft) >= 2 * 40 * 0.9
    aggregate = repeat.aggregate
    assert aggregate.ttft == latency_stats(ttft)
    assert aggregate.tpot == latency_stats(tpot)
    assert aggregate.tokens_per_second == pytest.approx(sum(c.result.tokens_per_second for c in repeat.clients))
    assert aggregate.tokens_per_second > 0
    assert 0 < durations.to_ns(aggregate.ttft.p50) < durations.to_ns(aggregate.latency.p50)


def test_llm_metrics_of_several_clients_add_up_and_keep_no_averaged_percentile() -> None:
    first = {"requests_ok": 90.0, "requests_failed": 10.0, "output_tokens": 900.0, "goodput_requests": 80.0,
             "requests_per_s": 30.0, "output_tokens_per_s": 300.0, "goodput_fraction": 0.8, "ttft_p50_s": 0.01,
             "output_tokens_per_s_per_request_p50": 50.0, "output_tokens_mean": 10.0}
    second = {"requests_ok": 100.0, "requests_failed": 0.0, "output_tokens": 2000.0, "goodput_requests": 100.0,
              "requests_per_s": 33.0, "output_tokens_per_s": 660.0, "goodput_fraction": 1.0, "ttft_p50_s": 0.5,
              "output_tokens_per_s_per_request_p50": 40.0, "output_tokens_mean": 20.0}
    results = [common_pb2.TestResult(llm_metrics=first), common_pb2.TestResult(llm_metrics=second)]
    merged = dict(aggregate_results(results).llm_metrics)
    assert merged == {
        "requests_ok": 190.0, "requests_failed": 10.0, "output_tokens": 2900.0, "goodput_requests": 180.0,
        "requests_per_s": 63.0, "output_tokens_per_s": 960.0, "goodput_fraction": 0.9,
        "output_tokens_mean": pytest.approx(2900.0 / 190.0),
    }
