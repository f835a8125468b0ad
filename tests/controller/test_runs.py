"""End to end through the controller: real agents, real LoadGen, results in the store."""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from controller.backends.base import AgentKind
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2
from tests.conftest import field_violations
from tests.controller.conftest import Stack, short_settings, start_stack, stop_stack, synthetic_sut

SCENARIOS = [
    common_pb2.SCENARIO_SINGLE_STREAM,
    common_pb2.SCENARIO_MULTI_STREAM,
    common_pb2.SCENARIO_SERVER,
    common_pb2.SCENARIO_OFFLINE,
]


def start(stack: Stack, settings: common_pb2.LoadGenSettings, **spec: object) -> controller_pb2.Run:
    fields: dict[str, object] = {"experiment_id": "e2e", "sut_id": "sut-2ms", "settings": settings}
    fields |= spec
    request = controller_pb2.StartRunRequest(spec=controller_pb2.RunSpec(**fields))  # type: ignore[arg-type]
    return stack.stub.StartRun(request).run


def ms(d: Duration) -> float:
    return durations.to_ns(d) / 1e6


@pytest.mark.parametrize("scenario", SCENARIOS, ids=common_pb2.Scenario.Name)
def test_every_scenario_runs_end_to_end(stack: Stack, scenario: int) -> None:
    run = start(stack, short_settings(scenario))
    final = stack.wait(run.run_id)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    assert len(final.results) == 1
    result = final.results[0].aggregate
    assert result.scenario == scenario
    assert result.samples_per_second > 0
    assert result.query_count > 0
    # The SUT takes 2 ms per sample: no latency LoadGen measured can be below that.
    assert ms(result.latency.min) >= 2.0
    assert final.results[0].sut_stats.samples_completed >= result.sample_count > 0

    record = stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=run.run_id, include_files=["mlperf_log_summary.txt", "result.json"])
    )
    files = {f.name: f.data for f in record.files}
    assert b"Result is" in files["mlperf_log_summary.txt"]
    document = json.loads(files["result.json"])
    assert document["run_id"] == run.run_id and document["repeat"] == 1
    assert document["software"]["mlcommons-loadgen"] == "6.0.17"
    assert {"mlperf_log_summary.txt", "mlperf_log_detail.txt", "result.json", "logs/sut-agent.log",
            "logs/loadgen-c0.log"} <= set(record.record.files)
    # Files live under {experiment}/{selector}/{run}/repeat-{k}/ in the results bucket.
    prefix = f"e2e/{final.spec.selector}/{run.run_id}/repeat-1/"
    keys = stack.app.store.list(stack.app.store.results_bucket, prefix)
    assert f"{prefix}mlperf_log_summary.txt" in keys and f"{prefix}result.json" in keys


def test_single_stream_latency_sits_just_above_the_service_time(stack: Stack) -> None:
    final = stack.wait(start(stack, short_settings(common_pb2.SCENARIO_SINGLE_STREAM)).run_id)
    p50 = ms(final.results[0].aggregate.latency.p50)
    assert 2.0 <= p50 <= 6.0, p50


def test_server_at_modest_qps_is_valid(stack: Stack) -> None:
    settings = short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=200.0, min_duration=durations.from_seconds(3))
    final = stack.wait(start(stack, settings).run_id)
    result = final.results[0].aggregate
    assert result.valid, list(result.invalid_reasons)
    assert 150 <= result.scheduled_samples_per_second <= 250


def test_repeats_reuse_the_loadgen_session(stack: Stack) -> None:
    final = stack.wait(start(stack, short_settings(common_pb2.SCENARIO_SINGLE_STREAM), repeats=3).run_id)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    assert [r.repeat for r in final.results] == [1, 2, 3]
    records = stack.stub.ListResults(controller_pb2.ListResultsRequest(run_id=final.run_id)).results
    assert [r.repeat for r in records] == [1, 2, 3]
    loadgens = [a for a in stack.app.pool.backend.agents() if a.kind == AgentKind.LOADGEN]
    assert len(loadgens) == 1


def test_watch_run_streams_states_to_the_end(stack: Stack) -> None:
    run = start(stack, short_settings(common_pb2.SCENARIO_SERVER))
    states = [event.state for event in stack.stub.WatchRun(controller_pb2.WatchRunRequest(run_id=run.run_id))]
    assert states[-1] == common_pb2.RUN_STATE_SUCCEEDED
    for expected in (common_pb2.RUN_STATE_RUNNING, common_pb2.RUN_STATE_UPLOADING):
        assert expected in states
    # A watcher arriving after the end gets the final state at once.
    late = list(stack.stub.WatchRun(controller_pb2.WatchRunRequest(run_id=run.run_id)))
    assert [e.state for e in late] == [common_pb2.RUN_STATE_SUCCEEDED]


def test_cancel_stops_a_long_test_promptly(stack: Stack) -> None:
    settings = short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(60))
    run = start(stack, settings)
    deadline = time.monotonic() + 20
    while stack.stub.GetRun(controller_pb2.GetRunRequest(run_id=run.run_id)).run.state != common_pb2.RUN_STATE_RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    cancelled_at = time.monotonic()
    stack.stub.CancelRun(controller_pb2.CancelRunRequest(run_id=run.run_id))
    final = stack.wait(run.run_id, timeout=20)
    assert final.state == common_pb2.RUN_STATE_CANCELLED
    assert time.monotonic() - cancelled_at < 10
    # The session still works for the next run.
    after = stack.wait(start(stack, short_settings(common_pb2.SCENARIO_SINGLE_STREAM)).run_id)
    assert after.state == common_pb2.RUN_STATE_SUCCEEDED, after.error



@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"settings": common_pb2.LoadGenSettings(scenario=17)}, "spec.settings.scenario"),
        ({"settings": common_pb2.LoadGenSettings()}, "spec.settings.scenario"),
        ({"settings": short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=-5.0)},
         "spec.settings.server_target_qps"),
        ({"experiment_id": ""}, "spec.experiment_id"),
        ({"experiment_id": "../etc"}, "spec.experiment_id"),
        ({"settings": short_settings(common_pb2.SCENARIO_OFFLINE, min_duration=Duration(seconds=-1))},
         "spec.settings.min_duration"),
        ({"sut_id": ""}, "spec.sut"),
        ({"data_plane": loadgen_agent_pb2.DataPlaneOptions(min_frame_interval=Duration(seconds=2))},
         "spec.data_plane.min_frame_interval"),
        ({"settings": short_settings(common_pb2.SCENARIO_SERVER, server_num_issue_query_threads=2)},
         "spec.settings.server_num_issue_query_threads"),
        ({"data_plane": loadgen_agent_pb2.DataPlaneOptions(issue_slack=Duration(nanos=-1))},
         "spec.data_plane.issue_slack"),
    ],
)
def test_bad_requests_are_refused_and_start_nothing(stack: Stack, spec: dict[str, object], field: str) -> None:
    agents_before = {a.name for a in stack.app.pool.backend.agents()}
    runs_before = len(stack.stub.ListRuns(controller_pb2.ListRunsRequest(page_size=500)).runs)
    fields = dict(spec)
    settings = fields.pop("settings", short_settings(common_pb2.SCENARIO_SERVER))
    with pytest.raises(grpc.RpcError) as info:
        start(stack, settings, **fields)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(info.value), info.value.details()
    assert field in info.value.details()
    assert {a.name for a in stack.app.pool.backend.agents()} == agents_before
    assert len(stack.stub.ListRuns(controller_pb2.ListRunsRequest(page_size=500)).runs) == runs_before


def test_a_field_the_sessions_path_does_not_apply_fails_the_run_naming_it(stack: Stack) -> None:
    """Which data-plane path a session takes is known only when it opens (here the relay: the
    synthetic SUT serves no external server), so the session's refusal of a direct-client field
    is the run's error, naming the field, and the next run opens its session as usual."""
    run = start(stack, short_settings(common_pb2.SCENARIO_SINGLE_STREAM),
                data_plane=loadgen_agent_pb2.DataPlaneOptions(max_in_flight=4))
    final = stack.wait(run.run_id)
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "data_plane.max_in_flight: applies to the direct client path only" in final.error, final.error
    assert not final.results
    after = stack.wait(start(stack, short_settings(common_pb2.SCENARIO_SINGLE_STREAM)).run_id)
    assert after.state == common_pb2.RUN_STATE_SUCCEEDED, after.error


def test_every_violation_is_reported_at_once(stack: Stack) -> None:
    bad = common_pb2.LoadGenSettings(scenario=common_pb2.SCENARIO_SERVER, server_target_qps=-1,
                                     max_duration=Duration(seconds=-1))
    with pytest.raises(grpc.RpcError) as info:
        start(stack, bad, experiment_id="")
    assert {"spec.experiment_id", "spec.settings.server_target_qps", "spec.settings.max_duration"} <= set(
        field_violations(info.value)
    )


def test_unknown_run_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.GetRun(controller_pb2.GetRunRequest(run_id="run-nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_failing_sut_start_fails_deploy_with_the_sut_agents_reason(stack: Stack) -> None:
    config = synthetic_sut()
    config.ClearField("synthetic")
    config.onnxruntime.model_path = "/nonexistent/model.onnx"
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="broken", config=config))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_path" in info.value.details()
    assert not any(a.name == "sut-broken" for a in stack.app.pool.backend.agents())


def test_restart_keeps_history_and_marks_in_flight_runs_failed(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = tmp_path_factory.mktemp("restart")
    first = start_stack(data_dir)
    try:
        first.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="sut-2ms", config=synthetic_sut()))
        done = first.wait(start(first, short_settings(common_pb2.SCENARIO_SINGLE_STREAM)).run_id)
        pids = [a.pid for a in first.app.pool.backend.agents()]
        # A run the controller was executing when it died: written as RUNNING, never finished.
        in_flight = controller_pb2.Run(run_id="run-inflight", state=common_pb2.RUN_STATE_RUNNING, spec=done.spec)
        in_flight.created_at.GetCurrentTime()
        first.app.registry.save_run(in_flight)
        experiment = controller_pb2.ExperimentSpec(
            experiment_id="kept-exp", sut=synthetic_sut(), settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM),
            skip_calibration=True)  # its one point is what the restart must keep
        first.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=experiment))
        kept_experiment = first.app.experiments.wait("kept-exp", timeout=120)
        assert kept_experiment.state == common_pb2.RUN_STATE_SUCCEEDED, kept_experiment.error
        # An experiment the controller was executing when it died.
        running = controller_pb2.Experiment(experiment_id="exp-inflight", state=common_pb2.RUN_STATE_RUNNING,
                                            run_ids=["run-inflight"], points_total=3)
        running.created_at.GetCurrentTime()
        first.app.registry.save_experiment(running)
    finally:
        stop_stack(first)
    for pid in pids:
        assert not _alive(pid), f"agent process {pid} outlived the controller"
    second = start_stack(data_dir)
    try:
        kept = second.stub.GetRun(controller_pb2.GetRunRequest(run_id=done.run_id)).run
        assert kept.state == common_pb2.RUN_STATE_SUCCEEDED and len(kept.results) == 1
        marked = second.stub.GetRun(controller_pb2.GetRunRequest(run_id="run-inflight")).run
        assert marked.state == common_pb2.RUN_STATE_FAILED and "restarted" in marked.error
        assert second.stub.ListResults(controller_pb2.ListResultsRequest(run_id=done.run_id)).results
        experiments = {e.experiment_id: e for e in
                       second.stub.ListExperiments(controller_pb2.ListExperimentsRequest()).experiments}
        assert experiments["kept-exp"].state == common_pb2.RUN_STATE_SUCCEEDED
        assert list(experiments["kept-exp"].run_ids) == list(kept_experiment.run_ids)
        failed = second.stub.GetExperiment(controller_pb2.GetExperimentRequest(experiment_id="exp-inflight")).experiment
        assert failed.state == common_pb2.RUN_STATE_FAILED and "restarted" in failed.error
        manifest = json.loads(second.app.store.get(second.app.store.results_bucket, "exp-inflight/manifest.json"))
        assert manifest["state"] == "RUN_STATE_FAILED" and [r["run_id"] for r in manifest["runs"]] == ["run-inflight"]
    finally:
        stop_stack(second)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_job_mode_starts_a_fresh_loadgen_per_repeat_and_records_its_setup(stack: Stack) -> None:
    settings = short_settings(common_pb2.SCENARIO_SINGLE_STREAM)
    server_mode = stack.wait(start(stack, settings, repeats=2).run_id)
    job_mode = stack.wait(start(stack, settings, repeats=2, loadgen_mode=controller_pb2.LOAD_GEN_MODE_JOB).run_id)
    assert job_mode.state == common_pb2.RUN_STATE_SUCCEEDED, job_mode.error
    job_setup = [durations.to_seconds(r.loadgen_setup_time) for r in job_mode.results]
    server_setup = [durations.to_seconds(r.loadgen_setup_time) for r in server_mode.results]
    # A fresh LoadGen process per repeat costs a process start and a dataset load every time;
    # a persistent session costs neither once it is open.
    assert min(job_setup) > max(server_setup[1:])
    assert not [a for a in stack.app.pool.backend.agents() if a.name.startswith("job-")]


def test_overlapping_runs_on_one_sut_are_queued_not_mixed(stack: Stack) -> None:
    settings = short_settings(common_pb2.SCENARIO_SINGLE_STREAM)
    first = start(stack, settings)
    second = start(stack, settings)
    finished = [stack.wait(first.run_id), stack.wait(second.run_id)]
    assert all(r.state == common_pb2.RUN_STATE_SUCCEEDED for r in finished)
    earlier, later = sorted(finished, key=lambda r: r.started_at.ToNanoseconds())
    assert later.started_at.ToNanoseconds() >= earlier.finished_at.ToNanoseconds() - 200_000_000


def test_a_busy_sut_can_be_refused_naming_the_holder(stack: Stack) -> None:
    settings = short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(3))
    holder = start(stack, settings)
    deadline = time.monotonic() + 20
    while stack.app.pool.get_sut("sut-2ms").held_by != holder.run_id:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as info:
        start(stack, settings, busy_policy=controller_pb2.BUSY_POLICY_REJECT)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert holder.run_id in info.value.details()
    stack.wait(holder.run_id)


def test_live_qps_is_the_sum_over_clients(stack: Stack) -> None:
    """Two clients at 100 QPS each (a RunSpec's target is each client's): the run's live figure is
    theirs together, not the last reporter's share (about 100). The spec's issue slack reaches
    both clients' issuing threads: each result and the aggregate carry what the kernel applied."""
    settings = short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=100.0,
                              min_duration=durations.from_seconds(3))
    slack = durations.from_seconds(0.002)
    run = start(stack, settings, clients=2, data_plane=loadgen_agent_pb2.DataPlaneOptions(issue_slack=slack))
    peak = 0.0
    for event in stack.stub.WatchRun(controller_pb2.WatchRunRequest(run_id=run.run_id), timeout=60):
        peak = max(peak, event.run.progress.live_qps)
    final = stack.wait(run.run_id)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    assert peak > 150, f"peak live QPS {peak:.0f} with 2 clients at 100 QPS each"
    repeat = final.results[0]
    assert [client.result.issue_slack for client in repeat.clients] == [slack, slack]
    assert repeat.aggregate.issue_slack == slack
