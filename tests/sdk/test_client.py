"""`mecbench.Client` against a real controller (experiments and runs through real agents), and
against a stand-in server for what a real one cannot be made to do on demand (fail with
UNAVAILABLE, show the metadata it received, serve TLS)."""

from __future__ import annotations

import csv
import io
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import grpc
import pytest
import yaml

from mecbench import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    ClientError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from mecbench.client import RESULT_COLUMNS, experiment_spec, result_rows
from mecbench.core import durations
from mecbench.experiment_file import load_experiment_file
from mecbench.v1 import common_pb2, controller_pb2
from tests.controller.conftest import Stack, short_settings, start_stack, stop_stack, synthetic_sut
from tests.sdk import FakeController, controller_later, free_port, spec_file, tls_fake

SINGLE = common_pb2.SCENARIO_SINGLE_STREAM


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("sdk-controller"))
    yield running
    stop_stack(running)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.server.address) as connected:
        yield connected


@pytest.fixture(scope="module")
def sut_id(client: Client) -> str:
    deployed = client.deploy_sut("sdk-sut", synthetic_sut(0.001))
    assert deployed.sut_id == "sdk-sut" and deployed.endpoint.address
    return deployed.sut_id


def tiny_experiment(experiment_id: str) -> controller_pb2.ExperimentSpec:
    return controller_pb2.ExperimentSpec(
        experiment_id=experiment_id,
        skip_calibration=True,
        sut=synthetic_sut(0.001),
        dataset=common_pb2.DatasetSpec(
            synthetic=common_pb2.SyntheticDataset(sample_count=64, shape=[16], data_type=common_pb2.DATA_TYPE_FLOAT32)
        ),
        settings=common_pb2.LoadGenSettings(
            min_duration=durations.from_seconds(0.3),
            min_query_count=100,
            single_stream_expected_latency=durations.from_seconds(0.001),
            skip_mlperf_defaults=True,
        ),
        sweep=controller_pb2.Sweep(scenarios=[SINGLE], clients=[1, 2]),
    )


def run_spec(sut_id: str, selector: str, seconds: float = 1.0) -> controller_pb2.RunSpec:
    return controller_pb2.RunSpec(
        experiment_id="sdk-runs",
        selector=selector,
        sut_id=sut_id,
        settings=short_settings(
            SINGLE, min_duration=durations.from_seconds(seconds),
            single_stream_expected_latency=durations.from_seconds(0.001),
        ),
    )


def wait_until_testing(client: Client, run_ids: Callable[[], Sequence[str]]) -> None:
    """Until the run named by `run_ids()` has LoadGen queries done (a cancel before that is a
    cancel of the set-up, which is not what these tests are about)."""
    deadline = time.monotonic() + 30
    while True:
        ids = run_ids()
        if ids:
            run = client.get_run(ids[0])
            if run.state == common_pb2.RUN_STATE_RUNNING and run.progress.samples_completed:
                return
        assert time.monotonic() < deadline, "the test never started"
        time.sleep(0.05)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("load_gen", "loadgen")


# --- every RPC has a method --------------------------------------------------------------------


def test_every_controller_rpc_has_a_method_on_both_clients() -> None:
    rpcs = [method.name for method in controller_pb2.DESCRIPTOR.services_by_name["Controller"].methods]
    for rpc in rpcs:
        assert callable(getattr(Client, snake(rpc), None)), rpc
        assert callable(getattr(AsyncClient, snake(rpc), None)), rpc
    for extra in ("wait_run", "wait_experiment", "watch_experiment", "results_table", "upload_dataset", "call"):
        assert callable(getattr(Client, extra)) and callable(getattr(AsyncClient, extra))


def test_importing_mecbench_loads_no_grpc_until_a_client_is_asked_for() -> None:
    code = (
        "import sys, mecbench; assert 'grpc' not in sys.modules, 'grpc loaded';"
        "from mecbench import Client, NotFoundError; assert 'grpc.aio' not in sys.modules or True;"
        "assert 'mecbench.aio' not in sys.modules; from mecbench import AsyncClient; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --- experiments -------------------------------------------------------------------------------


def test_an_experiment_from_objects_is_watched_to_its_end_and_tabled(client: Client, tmp_path: Path) -> None:
    spec = tiny_experiment("sdk-objects")
    started = client.start_experiment(spec)
    assert started.experiment_id == "sdk-objects" and started.points_total == 2
    seen = list(client.watch_experiment("sdk-objects", poll_s=0.1, timeout=60))
    assert seen[0].state not in (common_pb2.RUN_STATE_FAILED, common_pb2.RUN_STATE_CANCELLED)
    assert seen[-1].state == common_pb2.RUN_STATE_SUCCEEDED, seen[-1].error
    assert all(a != b for a, b in itertools.pairwise(seen)), "only changes are yielded"
    done = [e.points_done for e in seen]
    assert done == sorted(done) and done[-1] == 2
    assert spec.sweep.clients == [1, 2] and not spec.HasField("search")  # the caller's spec is not changed

    table = client.results_table(experiment_id="sdk-objects")
    assert len(table) == 2 and table.columns == RESULT_COLUMNS
    assert sorted(row["clients"] for row in table) == [1, 2]  # type: ignore[type-var]
    for row in table:
        assert row["experiment_id"] == "sdk-objects" and row["run_id"] in seen[-1].run_ids
        assert row["scenario"] == "SingleStream" and row["repeat"] == 1 and row["valid"] is True
        assert row["sut_backend"] == "synthetic"
        p50 = row["latency_p50_ms"]
        assert isinstance(p50, float) and 0.5 < p50 < 50  # a 1 ms SUT plus the harness
        assert isinstance(row["samples_per_second"], float) and row["samples_per_second"] > 0
        assert row["ttft_p50_ms"] is None and row["accuracy"] is None
        assert isinstance(row["created_at"], str) and datetime.fromisoformat(row["created_at"]).tzinfo is not None
        assert str(row["result_uri"]).endswith("/repeat-1/")

    text = table.to_csv(tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text() == text
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [list(r) for r in parsed] == [RESULT_COLUMNS] * 2
    for row, back in zip(table, parsed, strict=True):
        assert back["run_id"] == row["run_id"] and int(back["clients"]) == row["clients"]
        assert float(back["latency_p99_ms"]) == row["latency_p99_ms"]
        assert back["valid"] == "true" and back["ttft_p50_ms"] == "" and back["accuracy"] == ""
    lines = table.to_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("experiment_id") and "SingleStream" in lines[1]
    assert lines[1].index("SingleStream") == lines[0].index("scenario")  # aligned columns


def test_an_experiment_from_a_yaml_file_and_its_results(client: Client, tmp_path: Path) -> None:
    path = spec_file(tmp_path, "sdk-yaml-in-file", clients="1")
    started = client.start_experiment(path, experiment_id="sdk-yaml")
    assert started.experiment_id == "sdk-yaml"
    final = client.wait_experiment("sdk-yaml", timeout=60, poll_s=0.1)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    assert "sdk-yaml" in {e.experiment_id for e in client.list_experiments()}

    runs = client.list_runs(experiment_id="sdk-yaml")
    assert [run.run_id for run in runs] == list(final.run_ids)
    records = client.list_results(experiment_id="sdk-yaml")
    assert [r.run_id for r in records] == list(final.run_ids)
    result = client.get_result(final.run_ids[0], include_files=["mlperf_log_summary.txt"])
    assert result.record.run_id == final.run_ids[0] and result.record.repeat == 1
    assert b"MLPerf Results Summary" in result.files[0].data


def test_a_mapping_reads_as_the_same_file_would(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "sdk-mapping")
    mapping = yaml.safe_load(path.read_text())
    assert experiment_spec(mapping) == load_experiment_file(path)
    assert experiment_spec(mapping, "renamed").experiment_id == "renamed"


def test_an_experiment_is_cancelled(client: Client, tmp_path: Path) -> None:
    client.start_experiment(spec_file(tmp_path, "sdk-cancel", clients="1, 2", duration="30s"))
    wait_until_testing(client, lambda: client.get_experiment("sdk-cancel").run_ids[:1])
    client.cancel_experiment("sdk-cancel")
    final = client.wait_experiment("sdk-cancel", timeout=30, poll_s=0.1)
    assert final.state == common_pb2.RUN_STATE_CANCELLED
    assert final.points_done < final.points_total
    assert client.get_run(final.run_ids[0]).state == common_pb2.RUN_STATE_CANCELLED


# --- runs ----------------------------------------------------------------------------------------


def test_a_run_is_watched_from_its_current_state_to_its_end(client: Client, sut_id: str) -> None:
    run = client.start_run(run_spec(sut_id, "sdk-watch"))
    events = list(client.watch_run(run.run_id, timeout=60))
    assert events[0].message == "current state"
    states = [event.state for event in events]
    assert states[-1] == common_pb2.RUN_STATE_SUCCEEDED, events[-1].run.error
    assert common_pb2.RUN_STATE_RUNNING in states
    assert events[-1].run.results[0].aggregate.valid

    final = client.wait_run(run.run_id, timeout=10)  # already over: returns at once
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED and final.run_id == run.run_id
    listed = client.list_runs(experiment_id="sdk-runs", state=common_pb2.RUN_STATE_SUCCEEDED)
    assert run.run_id in {r.run_id for r in listed}
    assert len(client.list_runs(limit=1)) == 1
    assert isinstance(client.get_metrics(run_id=run.run_id), list)
    assert client.deploy_loadgen_server().loadgen_id
    assert isinstance(client.list_nodes(), list)


def test_a_run_is_cancelled_while_it_runs(client: Client, sut_id: str) -> None:
    run = client.start_run(run_spec(sut_id, "sdk-cancel", seconds=30))
    for event in client.watch_run(run.run_id, timeout=30):
        if event.state == common_pb2.RUN_STATE_RUNNING and event.progress.samples_completed:
            break  # leaving the watch early closes its stream
    client.cancel_run(run.run_id)
    final = client.wait_run(run.run_id, timeout=30)
    assert final.state == common_pb2.RUN_STATE_CANCELLED


# --- typed errors --------------------------------------------------------------------------------


def test_a_bad_spec_raises_invalid_argument_naming_every_field(client: Client, tmp_path: Path) -> None:
    path = spec_file(tmp_path, "sdk-bad")
    path.write_text(path.read_text().replace("clients: [1, 2]", "clients: [0, 2]\n  repeats: 500"))
    with pytest.raises(InvalidArgumentError) as caught:
        client.start_experiment(path)
    error = caught.value
    assert isinstance(error, ClientError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.method == "StartExperiment" and error.rpc_error is not None
    assert {"spec.sweep.clients[0]", "spec.sweep.repeats"} <= set(error.field_violations)
    text = str(error)
    assert text.startswith("INVALID_ARGUMENT") and "spec.sweep.clients[0]" in text and "spec.sweep.repeats" in text
    assert "sdk-bad" not in {e.experiment_id for e in client.list_experiments()}


def test_a_spec_file_that_does_not_parse_fails_here_the_same_way(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("experiment_id: [\n")
    with pytest.raises(InvalidArgumentError) as caught:
        client.start_experiment(path)
    assert caught.value.rpc_error is None and list(caught.value.field_violations) == ["spec"]
    path.write_text("experiment_id: x\nno_such_field: 1\n")
    with pytest.raises(InvalidArgumentError, match="no_such_field"):
        client.start_experiment(path)


def test_unknown_ids_raise_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.get_run("run-does-not-exist")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.method == "GetRun"
    assert "run-does-not-exist" in str(caught.value)
    with pytest.raises(NotFoundError):
        client.get_experiment("no-such-experiment")
    with pytest.raises(NotFoundError):
        client.get_result("run-does-not-exist")


def test_other_codes_and_local_checks_are_typed(client: Client, tmp_path: Path) -> None:
    blob = tmp_path / "user.conf"
    blob.write_text("*.Server.target_qps = 100\n")
    client.upload_blob(blob, "configs/sdk.conf")
    with pytest.raises(AlreadyExistsError):
        client.upload_blob(blob, "configs/sdk.conf")
    with pytest.raises(InvalidArgumentError) as caught:
        client.get_metrics()
    assert "subject" in caught.value.field_violations
    with pytest.raises(InvalidArgumentError) as caught:
        client.get_metrics(run_id="a", node="b")
    assert caught.value.rpc_error is None


# --- retries -------------------------------------------------------------------------------------


def test_nothing_listening_raises_unavailable_after_backing_off() -> None:
    with Client(f"127.0.0.1:{free_port()}", retries=3, backoff_s=0.1) as nowhere:
        began = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            nowhere.get_run("x")
        waited = time.monotonic() - began
    assert waited >= 0.1 + 0.2 + 0.4  # the backoff schedule, as a lower bound only
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.method == "GetRun"


def test_unavailable_is_retried_as_many_times_as_asked_and_no_more() -> None:
    fake = FakeController(get_run_failures=2)
    try:
        with Client(fake.address, retries=2, backoff_s=0.01) as client:
            assert client.get_run("third-time").run_id == "third-time"
            assert fake.calls["GetRun"] == 3
            fake.get_run_failures = 100
            with pytest.raises(UnavailableError):
                client.get_run("never")
            assert fake.calls["GetRun"] == 3 + 3
            # A lost reply to StartRun may hide a started run: it is not sent twice.
            with pytest.raises(UnavailableError):
                client.start_run(controller_pb2.RunSpec(selector="once"))
            assert fake.calls["StartRun"] == 1
        with Client(fake.address, retries=0) as client:
            with pytest.raises(UnavailableError):
                client.get_run("x")
            assert fake.calls["GetRun"] == 3 + 3 + 1
    finally:
        fake.stop()


def test_a_broken_watch_is_reopened_and_stale_events_skipped() -> None:
    fake = FakeController()
    try:
        with Client(fake.address, retries=2, backoff_s=0.01) as client:
            messages = [event.message for event in client.watch_run("r")]
            assert messages == ["running", "current state", "succeeded"]
            assert fake.calls["WatchRun"] == 2
            fake.calls["WatchRun"] = 0
            assert client.wait_run("r").state == common_pb2.RUN_STATE_SUCCEEDED
    finally:
        fake.stop()


def test_a_controller_that_starts_during_the_backoff_is_reached(tmp_path: Path) -> None:
    port = free_port()
    thread, started = controller_later(port, tmp_path, delay_s=0.4)
    try:
        with Client(f"127.0.0.1:{port}", retries=6, backoff_s=0.2) as client:
            assert client.list_experiments() == []
    finally:
        thread.join()
        for server in started:
            server.stop(grace=1.0)


# --- token and TLS -------------------------------------------------------------------------------


def test_a_token_is_sent_as_bearer_metadata_on_every_call() -> None:
    fake = FakeController()
    try:
        with Client(fake.address, token="s3cret") as client:
            client.get_run("a")
            client.get_run("b")
        with Client(fake.address) as anonymous:
            anonymous.get_run("c")
        assert [m.get("authorization") for m in fake.metadata] == ["Bearer s3cret", "Bearer s3cret", None]
    finally:
        fake.stop()


def test_tls_with_a_private_ca_and_a_token(tmp_path: Path) -> None:
    fake, ca_file = tls_fake(tmp_path)
    try:
        with Client(f"localhost:{fake.port}", tls=True, ca_file=ca_file, token="t0k", retries=0) as client:
            assert client.get_run("secure").run_id == "secure"
        assert fake.metadata[-1]["authorization"] == "Bearer t0k"
        with Client(f"127.0.0.1:{fake.port}", ca_file=str(ca_file), retries=0) as by_ip:  # ca_file implies TLS
            assert by_ip.get_run("by-ip").run_id == "by-ip"
        # The system roots do not trust a self-signed certificate; plaintext is refused too.
        with Client(f"localhost:{fake.port}", tls=True, retries=0) as untrusted, pytest.raises(UnavailableError):
            untrusted.get_run("x")
        with Client(fake.address, retries=0) as plaintext, pytest.raises(UnavailableError):
            plaintext.get_run("x")
        assert fake.calls["GetRun"] == 2
    finally:
        fake.stop()


# --- the table without a server ------------------------------------------------------------------


def test_result_rows_fill_token_and_accuracy_columns_only_where_they_apply() -> None:
    llm = controller_pb2.ResultRecord(
        experiment_id="e", selector="llm", run_id="r1", repeat=2, scenario=common_pb2.SCENARIO_SERVER, clients=4,
        network_profile="4g", sut_backend="openai",
        result=common_pb2.TestResult(
            valid=False, samples_per_second=12.5, tokens_per_second=640.0,
            latency=common_pb2.LatencyStats(p50=durations.from_seconds(0.2), p90=durations.from_seconds(0.3),
                                            p99=durations.from_seconds(0.5)),
            ttft=common_pb2.LatencyStats(p50=durations.from_seconds(0.05)),
            tpot=common_pb2.LatencyStats(p50=durations.from_seconds(0.01)),
            accuracy={"exact_match": 0.875}, accuracy_scorer="exact_match",
        ),
    )
    plain = controller_pb2.ResultRecord(experiment_id="e", selector="offline", run_id="r2", repeat=1,
                                        result=common_pb2.TestResult(scenario=common_pb2.SCENARIO_OFFLINE))
    table = result_rows([llm, plain])
    first, second = table.rows
    assert first["scenario"] == "Server" and first["valid"] is False and first["latency_p99_ms"] == 500.0
    assert first["ttft_p50_ms"] == 50.0 and first["tpot_p50_ms"] == 10.0 and first["tokens_per_second"] == 640.0
    assert first["accuracy_metric"] == "exact_match" and first["accuracy"] == 0.875
    assert second["scenario"] == "Offline" and second["latency_p50_ms"] is None and second["created_at"] is None
    assert second["ttft_p50_ms"] is None and second["accuracy"] is None
    assert table.column("run_id") == ["r1", "r2"]
    text = table.to_text(["run_id", "latency_p50_ms", "ttft_p50_ms", "accuracy", "valid"])
    assert text.splitlines()[0] == "run_id  latency_p50_ms  ttft_p50_ms  accuracy  valid"
    assert text.splitlines()[1].split() == ["r1", "200.000", "50.000", "0.8750", "false"]
    assert text.splitlines()[2].split() == ["r2", "-", "-", "-", "false"]
    buffer = io.StringIO()
    table.to_csv(buffer)
    back = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert back[0]["accuracy"] == "0.875" and back[1]["accuracy"] == "" and back[0]["valid"] == "false"


def test_calibration_rows_are_marked_and_not_judged() -> None:
    """The harness's calibration is a short floor measurement LoadGen does not judge VALID: its
    rows say what they are rather than reading as failures."""
    calibration = controller_pb2.ResultRecord(experiment_id="e", selector="calibration-offline", run_id="c",
                                              result=common_pb2.TestResult(valid=False))
    measured = controller_pb2.ResultRecord(experiment_id="e", selector="offline", run_id="m",
                                           result=common_pb2.TestResult(valid=False))
    first, second = result_rows([calibration, measured]).rows
    assert first["kind"] == "calibration" and first["valid"] is None
    assert second["kind"] == "measurement" and second["valid"] is False
