"""Results survive the store going away and the controller being killed: a real S3 server on
loopback is stopped mid-run, and a controller process is killed with results still spooled."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from google.protobuf import json_format

from controller.app import ControllerApp
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.conftest import start_service_process
from tests.controller.conftest import short_settings, synthetic_sut
from tests.s3server import S3Server


def _spec(repeats: int) -> controller_pb2.RunSpec:
    return controller_pb2.RunSpec(
        experiment_id="outage", sut=synthetic_sut(0.002), repeats=repeats,
        settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_duration=durations.from_seconds(1.5)),
    )


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _assert_all_files_in_s3(server: S3Server, records: list[controller_pb2.ResultRecord], bucket: str) -> None:
    store = server.store()
    for record in records:
        prefix = f"{record.experiment_id}/{record.selector}/{record.run_id}/repeat-{record.repeat}/"
        assert sorted(store.list(bucket, prefix)) == sorted(prefix + f for f in record.files)
        document = json.loads(store.get(bucket, prefix + "result.json"))
        assert document["repeat"] == record.repeat and document["run_id"] == record.run_id
        assert b"Result is" in store.get(bucket, prefix + "mlperf_log_summary.txt")


def test_stopping_the_s3_server_mid_run_loses_no_result_file(s3_server: S3Server, tmp_path: Path) -> None:
    store = s3_server.store("outage-results", "outage-blobs")
    store.init_buckets()
    settings = ControllerSettings.load(data_dir=tmp_path, telemetry_interval_s=0)
    app = ControllerApp(settings, store=store)
    app.spool.flush_interval_s = 0.3
    try:
        run = app.runs.start_run(_spec(repeats=3))
        _wait_for(lambda: len(app.runs.get_run(run.run_id).results) >= 1, 60, "repeat 1")
        s3_server.stop()
        try:
            final = app.runs.wait(run.run_id, 120)
            assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
            assert final.results_spooled and [r.repeat for r in final.results] == [1, 2, 3]
        finally:
            s3_server.start()
        _wait_for(lambda: not app.runs.get_run(run.run_id).results_spooled, 60, "the spool to drain")
        records = app.registry.list_results(controller_pb2.ListResultsRequest(run_id=run.run_id))
        assert [r.repeat for r in records] == [1, 2, 3]
        _assert_all_files_in_s3(s3_server, records, "outage-results")
    finally:
        app.close()


def _start_controller(data_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    return start_service_process(
        "controller",
        {**env, "MECBENCH_CONTROLLER_DATA_DIR": str(data_dir), "MECBENCH_CONTROLLER_TELEMETRY_INTERVAL_S": "0",
         "MECBENCH_STORE_SPOOL_FLUSH_INTERVAL_S": "0.3"},
    )


def test_a_controller_killed_with_results_spooled_flushes_them_after_restart(
    s3_server: S3Server, tmp_path: Path
) -> None:
    env = s3_server.env()
    process, address = _start_controller(tmp_path, env)
    try:
        with open_channel(address) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            init = stub.InitStorage(controller_pb2.InitStorageRequest())
            assert init.backend == "s3" and {b.name for b in init.buckets} == {"mecbench-results", "mecbench-blobs"}
            run_id = stub.StartRun(controller_pb2.StartRunRequest(spec=_spec(repeats=3))).run.run_id
            _wait_for(lambda: stub.GetRun(controller_pb2.GetRunRequest(run_id=run_id)).run.results, 60, "repeat 1")
            s3_server.stop()
            try:
                _wait_for(lambda: stub.GetRun(controller_pb2.GetRunRequest(run_id=run_id)).run.results_spooled, 60,
                          "a repeat to be spooled")
                process.send_signal(signal.SIGKILL)  # mid-run, with results only in the spool
                process.wait(10)
            finally:
                s3_server.start()
    finally:
        if process.poll() is None:
            process.kill()
    restarted, address = _start_controller(tmp_path, env)
    try:
        with open_channel(address) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            _wait_for(lambda: not stub.GetRun(controller_pb2.GetRunRequest(run_id=run_id)).run.results_spooled, 60,
                      "the spool to drain after the restart")
            run = stub.GetRun(controller_pb2.GetRunRequest(run_id=run_id)).run
            assert run.state == common_pb2.RUN_STATE_FAILED and "restarted" in run.error
            records = list(stub.ListResults(controller_pb2.ListResultsRequest(run_id=run_id)).results)
            assert len(records) >= 2  # repeat 1 uploaded directly, at least one more through the spool
            _assert_all_files_in_s3(s3_server, records, "mecbench-results")
    finally:
        restarted.terminate()
        restarted.wait(15)


def test_a_store_blip_mid_experiment_does_not_stop_the_sweep(s3_server: S3Server, tmp_path: Path) -> None:
    """S3 away for 5 s between the points of a 3-point experiment: the points measured meanwhile
    start (the bucket was seen, the spool has room), their files wait in the spool, and every
    one of them reaches S3 with the content the registry holds."""
    store = s3_server.store("blip-results", "blip-blobs")
    store.init_buckets()
    settings = ControllerSettings.load(data_dir=tmp_path, telemetry_interval_s=0)
    app = ControllerApp(settings, store=store)
    app.spool.flush_interval_s = 0.3
    spec = controller_pb2.ExperimentSpec(
        experiment_id="blip", sut=synthetic_sut(0.001), skip_calibration=True,
        settings=short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(1.0),
                                offline_expected_qps=500.0),
        sweep=controller_pb2.Sweep(scenarios=[common_pb2.SCENARIO_SINGLE_STREAM, common_pb2.SCENARIO_OFFLINE,
                                              common_pb2.SCENARIO_SERVER]),
    )
    try:
        app.experiments.start(spec)
        _wait_for(lambda: app.experiments.get("blip").points_done >= 1, 60, "the first point")
        s3_server.stop()
        try:
            time.sleep(5)
        finally:
            s3_server.start()
        final = app.experiments.wait("blip", timeout=120)
        assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
        assert final.points_done == 3
        for run_id in final.run_ids:
            _wait_for(lambda run_id=run_id: not app.runs.get_run(run_id).results_spooled, 60, "the spool to drain")
        records = app.registry.list_results(controller_pb2.ListResultsRequest(experiment_id="blip"))
        assert sorted(r.scenario for r in records) == sorted(spec.sweep.scenarios)
        _assert_all_files_in_s3(s3_server, records, "blip-results")
        for record in records:
            prefix = f"blip/{record.selector}/{record.run_id}/repeat-{record.repeat}/"
            document = json.loads(s3_server.store().get("blip-results", prefix + "result.json"))
            # The aggregate kept in S3 is the one the registry indexed, figure for figure.
            stored = common_pb2.TestResult()
            json_format.ParseDict(document["result"]["aggregate"], stored)
            assert stored == record.result
    finally:
        app.close()
