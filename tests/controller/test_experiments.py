"""Experiments: a spec file in, every point run through real agents, results findable."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.experiments import point_spec, settings_for, validate_experiment
from mecbench.core import durations
from mecbench.core.errors import InvalidArgument
from mecbench.experiment_file import parse_experiment
from mecbench.schema import SCHEMA_FILE, experiment_json_schema_text
from mecbench.v1 import common_pb2, controller_pb2
from tests.controller.conftest import Stack, short_settings, synthetic_sut

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_example_parses_with_its_shorthands_and_expands() -> None:
    spec = parse_experiment((EXAMPLES / "quick-sweep.yaml").read_text())
    points = validate_experiment(spec)
    # 2 scenarios x 3 client counts x 2 profiles (one Server QPS value).
    assert len(points) == 12
    shaped = [p for p in points if p.profile.name == "edge-5mbit"]
    assert shaped[0].profile.netem.rate_bps == 5_000_000
    assert {p.selector for p in points} >= {"ss-c1-unshaped", "server-c4-edge-5mbit-q800"}
    # The user.conf-style override gives Server points enough queries; SingleStream keeps the base.
    server = next(p for p in points if p.scenario == common_pb2.SCENARIO_SERVER and p.clients == 4)
    server_settings = point_spec(spec, server, "sut").settings
    assert server_settings.min_query_count == 500 and server_settings.server_target_qps == 200
    single = next(p for p in points if p.scenario == common_pb2.SCENARIO_SINGLE_STREAM)
    assert point_spec(spec, single, "sut").settings.min_query_count == 50


def test_overrides_match_model_and_scenario_patterns_in_order() -> None:
    spec = parse_experiment(
        """
        model: resnet50-int8
        settings: {min_query_count: 10, min_duration: 1s}
        overrides:
          - {model: "*", scenario: "*", settings: {min_query_count: 20}}
          - {model: "resnet50*", scenario: Server, settings: {min_query_count: 30, server_target_qps: 7}}
          - {model: bert, scenario: Server, settings: {min_query_count: 99}}
          - {scenario: "*Stream", settings: {min_duration: 2s}}
        """
    )
    server = settings_for(spec, common_pb2.SCENARIO_SERVER)
    assert server.min_query_count == 30 and server.server_target_qps == 7
    assert durations.to_ns(server.min_duration) == 1_000_000_000
    single = settings_for(spec, common_pb2.SCENARIO_SINGLE_STREAM)
    assert single.min_query_count == 20 and durations.to_ns(single.min_duration) == 2_000_000_000
    assert spec.settings.min_query_count == 10  # the base is not changed


def test_bad_overrides_are_named() -> None:
    spec = parse_experiment((EXAMPLES / "quick-sweep.yaml").read_text())
    spec.overrides.add(scenario="Serverr")
    spec.overrides.add(scenario="Server", settings=common_pb2.LoadGenSettings(scenario=common_pb2.SCENARIO_OFFLINE))
    with pytest.raises(InvalidArgument) as info:
        validate_experiment(spec)
    fields = {v.field for v in info.value.violations}
    assert {"spec.overrides[1].scenario", "spec.overrides[2].settings.scenario"} <= fields


def test_the_json_schema_is_fresh_and_checks_spec_files() -> None:
    schema_path = EXAMPLES / SCHEMA_FILE
    assert schema_path.read_text() == experiment_json_schema_text(), "stale: run scripts/genproto.py"
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    example = yaml.safe_load((EXAMPLES / "quick-sweep.yaml").read_text())
    assert list(validator.iter_errors(example)) == []
    example["sweep"]["repeats"] = "two"
    example["sweep"]["scenarios"] = ["SERVERX"]
    example["settings"]["min_duration"] = "1 minute"
    example["typo"] = 1
    errors = {tuple(str(part) for part in error.absolute_path) for error in validator.iter_errors(example)}
    assert {("sweep", "repeats"), ("sweep", "scenarios", "0"), ("settings", "min_duration"), ()} <= errors


def test_every_violation_of_a_spec_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as parse_info:
        parse_experiment("sweep: {network_profiles: [{name: x, netem: {bandwidth: fast}}]}")
    assert parse_info.value.violations[0].field == "spec.sweep.network_profiles[0].netem.bandwidth"
    spec = controller_pb2.ExperimentSpec(
        sweep=controller_pb2.Sweep(clients=[0, 2], server_target_qps=[-1], scenarios=[common_pb2.SCENARIO_SERVER],
                                   network_profiles=[common_pb2.NetworkProfile(name="nowhere")]),
    )
    with pytest.raises(InvalidArgument) as info:
        validate_experiment(spec)
    fields = {v.field for v in info.value.violations}
    assert {"spec.experiment_id", "spec.sut", "spec.sweep.clients[0]", "spec.sweep.server_target_qps[0]",
            "spec.sweep.network_profiles[0].name"} <= fields


def test_a_bad_spec_over_grpc_names_its_fields_and_starts_nothing(stack: Stack) -> None:
    spec = controller_pb2.ExperimentSpec(experiment_id="bad", sut=synthetic_sut(),
                                         sweep=controller_pb2.Sweep(clients=[100]))
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["spec.sweep.clients[0]"]
    assert not stack.stub.ListExperiments(controller_pb2.ListExperimentsRequest()).experiments


def test_a_sweep_runs_every_point_and_keeps_every_result(stack: Stack) -> None:
    settings = short_settings(common_pb2.SCENARIO_SINGLE_STREAM)
    spec = controller_pb2.ExperimentSpec(
        experiment_id="sweep-e2e",
        sut=synthetic_sut(0.001),
        settings=settings,
        sweep=controller_pb2.Sweep(scenarios=[common_pb2.SCENARIO_SINGLE_STREAM, common_pb2.SCENARIO_OFFLINE],
                                   clients=[1, 2], repeats=1),
    )
    spec.settings.offline_expected_qps = 300
    started = stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=spec)).experiment
    assert started.points_total == 4
    final = stack.app.experiments.wait("sweep-e2e", timeout=180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    assert final.points_done == 4 and len(final.run_ids) == 4
    everything = stack.stub.ListResults(controller_pb2.ListResultsRequest(experiment_id="sweep-e2e")).results
    records = [r for r in everything if r.run_id in final.run_ids]
    assert sorted(r.selector for r in records) == ["offline-c1-unshaped", "offline-c2-unshaped",
                                                   "ss-c1-unshaped", "ss-c2-unshaped"]
    # The harness's floor was measured first, against a zero-time SUT, and kept with the results.
    calibration = final.calibration
    assert not calibration.error and len(calibration.run_ids) == 2
    assert 0 < calibration.single_stream_latency.p50.ToNanoseconds() <= calibration.single_stream_latency.p99.ToNanoseconds()
    assert calibration.offline_samples_per_second > 0
    assert {r.selector for r in everything if r.run_id in calibration.run_ids} == {
        "calibration-singlestream", "calibration-offline"
    }
    # Every point is slower than the floor: the SUT's 1 ms comes on top of the harness.
    single = next(r for r in records if r.selector == "ss-c1-unshaped")
    assert single.result.latency.p50.ToNanoseconds() > calibration.single_stream_latency.p50.ToNanoseconds()
    two_clients = [r for r in records if r.clients == 2]
    for record in two_clients:
        run = stack.stub.GetRun(controller_pb2.GetRunRequest(run_id=record.run_id)).run
        assert len(run.results[0].clients) == 2
        # Throughput of two clients adds up.
        per_client = sum(c.result.samples_per_second for c in run.results[0].clients)
        assert record.result.samples_per_second == pytest.approx(per_client)
    # The experiment's manifest in the store lists every run and where its files are.
    manifest = json.loads(stack.app.store.get(stack.app.store.results_bucket, "sweep-e2e/manifest.json"))
    assert manifest["state"] == "RUN_STATE_SUCCEEDED" and manifest["points_done"] == 4
    assert [r["run_id"] for r in manifest["runs"]] == list(final.run_ids)
    for listed in manifest["runs"]:
        assert listed["state"] == "RUN_STATE_SUCCEEDED"
        assert listed["prefix"] == f"sweep-e2e/{listed['selector']}/{listed['run_id']}/"
        assert [r["result_uri"].endswith(f"{listed['prefix']}repeat-1/") for r in listed["repeats"]] == [True]
    assert manifest["spec"]["experiment_id"] == "sweep-e2e"
    assert [r["selector"] for r in manifest["calibration"]["runs"]] == ["calibration-singlestream", "calibration-offline"]
    assert manifest["calibration"]["offline_samples_per_second"] > 0


def test_peak_search_finds_the_capacity_of_a_single_server_sut(stack: Stack) -> None:
    # One server at 4 ms per sample serves at most 250 samples/s; above that the queue grows
    # without bound and p99 latency blows through the 40 ms bound.
    spec = controller_pb2.ExperimentSpec(
        experiment_id="peak-e2e",
        sut=synthetic_sut(0.004, concurrency=1),
        settings=short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(2)),
        sweep=controller_pb2.Sweep(scenarios=[common_pb2.SCENARIO_SERVER], server_target_qps=[50]),
        search=controller_pb2.PeakSearch(latency_bound=durations.from_seconds(0.040), low_qps=50, high_qps=800,
                                         tolerance=0.2, percentile=99),
        skip_calibration=True,  # the calibration is the sweep test's
    )
    stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=spec))
    final = stack.app.experiments.wait("peak-e2e", timeout=240)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    peak = final.peaks[0]
    assert 100 <= peak.peak_qps <= 260, peak
    assert len(peak.run_ids) >= 3
