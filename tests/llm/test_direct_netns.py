"""The direct client path in the netns topology: the LoadGen session, in its own namespace,
speaks OpenAI's streaming protocol to the model server the SUT agent started in the edge
namespace, across the data link. A rate-limited link slows each token stream by what the link
predicts for the stream's bytes, while the first token arrives almost as early as unshaped: the
client's real SSE exchange crosses the link, chunk by chunk, as a phone's client would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, loadgen_agent_pb2, sut_agent_pb2
from tests.conftest import requires_root
from tests.controller.conftest import Stack, short_settings, stop_stack
from tests.external_servers import LM_NAME, Models, prompts_tar
from tests.llm.conftest import write_netns_profiles

pytestmark = [requires_root, pytest.mark.slow]

RATE_BPS = 1_000_000
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def netns_stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_netns_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    data_dir: Path = tmp_path_factory.mktemp("netns-llm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MECBENCH_SUT_SERVER_PROFILES", str(profiles))
        patch.setenv("MECBENCH_SUT_MODEL_DIR", str(models.directory))
        settings = ControllerSettings.load(
            data_dir=data_dir, topology="netns", topology_clients=1, topology_slot=47, topology_name="mbllm"
        )
        app = ControllerApp(settings)
        server, port = create_server("127.0.0.1:0", settings, app=app)
        channel = open_channel(f"127.0.0.1:{port}")
        stack = Stack(app, server, channel, controller_pb2_grpc.ControllerStub(channel), data_dir)
        try:
            yield stack
        finally:
            stop_stack(stack)


def run_records(
    stack: Stack, dataset: common_pb2.DatasetSpec, network: common_pb2.NetworkProfile | None
) -> tuple[common_pb2.TestResult, list[dict[str, object]]]:
    spec = controller_pb2.RunSpec(
        experiment_id="llm-netns",
        sut_id="llm-edge",
        settings=short_settings(
            common_pb2.SCENARIO_SINGLE_STREAM,
            min_query_count=12,
            min_duration=durations.from_seconds(0.5),
            use_token_latencies=True,
        ),
        dataset=dataset,
        data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT),
    )
    if network is not None:
        spec.network.CopyFrom(network)
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.app.runs.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    reply = stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["llm_requests.jsonl"])
    )
    rows = [json.loads(line) for f in reply.files for line in f.data.splitlines()]
    return final.results[0].aggregate, rows


def test_a_rate_limited_link_slows_token_streams_by_their_bytes(netns_stack: Stack, tmp_path: Path) -> None:
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(
            profile="llm-edge", model=LM_NAME, options={"max_tokens": str(MAX_TOKENS), "ignore_eos": "true"}
        )
    )
    netns_stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="llm-edge", config=config))
    dataset = common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar")))
    unshaped, plain_rows = run_records(netns_stack, dataset, None)
    profile = common_pb2.NetworkProfile(
        name="1mbit", netem=common_pb2.NetemConfig(rate_bps=RATE_BPS), side=common_pb2.SHAPING_SIDE_SUT
    )
    shaped, shaped_rows = run_records(netns_stack, dataset, profile)
    for result, rows in ((unshaped, plain_rows), (shaped, shaped_rows)):
        assert rows and all(row["ok"] for row in rows), rows[:3]
        assert all(row["output_tokens"] == MAX_TOKENS for row in rows)
        assert result.failed_samples == 0 and not result.value_errors
    body_bytes = float(np.median([row["response_bytes"] for row in shaped_rows]))
    predicted_s = body_bytes * 8 / RATE_BPS
    e2e_plain = float(np.median([row["e2e_s"] for row in plain_rows]))
    e2e_shaped = float(np.median([row["e2e_s"] for row in shaped_rows]))
    ttft_plain = float(np.median([row["ttft_s"] for row in plain_rows]))
    ttft_shaped = float(np.median([row["ttft_s"] for row in shaped_rows]))
    slowdown = e2e_shaped - e2e_plain
    print(
        f"stream body {body_bytes:.0f} B, predicted +{predicted_s * 1000:.0f} ms; e2e p50 {e2e_plain * 1000:.1f} -> "
        f"{e2e_shaped * 1000:.1f} ms; TTFT p50 {ttft_plain * 1000:.2f} -> {ttft_shaped * 1000:.2f} ms"
    )
    # The body's bytes plus HTTP chunk framing and TCP/IP headers (one small segment per token
    # event: ~60 bytes on ~250): the link's time for the stream.
    assert 0.9 * predicted_s <= slowdown <= 1.5 * predicted_s, (slowdown, predicted_s)
    # The first token crosses the link at once: it does not wait for the rest of the stream.
    assert ttft_shaped - ttft_plain < 0.1 * slowdown
    # LoadGen's own token latencies tell the same.
    assert durations.to_seconds(shaped.tpot.p50) > durations.to_seconds(unshaped.tpot.p50)
    netns_stack.app.pool.remove_sut("llm-edge")
