"""Edge networks as they are, through the controller in the netns topology (root): what the
network really did is kept with each repeat (probe and qdisc counters)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.aggregate import read_sample_latencies
from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.client import Client
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.report import LATENCY_BREAKDOWN, LINK_TIMELINE, collect_report_data, write_report
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2
from tests.conftest import requires_root
from tests.controller.conftest import Stack, short_settings, stop_stack
from tests.report.test_report import assert_png_has_content

pytestmark = [requires_root, pytest.mark.root]

RESPONSE_BYTES = 25_000
SUT_ID = "sut-25kb-replies"


@pytest.fixture(scope="module")
def edge_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("edge-network")
    settings = ControllerSettings.load(
        data_dir=data_dir, topology="netns", topology_clients=2, topology_slot=45, topology_name="mbedge",
        telemetry_interval_s=0,
    )
    app = ControllerApp(settings)
    server, port = create_server("127.0.0.1:0", settings, app=app)
    channel = open_channel(f"127.0.0.1:{port}")
    stack = Stack(app, server, channel, controller_pb2_grpc.ControllerStub(channel), data_dir)
    stack.stub.DeploySut(
        controller_pb2.DeploySutRequest(
            sut_id=SUT_ID,
            config=sut_agent_pb2.SutConfig(
                synthetic=sut_agent_pb2.SyntheticBackendConfig(
                    distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT,
                    mean=durations.from_seconds(0.001),
                    response_bytes=RESPONSE_BYTES,
                )
            ),
        )
    )
    yield stack
    stop_stack(stack)


def run_to_end(stack: Stack, spec: controller_pb2.RunSpec) -> tuple[controller_pb2.Run, dict[str, Any]]:
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.app.runs.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    record = stack.stub.GetResult(controller_pb2.GetResultRequest(run_id=run.run_id, include_files=["result.json"]))
    (document,) = [json.loads(f.data) for f in record.files if f.name == "result.json"]
    return final, document


def test_an_overloaded_link_shows_drops_in_the_recorded_counters_and_the_probe_saw_the_asked_rate(
    edge_stack: Stack,
) -> None:
    rate_bps = 10_000_000
    spec = controller_pb2.RunSpec(
        experiment_id="edge-verified", sut_id=SUT_ID,
        # Offline: every sample at once, about 1.1 MB of replies queued behind a 10 Mbit/s bucket.
        settings=short_settings(common_pb2.SCENARIO_OFFLINE, offline_expected_qps=40.0, min_query_count=40),
        network=common_pb2.NetworkProfile(name="edge-10mbit", netem=common_pb2.NetemConfig(rate_bps=rate_bps)),
    )
    final, document = run_to_end(edge_stack, spec)
    network = document["network"]
    assert network["link_as_requested"] and not network["problems"]
    (probe,) = [p["probe"] for p in network["probes"]]
    assert probe["saturated"] and abs(probe["measured_rate_bps"] - rate_bps) / rate_bps < 0.10
    assert probe["peer_address"] and probe["rtt_samples"] > 0
    (root,) = [q for q in network["qdiscs"] if q["kind"] == "tbf"]
    print(f"probe {probe['measured_rate_bps'] / 1e6:.3f} Mbit/s; repeat counters {root['delta']}, "
          f"peak backlog {root['peak_backlog_bytes']} B over {network['backlog_samples']} samples")
    assert root["params"]["rate_bps"] == str(rate_bps)
    delta = root["delta"]
    replies = final.results[0].aggregate.sample_count
    assert delta["bytes"] >= replies * RESPONSE_BYTES  # every reply crossed the shaped link
    assert delta["overlimits"] > 0 and delta["drops"] > 0
    assert root["peak_backlog_bytes"] > 0
    assert final.results[0].aggregate.valid or "link not as requested" not in " ".join(
        final.results[0].aggregate.invalid_reasons
    )


def group_p50_ms(run: controller_pb2.Run) -> dict[str, float]:
    return {g.name: durations.to_ns(g.result.latency.p50) / 1e6 for g in run.results[0].groups}


def test_two_client_groups_in_one_run_each_see_their_own_link(edge_stack: Stack) -> None:
    """Two groups of one client each, at 5 and 50 Mbit/s, against one SUT at once: the slow
    group's latency rises by what 5 Mbit/s predicts for its 25 kB replies, the fast one's by
    what 50 Mbit/s predicts (a tenth), each against the same groups unshaped."""
    def groups(slow: int, fast: int) -> list[controller_pb2.ClientGroup]:
        def group(name: str, rate: int) -> controller_pb2.ClientGroup:
            network = common_pb2.NetworkProfile(name=f"{rate // 1_000_000}mbit",
                                                netem=common_pb2.NetemConfig(rate_bps=rate)) if rate else None
            return controller_pb2.ClientGroup(name=name, clients=1, network=network)
        return [group("slow", slow), group("fast", fast)]

    def run(slow: int, fast: int) -> tuple[controller_pb2.Run, dict[str, Any]]:
        spec = controller_pb2.RunSpec(
            experiment_id="edge-groups", sut_id=SUT_ID, client_groups=groups(slow, fast),
            settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=30),
        )
        return run_to_end(edge_stack, spec)

    unshaped, _ = run(0, 0)
    shaped, document = run(5_000_000, 50_000_000)
    base, measured = group_p50_ms(unshaped), group_p50_ms(shaped)
    rise = {name: measured[name] - base[name] for name in ("slow", "fast")}
    predicted = {"slow": RESPONSE_BYTES * 8 / 5e6 * 1e3, "fast": RESPONSE_BYTES * 8 / 50e6 * 1e3}
    print(f"p50 unshaped {base}, shaped {measured}; rise {rise}, predicted {predicted}")
    # TCP/IP headers add ~4%; the token bucket's burst lets a few kilobytes through early.
    assert 0.85 * predicted["slow"] <= rise["slow"] <= 1.3 * predicted["slow"]
    assert rise["fast"] <= 1.3 * predicted["fast"] + 3.0
    # Each group is its client; the pooled aggregate holds both.
    result = shaped.results[0]
    assert [list(g.clients) for g in result.groups] == [[0], [1]]
    assert [g.network_profile for g in result.groups] == ["5mbit", "50mbit"]
    assert result.aggregate.sample_count == sum(g.result.sample_count for g in result.groups)
    pooled_p50 = durations.to_ns(result.aggregate.latency.p50) / 1e6
    assert measured["fast"] <= pooled_p50 <= measured["slow"]
    # Each client's link was probed at its own rate.
    rates = {p["client"]: p["probe"]["requested_rate_bps"] for p in document["network"]["probes"]}
    assert rates == {0: "5000000", 1: "50000000"}
    record = edge_stack.stub.ListResults(controller_pb2.ListResultsRequest(run_id=shaped.run_id)).results[0]
    assert record.network_profile == "slow=5mbit+fast=50mbit" and len(record.groups) == 2


@pytest.mark.slow
def test_a_rate_trace_stepping_50_5_50_shows_in_the_per_sample_latency_and_the_applied_timeline(
    edge_stack: Stack, tmp_path: Path
) -> None:
    """The shipped "step-50-5-50" trace during one SingleStream test with 25 kB replies: the
    latency of the samples issued in each step follows the step's rate, and the timeline the node
    agent applied (read back from the kernel) is the trace's."""
    experiment = controller_pb2.ExperimentSpec(
        experiment_id="edge-trace", skip_calibration=True,
        sut=sut_agent_pb2.SutConfig(synthetic=sut_agent_pb2.SyntheticBackendConfig(
            distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT, mean=durations.from_seconds(0.001),
            response_bytes=RESPONSE_BYTES,
        )),
        settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_duration=durations.from_seconds(6.0),
                                min_query_count=100),
        sweep=controller_pb2.Sweep(network_profiles=[common_pb2.NetworkProfile(name="step-50-5-50")]),
    )
    edge_stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=experiment))
    done = edge_stack.app.experiments.wait("edge-trace", timeout=180)
    assert done.state == common_pb2.RUN_STATE_SUCCEEDED, done.error
    final = edge_stack.app.runs.get_run(done.run_ids[0])
    files = edge_stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["result.json"])).files
    (document,) = [json.loads(f.data) for f in files if f.name == "result.json"]
    record = edge_stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["sample_latencies.npy"])
    )
    rows = read_sample_latencies(b"".join(f.data for f in record.files if f.name == "sample_latencies.npy"))
    ordered = rows[np.argsort(rows[:, 0], kind="stable")]
    latency_ms = ordered[:, 1] / 1e6
    # SingleStream issues each query when the one before completes: a sample's time into the
    # test is the sum of the latencies before it (the gaps between queries are microseconds).
    issued_s = np.concatenate([[0.0], np.cumsum(latency_ms)[:-1] / 1e3])

    def median_ms(start_s: float, end_s: float) -> float:
        inside = latency_ms[(issued_s >= start_s) & (issued_s < end_s)]
        assert len(inside) >= 5, (start_s, end_s, len(inside))
        return float(np.median(inside))

    phases = [median_ms(0.4, 1.6), median_ms(2.4, 3.6), median_ms(4.4, 5.6)]
    print(f"median latency per step (50, 5, 50 Mbit/s): {[round(p, 1) for p in phases]} ms")
    at_5mbit = RESPONSE_BYTES * 8 / 5e6 * 1e3
    assert 0.85 * at_5mbit <= phases[1] <= 1.3 * at_5mbit
    assert phases[0] < 0.3 * phases[1] and phases[2] < 0.3 * phases[1]
    (timeline,) = document["network"]["schedules"]
    assert timeline["schedule"]["source"] == "shipped:step-50-5-50"
    applied = [(s.get("step", 0), s["params"]["rate_bps"], s.get("planned", "0s"), s["applied"])
               for s in timeline["applied"]]
    print(f"applied timeline: {applied}")
    assert [(step, rate) for step, rate, _, _ in applied] == [(0, "50000000"), (1, "5000000"), (2, "50000000")]
    for _step, _rate, planned, took in applied:
        assert 0 <= float(took.rstrip("s")) - float(planned.rstrip("s")) < 0.1
    # The report draws the link's timeline beside the latency, and where the time went.
    with Client(edge_stack.server.address) as client:
        data = collect_report_data(client, "edge-trace")
    out_dir = tmp_path / "report"
    page = write_report(data, out_dir).read_text(encoding="utf-8")
    for name in (LINK_TIMELINE, LATENCY_BREAKDOWN):
        assert_png_has_content(out_dir / name)
        assert f'<img src="{name}"' in page


def test_a_link_that_does_not_hold_its_rate_marks_the_result_not_as_requested(edge_stack: Stack) -> None:
    """Deliberately misconfigured: a 5 Mbit/s bucket with a 10 MB burst passes any short test at
    line rate. The probe before the first test sees the link carry more than asked without even
    saturating, and the result says "link not as requested", with the figures."""
    spec = controller_pb2.RunSpec(
        experiment_id="edge-misconfigured", sut_id=SUT_ID,
        settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=20),
        network=common_pb2.NetworkProfile(name="5mbit-huge-burst", netem=common_pb2.NetemConfig(
            rate_bps=5_000_000, burst_bytes=10_000_000)),
    )
    final, document = run_to_end(edge_stack, spec)
    aggregate = final.results[0].aggregate
    reasons = [r for r in aggregate.invalid_reasons if r.startswith("link not as requested")]
    print(reasons)
    assert not aggregate.valid and reasons
    assert "rate: measured" in reasons[0] and "asked 5.000 Mbit/s" in reasons[0]
    network = document["network"]
    assert not network["link_as_requested"] and network["problems"]
    (probe,) = [p["probe"] for p in network["probes"]]
    assert not probe.get("as_requested", False) and probe["measured_rate_bps"] > 5_000_000 * 1.1
