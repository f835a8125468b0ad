"""Client groups without a shaped topology: a real experiment whose point has two client groups
(`sweep.client_mixes`), its per-group results in the SDK's results table, the CLI's table and
the report's per-group figure; and the checks of group specs. (Groups on shaped links: see
test_edge_network.py, which needs root.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.cli.common import format_results_table
from mecbench.cli.results import _shown_columns
from mecbench.client import Client
from mecbench.core import durations
from mecbench.report import LATENCY_BREAKDOWN, LATENCY_BY_GROUP, collect_report_data, write_report
from mecbench.v1 import common_pb2, controller_pb2, sut_agent_pb2
from tests.conftest import field_violations
from tests.controller.conftest import short_settings
from tests.report.test_report import assert_png_has_content

EXPERIMENT_ID = "edge-groups-report"


@dataclass
class Finished:
    client: Client
    app: ControllerApp
    experiment: controller_pb2.Experiment
    out_dir: Path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    settings = ControllerSettings.load(data_dir=tmp_path_factory.mktemp("edge-groups"), telemetry_interval_s=0)
    app = ControllerApp(settings)
    server, _port = create_server("127.0.0.1:0", settings, app=app)
    try:
        with Client(server.address) as client:
            spec = controller_pb2.ExperimentSpec(
                experiment_id=EXPERIMENT_ID,
                skip_calibration=True,
                sut=sut_agent_pb2.SutConfig(synthetic=sut_agent_pb2.SyntheticBackendConfig(
                    distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT, mean=durations.from_seconds(0.002),
                )),
                settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=30,
                                        single_stream_expected_latency=durations.from_seconds(0.002)),
                sweep=controller_pb2.Sweep(client_mixes=[controller_pb2.ClientMix(name="mix", groups=[
                    controller_pb2.ClientGroup(name="near", clients=2),
                    controller_pb2.ClientGroup(name="far", clients=1),
                ])]),
            )
            client.start_experiment(spec)
            final = app.experiments.wait(EXPERIMENT_ID, timeout=120)
            assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
            yield Finished(client, app, final, tmp_path_factory.mktemp("edge-groups-report"))
    finally:
        server.stop(grace=1.0)


def test_a_mix_runs_its_groups_together_and_every_table_shows_them(finished: Finished) -> None:
    (run_id,) = finished.experiment.run_ids
    run = finished.client.get_run(run_id)
    assert run.spec.clients == 3 and [g.name for g in run.spec.client_groups] == ["near", "far"]
    assert run.spec.selector == "ss-c3-mix"
    (repeat,) = run.results
    near, far = repeat.groups
    assert list(near.clients) == [0, 1] and list(far.clients) == [2]
    assert near.network_profile == far.network_profile == "unshaped"
    assert near.result.sample_count + far.result.sample_count == repeat.aggregate.sample_count
    assert far.result.sample_count == repeat.clients[2].result.sample_count
    # The near group pools its two clients' samples (percentiles merged, not averaged).
    assert durations.to_ns(near.result.latency.p50) > 0
    assert near.result.samples_per_second == pytest.approx(
        sum(c.result.samples_per_second for c in repeat.clients[:2])
    )

    table = finished.client.results_table(experiment_id=EXPERIMENT_ID)
    rows = [(r["group"], r["clients"], r["network_profile"]) for r in table]
    assert rows == [("", 3, "near=unshaped+far=unshaped"), ("near", 2, "unshaped"), ("far", 1, "unshaped")]
    assert [r["latency_p50_ms"] for r in table][1] == pytest.approx(durations.to_ns(near.result.latency.p50) / 1e6)

    listed = table.to_text(_shown_columns(table))  # what `mecbench results list` prints
    assert "group" in listed.splitlines()[0] and " near " in listed and " far " in listed

    text = format_results_table([("mix", run)])
    assert "  near (unshaped)" in text and "  far (unshaped)" in text


def test_the_report_draws_latency_per_group_and_where_the_time_went(finished: Finished) -> None:
    data = collect_report_data(finished.client, EXPERIMENT_ID)
    (point,) = data.points
    assert point.network_profile == "near=unshaped+far=unshaped"
    assert [g.name for g in point.repeats[0].groups] == ["near", "far"] and point.repeats[0].breakdown
    page = write_report(data, finished.out_dir).read_text(encoding="utf-8")
    for name in (LATENCY_BY_GROUP, LATENCY_BREAKDOWN):
        assert_png_has_content(finished.out_dir / name)
        assert f'<img src="{name}"' in page


def test_where_the_time_went_is_kept_per_point_and_per_group(finished: Finished) -> None:
    """The SUT computes 2 ms a sample and queues nothing (one query at a time per client, three
    clients): the split gives compute about 2 ms, and the rest to the network and the client."""
    (run_id,) = finished.experiment.run_ids
    record = finished.client.get_result(run_id, include_files=["result.json"])
    (document,) = [json.loads(f.data) for f in record.files if f.name == "result.json"]
    breakdown = document["latency_breakdown"]
    pooled = breakdown["pooled"]
    print(f"where the time went: {breakdown}")
    assert pooled["network_and_client_ms"] + pooled["server_queue_ms"] + pooled["server_compute_ms"] == pytest.approx(
        pooled["latency_mean_ms"])
    assert 1.9 <= pooled["server_compute_ms"] <= 2.6
    assert 0 < pooled["network_and_client_ms"] < pooled["latency_mean_ms"]
    assert set(breakdown["groups"]) == {"near", "far"}
    for group in breakdown["groups"].values():
        assert group["server_compute_ms"] == pooled["server_compute_ms"]  # the server's, over all clients
        assert group["network_and_client_ms"] == pytest.approx(
            group["latency_mean_ms"] - group["server_queue_ms"] - group["server_compute_ms"])


def test_group_specs_are_checked_field_by_field(finished: Finished) -> None:
    spec = controller_pb2.RunSpec(
        experiment_id="edge-groups-bad", sut=sut_agent_pb2.SutConfig(synthetic=sut_agent_pb2.SyntheticBackendConfig()),
        settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM), clients=5,
        network=common_pb2.NetworkProfile(name="4g"),
        client_groups=[
            controller_pb2.ClientGroup(name="a", clients=1, network=common_pb2.NetworkProfile(name="no-such")),
            controller_pb2.ClientGroup(name="a", clients=0),
            controller_pb2.ClientGroup(name="", clients=1),
        ],
    )
    with pytest.raises(grpc.RpcError) as bad:
        finished.client.stub.StartRun(controller_pb2.StartRunRequest(spec=spec))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad.value)) >= {
        "spec.client_groups[1].name", "spec.client_groups[1].clients", "spec.client_groups[2].name",
        "spec.clients", "spec.network",
    }
    spec.ClearField("network")
    spec.clients = 0
    del spec.client_groups[1:]
    with pytest.raises(grpc.RpcError) as unknown:
        finished.client.stub.StartRun(controller_pb2.StartRunRequest(spec=spec))
    assert set(field_violations(unknown.value)) == {"spec.client_groups[0].network.name"}
