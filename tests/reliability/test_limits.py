"""Limits every request meets before work starts: a test longer than the controller allows is
refused naming the field, and a queue of waiting runs has a bound (RESOURCE_EXHAUSTED beyond)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.conftest import field_violations
from tests.controller.conftest import Stack, short_settings, stop_stack, synthetic_sut
from tests.numbers import report


def test_tests_longer_than_allowed_and_too_many_waiting_runs_are_refused(tmp_path: Path) -> None:
    settings = ControllerSettings.load(data_dir=tmp_path, max_concurrent_runs=1, max_pending_runs=2,
                                       max_test_duration_s=60.0, telemetry_interval_s=0.0)
    app = ControllerApp(settings)
    server, port = create_server("127.0.0.1:0", settings, app=app)
    channel = open_channel(f"127.0.0.1:{port}")
    stack = Stack(app, server, channel, controller_pb2_grpc.ControllerStub(channel), tmp_path)
    try:
        stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="s", config=synthetic_sut(0.001)))

        def start(seconds: float) -> controller_pb2.Run:
            spec = controller_pb2.RunSpec(experiment_id="limits", sut_id="s", settings=short_settings(
                common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(seconds)))
            return stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run

        with pytest.raises(grpc.RpcError) as info:
            start(61)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_test_duration_s" in field_violations(info.value)["spec.settings.min_duration"]

        first = start(30)
        deadline = time.monotonic() + 30
        while stack.app.runs.get_run(first.run_id).state == common_pb2.RUN_STATE_PENDING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        runs = [first, start(30), start(30)]  # one runs, two wait
        with pytest.raises(grpc.RpcError) as info:
            start(30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        report("limits", f"refused a 61 s test (limit 60 s) and a 4th waiting run with {len(runs)} accepted")
        for run in runs:
            stack.stub.CancelRun(controller_pb2.CancelRunRequest(run_id=run.run_id))
        for run in runs:
            assert stack.wait(run.run_id, 60).state == common_pb2.RUN_STATE_CANCELLED
    finally:
        stop_stack(stack)
