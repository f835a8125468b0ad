"""The direct client path in the netns topology: the LoadGen session, in its own namespace,
speaks the server's own protocol to the model server the SUT agent started in the edge
namespace, across the data link, for each of its faces: OpenAI (SSE) and Ollama (NDJSON) token
streams, KServe v2 over HTTP and gRPC. A rate-limited link slows each token stream by what the
link predicts for the stream's bytes, while the first token arrives almost as early as
unshaped: the client's real exchange crosses the link, chunk by chunk, as a phone's client
would. At high concurrency every request succeeds over kept-alive connections (one pool, no
connection closed). One stack (controller, topology) serves the whole module."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

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
from tests.external_servers import CLASSIFIER_NAME, LM_NAME, PROMPTS, Models, prompts_tar
from tests.llm.conftest import write_netns_profiles
from tests.servers.kserve_reference import kserve_available

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
    stack: Stack,
    sut_id: str,
    dataset: common_pb2.DatasetSpec,
    network: common_pb2.NetworkProfile | None,
    settings: common_pb2.LoadGenSettings | None = None,
    max_in_flight: int = 0,
) -> tuple[common_pb2.TestResult, list[dict[str, object]]]:
    spec = controller_pb2.RunSpec(
        experiment_id="llm-netns",
        sut_id=sut_id,
        settings=settings
        or short_settings(
            common_pb2.SCENARIO_SINGLE_STREAM,
            min_query_count=12,
            min_duration=durations.from_seconds(0.5),
            use_token_latencies=True,
        ),
        dataset=dataset,
        data_plane=loadgen_agent_pb2.DataPlaneOptions(
            transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT, max_in_flight=max_in_flight
        ),
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


def deploy(stack: Stack, profile: str, model: str, options: dict[str, str] | None = None) -> str:
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(profile=profile, model=model, options=options or {})
    )
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id=profile, config=config))
    return profile


# Face -> (launch profile, the options that make a 200-token stream). Ollama's samples are whole
# requests (the model server's Ollama face takes options.ignore_eos, as vLLM's OpenAI face does).
STREAMS = {
    "openai": ("llm-edge", {"max_tokens": str(MAX_TOKENS), "ignore_eos": "true"}),
    "ollama": ("llm-edge-ollama", {"num_predict": str(MAX_TOKENS)}),
}


def stream_dataset(face: str, path: Path, tokens: int) -> common_pb2.DatasetSpec:
    if face == "openai":
        return common_pb2.DatasetSpec(uri=str(prompts_tar(path)))
    requests = [
        json.dumps({"prompt": prompt, "options": {"num_predict": tokens, "ignore_eos": True, "temperature": 0}})
        for prompt in PROMPTS
    ]
    return common_pb2.DatasetSpec(uri=str(prompts_tar(path, requests)))


_SEGMENT_OVERHEAD_BYTES = 80


@pytest.mark.parametrize("face", sorted(STREAMS))
def test_a_rate_limited_link_slows_token_streams_by_their_bytes(netns_stack: Stack, tmp_path: Path, face: str) -> None:
    profile, options = STREAMS[face]
    sut_id = deploy(netns_stack, profile, LM_NAME, options)
    dataset = stream_dataset(face, tmp_path / "prompts.tar", MAX_TOKENS)
    unshaped, plain_rows = run_records(netns_stack, sut_id, dataset, None)
    profile_1mbit = common_pb2.NetworkProfile(
        name="1mbit", netem=common_pb2.NetemConfig(rate_bps=RATE_BPS), side=common_pb2.SHAPING_SIDE_SUT
    )
    shaped, shaped_rows = run_records(netns_stack, sut_id, dataset, profile_1mbit)
    for result, rows in ((unshaped, plain_rows), (shaped, shaped_rows)):
        assert rows and all(row["ok"] for row in rows), rows[:3]
        assert result.failed_samples == 0 and not result.value_errors
        assert all(row["output_tokens"] == MAX_TOKENS for row in rows), [r["output_tokens"] for r in rows]
    body_bytes = float(np.median([row["response_bytes"] for row in shaped_rows]))
    predicted_s = body_bytes * 8 / RATE_BPS
    e2e_plain = float(np.median([row["e2e_s"] for row in plain_rows]))
    e2e_shaped = float(np.median([row["e2e_s"] for row in shaped_rows]))
    ttft_plain = float(np.median([row["ttft_s"] for row in plain_rows]))
    ttft_shaped = float(np.median([row["ttft_s"] for row in shaped_rows]))
    slowdown = e2e_shaped - e2e_plain
    print(
        f"{face}: stream body {body_bytes:.0f} B, predicted +{predicted_s * 1000:.0f} ms; e2e p50 "
        f"{e2e_plain * 1000:.1f} -> {e2e_shaped * 1000:.1f} ms; TTFT p50 {ttft_plain * 1000:.2f} -> "
        f"{ttft_shaped * 1000:.2f} ms"
    )
    # At least the body's bytes; at most those plus, for every token event sent in a segment of its
    # own, its chunk framing and headers (TCP/IP with timestamps 52, Ethernet 14, chunk ~10: 80
    # bytes; whether a server's events share segments varies from run to run), +10 % for timing.
    most_s = (body_bytes + (MAX_TOKENS + 4) * _SEGMENT_OVERHEAD_BYTES) * 8 / RATE_BPS * 1.1
    assert 0.9 * predicted_s <= slowdown <= most_s, (slowdown, predicted_s, most_s)
    # The first token crosses the link at once: it does not wait for the rest of the stream.
    assert ttft_shaped - ttft_plain < 0.1 * slowdown
    # LoadGen's own token latencies tell the same.
    assert durations.to_seconds(shaped.tpot.p50) > durations.to_seconds(unshaped.tpot.p50)
    netns_stack.app.pool.remove_sut(sut_id)


CONCURRENCY = 48
REQUESTS = 480


def _sockets(namespace: str, state: str, port: int) -> int:
    """TCP sockets of `namespace` in `state` whose far end is `port` (the client's view)."""
    listing = subprocess.run(
        ["ip", "netns", "exec", namespace, "ss", "-tanH", "state", state, f"dport = :{port}"],
        capture_output=True, text=True, check=True,
    ).stdout
    return len([line for line in listing.splitlines() if line.strip()])


@pytest.mark.parametrize("face", sorted(STREAMS))
def test_keep_alive_holds_at_high_concurrency_through_the_link(netns_stack: Stack, tmp_path: Path, face: str) -> None:
    """CONCURRENCY requests always in flight across the link (Offline + max_in_flight), REQUESTS in
    all: none fails, and they went over at most CONCURRENCY connections that are all still open
    (kept alive, none closed by the client: no TIME-WAIT toward the server)."""
    profile, _ = STREAMS[face]
    options = {"max_tokens": "8", "ignore_eos": "true"} if face == "openai" else {"num_predict": "8"}
    sut_id = deploy(netns_stack, profile, LM_NAME, options)
    status = netns_stack.app.pool.get_sut(sut_id).client.get_status()
    port = urlsplit(status.server_endpoint).port
    assert port
    dataset = stream_dataset(face, tmp_path / "prompts.tar", 8)
    settings = short_settings(
        common_pb2.SCENARIO_OFFLINE, min_query_count=REQUESTS, min_duration=durations.from_seconds(0.1),
        offline_expected_qps=1.0,
    )
    result, rows = run_records(netns_stack, sut_id, dataset, None, settings, max_in_flight=CONCURRENCY)
    assert len(rows) >= REQUESTS and all(row["ok"] for row in rows), [r["error"] for r in rows if not r["ok"]][:3]
    assert result.failed_samples == 0
    client_namespace = "mb-mbllm-c1"  # the topology (name mbllm) of the fixture: its first client
    established = _sockets(client_namespace, "established", port)
    assert 1 <= established <= CONCURRENCY, established
    assert _sockets(client_namespace, "time-wait", port) == 0
    netns_stack.app.pool.remove_sut(sut_id)


@pytest.mark.parametrize(
    "profile",
    [
        "llm-edge-kserve-http",
        "llm-edge-kserve-grpc",
        pytest.param(
            "kserve-reference-edge",
            marks=pytest.mark.skipif(not kserve_available(), reason="kserve's virtualenv is made by scripts/setup"),
        ),
    ],
)
def test_kserve_v2_faces_answer_through_a_shaped_link(netns_stack: Stack, models: Models, profile: str) -> None:
    """KServe v2 over HTTP and gRPC (the model server's faces, kserve's reference server) from the
    client's namespace to the edge's, through a shaped link: every request answered by the server
    itself (the records are the direct client's), the answers' bytes read by the client."""
    sut_id = deploy(netns_stack, profile, CLASSIFIER_NAME)
    settings = short_settings(
        common_pb2.SCENARIO_OFFLINE, min_query_count=64, min_duration=durations.from_seconds(0.1),
        offline_expected_qps=1.0,
    )
    network = common_pb2.NetworkProfile(
        name="20mbit", netem=common_pb2.NetemConfig(rate_bps=20_000_000), side=common_pb2.SHAPING_SIDE_SUT
    )
    dataset = common_pb2.DatasetSpec(uri=str(models.classifier.samples_path))
    result, rows = run_records(netns_stack, sut_id, dataset, network, settings, max_in_flight=8)
    assert len(rows) >= 64 and all(row["ok"] for row in rows), [r["error"] for r in rows if not r["ok"]][:3]
    assert all(int(str(row["response_bytes"])) > 0 for row in rows)
    assert result.failed_samples == 0
    netns_stack.app.pool.remove_sut(sut_id)
