"""The LoadGen agent end to end: real sessions (processes), real LoadGen runs, a real SUT agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controller.aggregate import latencies_for_scenario, latency_stats, read_sample_latencies
from loadgen_agent.worker import synthetic_samples
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, loadgen_agent_pb2, loadgen_agent_pb2_grpc, sut_agent_pb2
from sut_agent.lifecycle import BackendManager
from sut_agent.server import create_server as create_sut_server
from sut_agent.settings import SutAgentSettings
from tests.conftest import field_violations
from tests.loadgen_agent.conftest import (
    Agent,
    Outcome,
    SutServer,
    collect,
    process_exists,
    run_test,
    short_settings,
    start_agent,
    start_stand_in_sut,
    start_sut,
    worker_processes,
)

SUMMARY = "mlperf_log_summary.txt"



@pytest.fixture(scope="module")
def session(agent: Agent, sut: SutServer) -> Iterator[loadgen_agent_pb2.Session]:
    opened = agent.open(sut.address, label="client-0", owner="run-1")
    yield opened
    agent.close(opened.session_id)


def test_open_session(agent: Agent, session: loadgen_agent_pb2.Session) -> None:
    assert session.state == loadgen_agent_pb2.SESSION_STATE_IDLE
    assert session.sample_count == 1024  # the default synthetic dataset
    assert session.pid > 0 and process_exists(session.pid)
    assert session.setup_time.ToNanoseconds() > 0
    assert session.label == "client-0" and session.owner == "run-1"
    listed = agent.stub.ListSessions(loadgen_agent_pb2.ListSessionsRequest()).sessions
    assert session.session_id in {s.session_id for s in listed}


def test_all_scenarios_back_to_back_in_one_process(agent: Agent, session: loadgen_agent_pb2.Session) -> None:
    results: dict[int, common_pb2.TestResult] = {}
    for scenario in (
        common_pb2.SCENARIO_SINGLE_STREAM,
        common_pb2.SCENARIO_MULTI_STREAM,
        common_pb2.SCENARIO_OFFLINE,
        common_pb2.SCENARIO_SERVER,
    ):
        settings = short_settings(scenario)
        if scenario == common_pb2.SCENARIO_SERVER:
            settings.min_query_count = 500  # enough queries for LoadGen's early-stopping check
        outcome = run_test(agent, session.session_id, settings, test_id=f"scenario-{scenario}")
        assert outcome.test_ids == {f"scenario-{scenario}"}
        assert outcome.started is not None and outcome.finished is not None
        assert not outcome.finished.cancelled
        assert "min_duration_ms = 1000" in outcome.started.effective_settings
        assert outcome.started.setup_time.ToNanoseconds() > 0
        assert SUMMARY in outcome.files and "mlperf_log_detail.txt" in outcome.files
        assert all(len(c.data) <= 1024 * 1024 for c in outcome.chunks)
        assert [c.last for c in outcome.chunks if c.name == SUMMARY][-1]
        result = outcome.result
        assert result.scenario == scenario
        assert result.samples_per_second > 0 and result.query_count > 0
        assert (
            result.summary_fields["Scenario"]
            == bytes(outcome.files[SUMMARY]).decode().split("Scenario : ")[1].split()[0]
        )
        assert outcome.finished.batches_sent > 0 and outcome.finished.samples_sent >= result.sample_count
        results[scenario] = result

    single = results[common_pb2.SCENARIO_SINGLE_STREAM]
    p50_ms = single.latency.p50.ToNanoseconds() / 1e6
    assert 2.0 <= p50_ms <= 6.0, f"SingleStream p50 {p50_ms:.2f} ms against a 2 ms SUT"
    assert (
        results[common_pb2.SCENARIO_MULTI_STREAM].sample_count
        == 4 * results[common_pb2.SCENARIO_MULTI_STREAM].query_count
    )
    server = results[common_pb2.SCENARIO_SERVER]
    assert server.valid, list(server.invalid_reasons)
    assert 150 < server.samples_per_second < 250

    after = agent.session(session.session_id)
    assert after.pid == session.pid, "every test ran in the session's one process"
    assert after.tests_run >= 4 and after.state == loadgen_agent_pb2.SESSION_STATE_IDLE


def test_progress_events(agent: Agent, session: loadgen_agent_pb2.Session) -> None:
    outcome = run_test(agent, session.session_id, short_settings(common_pb2.SCENARIO_SERVER))
    assert len(outcome.progress) >= 2
    last = outcome.progress[-1]
    assert last.samples_issued >= last.samples_completed > 0
    assert any(p.live_qps > 0 for p in outcome.progress)
    elapsed = [p.elapsed.ToNanoseconds() for p in outcome.progress]
    assert elapsed == sorted(elapsed)


def test_one_test_at_a_time_and_cancel_ends_promptly(agent: Agent, session: loadgen_agent_pb2.Session) -> None:
    """A Server test of a minute is cancelled after its first progress event: the worker answers
    everything at once, LoadGen keeps its schedule, so the agent replaces the process after the
    grace period; the session is usable again afterwards."""
    long_test = short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(60))
    request = loadgen_agent_pb2.RunTestRequest(session_id=session.session_id, settings=long_test, test_id="long")
    progressed = threading.Event()
    box: dict[str, object] = {}

    def on_event(kind: str) -> None:
        if kind == "progress":
            progressed.set()

    def consume() -> None:
        try:
            box["outcome"] = collect(agent.stub.RunTest(request, timeout=60), on_event=on_event)
        except grpc.RpcError as exc:
            box["error"] = exc

    thread = threading.Thread(target=consume)
    thread.start()
    assert progressed.wait(30)
    with pytest.raises(grpc.RpcError) as busy:
        run_test(agent, session.session_id, short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert agent.session(session.session_id).state == loadgen_agent_pb2.SESSION_STATE_RUNNING

    cancelled_at = time.monotonic()
    reply = agent.stub.CancelTest(loadgen_agent_pb2.CancelTestRequest(session_id=session.session_id))
    assert reply.was_running
    thread.join(30)
    took = time.monotonic() - cancelled_at
    assert not thread.is_alive(), "RunTest did not end after CancelTest"
    assert "error" not in box, box.get("error")
    outcome = box["outcome"]
    assert outcome.finished is not None and outcome.finished.cancelled  # type: ignore[attr-defined]
    assert took < 20, f"cancel took {took:.1f}s"

    # The session serves the next test (in a fresh process, since LoadGen kept its schedule).
    after = run_test(agent, session.session_id, short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
    assert after.finished is not None and not after.finished.cancelled and after.result.query_count > 0
    described = agent.session(session.session_id)
    assert described.worker_restarts == 1 and described.pid != session.pid
    assert not process_exists(session.pid)
    assert not agent.stub.CancelTest(loadgen_agent_pb2.CancelTestRequest(session_id=session.session_id)).was_running


def test_cancel_answers_outstanding_queries(agent: Agent, hanging_sut: SutServer) -> None:
    """Offline against a SUT that never answers: the cancel completes every outstanding sample, so
    LoadGen ends the test itself, in the same process, with its logs."""
    opened = agent.open(hanging_sut.address)
    try:
        request = loadgen_agent_pb2.RunTestRequest(
            session_id=opened.session_id, settings=short_settings(common_pb2.SCENARIO_OFFLINE)
        )
        events = agent.stub.RunTest(request, timeout=60)
        first = next(events)
        assert first.WhichOneof("event") == "started"
        assert agent.stub.CancelTest(loadgen_agent_pb2.CancelTestRequest(session_id=opened.session_id)).was_running
        outcome = collect(events)
        assert outcome.finished is not None and outcome.finished.cancelled
        assert SUMMARY in outcome.files
        assert outcome.finished.result.sample_count > 0
        assert agent.session(opened.session_id).pid == opened.pid
    finally:
        agent.close(opened.session_id)


def test_response_timeout_fails_the_test_clearly(agent: Agent, hanging_sut: SutServer) -> None:
    opened = agent.open(
        hanging_sut.address,
        data_plane=loadgen_agent_pb2.DataPlaneOptions(response_timeout=durations.from_seconds(0.5)),
    )
    try:
        settings = short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_duration=durations.from_seconds(0.5))
        with pytest.raises(grpc.RpcError) as caught:
            run_test(agent, opened.session_id, settings)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no response from the SUT agent" in (caught.value.details() or "")
        assert agent.session(opened.session_id).state == loadgen_agent_pb2.SESSION_STATE_IDLE
    finally:
        agent.close(opened.session_id)


def server_test_with_and_without(
    agent: Agent, sut: SutServer, options: loadgen_agent_pb2.DataPlaneOptions
) -> tuple[Outcome, Outcome]:
    """The same 2000 QPS Server test in a session with `options` and in one without."""
    settings = short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=2000.0)
    with_options = agent.open(sut.address, data_plane=options)
    plain = agent.open(sut.address)
    try:
        return run_test(agent, with_options.session_id, settings), run_test(agent, plain.session_id, settings)
    finally:
        agent.close(with_options.session_id)
        agent.close(plain.session_id)


def test_min_frame_interval_paces_messages_and_bounds_the_wait(agent: Agent, sut: SutServer) -> None:
    """At 2000 QPS with a 20 ms interval a stream sends about 50 messages a second of ~40 samples,
    each sample waiting at most the interval; without one, samples go about one per message."""
    held, sent_at_once = server_test_with_and_without(
        agent, sut, loadgen_agent_pb2.DataPlaneOptions(min_frame_interval=durations.from_seconds(0.020))
    )
    assert held.finished is not None and sent_at_once.finished is not None
    assert held.result.valid and sent_at_once.result.valid
    assert held.finished.mean_batch_size > 10, held.finished
    assert sent_at_once.finished.mean_batch_size < held.finished.mean_batch_size / 4, sent_at_once.finished
    # Samples wait for the next message: half the interval on average, never much over all of it.
    assert durations.to_seconds(held.result.latency.p50) > 0.005, held.result.latency
    assert durations.to_seconds(held.result.latency.max) < 0.020 + 0.030, held.result.latency


def test_issue_slack_is_applied_to_the_issuing_thread_and_read_back(agent: Agent, sut: SutServer) -> None:
    """The result says what the kernel applied to LoadGen's issuing thread: the session's 20 ms,
    or the kernel's default for a session without the option. What the slack does to latency
    depends on the machine's other timers (here about +10 ms of mean latency when idle, little
    under load, where other interrupts wake the thread sooner), so bench/harness.py measures its
    effect rather than this test."""
    slack = durations.from_seconds(0.020)
    slackened, on_time = server_test_with_and_without(
        agent, sut, loadgen_agent_pb2.DataPlaneOptions(issue_slack=slack)
    )
    assert slackened.result.valid and on_time.result.valid
    assert slackened.result.issue_slack == slack
    default_ns = durations.to_ns(on_time.result.issue_slack)
    assert 0 < default_ns < durations.to_ns(slack)


def test_interfaces_batching_and_accuracy(agent: Agent, sut: SutServer) -> None:
    """ConstructSUT with two streams and batches of up to 8 (1 ms delay): an accuracy run logs
    every sample's output; ConstructQDL's name comes from a round trip to the SUT agent."""
    dataset = common_pb2.DatasetSpec(
        synthetic=common_pb2.SyntheticDataset(
            sample_count=64, shape=[2, 4], data_type=common_pb2.DATA_TYPE_INT32, seed=7
        )
    )
    standard = agent.open(
        sut.address,
        dataset=dataset,
        data_plane=loadgen_agent_pb2.DataPlaneOptions(
            sut_interface=loadgen_agent_pb2.SUT_INTERFACE_STANDARD,
            streams=2,
            max_batch_size=8,
            max_batch_delay=durations.from_seconds(0.001),
        ),
    )
    try:
        assert standard.sample_count == 64
        accuracy = short_settings(common_pb2.SCENARIO_OFFLINE, mode=common_pb2.TEST_MODE_ACCURACY_ONLY)
        outcome = run_test(agent, standard.session_id, accuracy)
        entries = json.loads(bytes(outcome.files["mlperf_log_accuracy.json"]))
        assert sorted(e["qsl_idx"] for e in entries) == list(range(64))
        assert all(len(e["data"]) == 16 for e in entries)  # 8 output bytes, hex
        assert outcome.result.mode == common_pb2.TEST_MODE_ACCURACY_ONLY
        finished = outcome.finished
        assert finished is not None and finished.samples_sent == 64
        assert 1 < finished.mean_batch_size <= 8
    finally:
        agent.close(standard.session_id)

    qdl = agent.open(
        sut.address,
        data_plane=loadgen_agent_pb2.DataPlaneOptions(sut_interface=loadgen_agent_pb2.SUT_INTERFACE_NETWORK_QDL),
    )
    try:
        outcome = run_test(agent, qdl.session_id, short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
        assert outcome.result.summary_fields["SUT name"].startswith("mecbench-qdl:")
        assert outcome.result.query_count > 0
    finally:
        agent.close(qdl.session_id)


def test_first_tokens_give_token_latencies(agent: Agent) -> None:
    # The stand-in SUT (conftest) streams first tokens, which the synthetic backend may not.
    token_sut = start_stand_in_sut(0.004, token_steps=4)
    try:
        opened = agent.open(token_sut.address)
        settings = short_settings(common_pb2.SCENARIO_SERVER, use_token_latencies=True)
        outcome = run_test(agent, opened.session_id, settings)
        result = outcome.result
        assert 0 < result.ttft.p50.ToNanoseconds() < result.latency.p50.ToNanoseconds()
        assert result.tpot.p50.ToNanoseconds() > 0
        assert result.tokens_per_second > 0
        agent.close(opened.session_id)
    finally:
        token_sut.stop()


def test_payloads_are_the_dataset_samples(agent: Agent) -> None:
    recording = start_stand_in_sut(0.001)
    assert recording.stand_in is not None
    dataset = common_pb2.DatasetSpec(
        synthetic=common_pb2.SyntheticDataset(
            sample_count=32, shape=[3], data_type=common_pb2.DATA_TYPE_FLOAT16, seed=3
        )
    )
    expected = synthetic_samples(dataset.synthetic)
    assert len(expected) == 32 and all(len(sample) == 6 for sample in expected)
    try:
        with_payloads = agent.open(recording.address, dataset=dataset)
        run_test(agent, with_payloads.session_id, short_settings(common_pb2.SCENARIO_OFFLINE))
        received = recording.stand_in.received
        assert received and all(payload == expected[index] for index, payload in received)
        agent.close(with_payloads.session_id)

        received.clear()
        without = agent.open(
            recording.address, dataset=dataset, data_plane=loadgen_agent_pb2.DataPlaneOptions(omit_payloads=True)
        )
        run_test(agent, without.session_id, short_settings(common_pb2.SCENARIO_OFFLINE))
        assert received and all(payload == b"" and 0 <= index < 32 for index, payload in received)
        agent.close(without.session_id)
    finally:
        recording.stop()


def test_killed_worker_fails_the_session(agent: Agent, sut: SutServer) -> None:
    opened = agent.open(sut.address)
    request = loadgen_agent_pb2.RunTestRequest(
        session_id=opened.session_id,
        settings=short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(30)),
    )
    events = agent.stub.RunTest(request, timeout=60)
    assert next(events).WhichOneof("event") == "started"
    os.kill(opened.pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as caught:
        collect(events)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "SIGKILL" in (caught.value.details() or "")

    failed = agent.session(opened.session_id)
    assert failed.state == loadgen_agent_pb2.SESSION_STATE_FAILED
    assert "SIGKILL" in failed.error and str(opened.pid) in failed.error
    with pytest.raises(grpc.RpcError) as refused:
        run_test(agent, opened.session_id, short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SIGKILL" in (refused.value.details() or "")
    agent.close(opened.session_id)


def test_bad_requests_start_no_process(agent: Agent, sut: SutServer) -> None:
    before = set(worker_processes())
    bad_open = loadgen_agent_pb2.OpenSessionRequest(
        sut_address="no-port",
        dataset=common_pb2.DatasetSpec(synthetic=common_pb2.SyntheticDataset(shape=[4, -1]), sha256="xyz"),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(
            max_batch_delay=durations.from_seconds(-1), min_frame_interval=durations.from_seconds(1.5),
            issue_slack=durations.from_seconds(-0.001),
        ),
    )
    with pytest.raises(grpc.RpcError) as caught:
        agent.stub.OpenSession(bad_open)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value).keys() == {
        "sut_address",
        "dataset.synthetic.shape[1]",
        "dataset.sha256",
        "data_plane.max_batch_delay",
        "data_plane.min_frame_interval",
        "data_plane.issue_slack",
    }
    assert set(worker_processes()) == before

    with pytest.raises(grpc.RpcError) as unknown:
        next(
            agent.stub.RunTest(
                loadgen_agent_pb2.RunTestRequest(
                    session_id="ls-nope", settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM)
                )
            )
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_settings_are_rejected_with_field_paths(agent: Agent, session: loadgen_agent_pb2.Session) -> None:
    bad = common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SERVER,
        min_duration=durations.from_seconds(-1),
        server_target_latency_percentile=101,
    )
    with pytest.raises(grpc.RpcError) as caught:
        run_test(agent, session.session_id, bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value).keys() == {
        "settings.min_duration",
        "settings.server_target_latency_percentile",
        "settings.server_target_qps",
    }
    # LoadGen's own parser rejects user_conf inside the session process.
    with pytest.raises(grpc.RpcError) as conf:
        run_test(
            agent,
            session.session_id,
            short_settings(common_pb2.SCENARIO_SINGLE_STREAM, user_conf="*.SingleStream.min_query_count = many\n"),
        )
    assert conf.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(conf.value).keys() == {"settings.user_conf"}
    assert agent.session(session.session_id).state == loadgen_agent_pb2.SESSION_STATE_IDLE


def test_unreachable_sut_and_uri_datasets(tmp_path: Path) -> None:
    before = set(worker_processes())
    agent = start_agent(tmp_path, sut_connect_timeout_s=0.5)
    try:
        with pytest.raises(grpc.RpcError) as unreachable:
            agent.open("127.0.0.1:9")  # nothing listens on the discard port
        assert unreachable.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as uri:
            agent.open("127.0.0.1:9", dataset=common_pb2.DatasetSpec(uri=f"file://{tmp_path}/missing.tar"))
        assert uri.value.code() == grpc.StatusCode.NOT_FOUND
        assert "missing.tar" in (uri.value.details() or "")
        assert not agent.stub.ListSessions(loadgen_agent_pb2.ListSessionsRequest()).sessions
        assert set(worker_processes()) == before
    finally:
        agent.server.stop(1.0)


def test_close_and_stop_leave_no_process(tmp_path: Path, sut: SutServer) -> None:
    before = set(worker_processes())
    agent = start_agent(tmp_path, max_sessions=2)
    try:
        first = agent.open(sut.address)
        second = agent.open(sut.address)
        with pytest.raises(grpc.RpcError) as full:
            agent.open(sut.address)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Closing a session in the middle of a test ends that test.
        events = agent.stub.RunTest(
            loadgen_agent_pb2.RunTestRequest(
                session_id=first.session_id,
                settings=short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(30)),
            ),
            timeout=60,
        )
        assert next(events).WhichOneof("event") == "started"
        agent.close(first.session_id)
        with pytest.raises(grpc.RpcError) as ended:
            collect(events)
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        assert not process_exists(first.pid)
        agent.close(first.session_id)  # again: fine
        with pytest.raises(grpc.RpcError) as unknown:
            agent.close("ls-unknown")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        listed = agent.stub.ListSessions(loadgen_agent_pb2.ListSessionsRequest()).sessions
        assert [s.session_id for s in listed] == [second.session_id]
        assert process_exists(second.pid)
    finally:
        agent.server.stop(1.0)
    assert not process_exists(second.pid)
    assert set(worker_processes()) == before
    assert not list(tmp_path.iterdir()), "session directories are removed"


def test_killed_agent_leaves_no_session_process(tmp_path: Path, sut: SutServer) -> None:
    """An agent killed with SIGKILL cannot close its sessions: each session process sees its
    command pipe close, exits, and removes the session's directory."""
    env = {**os.environ, "MECBENCH_LOADGEN_WORK_DIR": str(tmp_path), "MECBENCH_LOADGEN_WORKER_LOG_LEVEL": "warning"}
    agent_process = subprocess.Popen(
        [sys.executable, "-m", "mecbench", "loadgen-agent", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert agent_process.stdout is not None
        address = agent_process.stdout.readline().split("listening on ")[1].strip()
        channel = open_channel(address)
        stub = loadgen_agent_pb2_grpc.LoadGenAgentStub(channel)
        opened = stub.OpenSession(loadgen_agent_pb2.OpenSessionRequest(sut_address=sut.address), timeout=60).session
        assert process_exists(opened.pid) and len(list(tmp_path.iterdir())) == 1
        channel.close()
    finally:
        agent_process.kill()
        agent_process.wait(10)
    deadline = time.monotonic() + 10
    while process_exists(opened.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_exists(opened.pid)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("scenario", [common_pb2.SCENARIO_SERVER, common_pb2.SCENARIO_MULTI_STREAM])
def test_recorded_sample_latencies_reproduce_loadgens_own_percentiles(
    agent: Agent, session: loadgen_agent_pb2.Session, scenario: common_pb2.Scenario.ValueType
) -> None:
    """The latencies kept for merging (the client's clock against LoadGen's schedule, anchored
    to LoadGen's mean) reproduce LoadGen's own: pooled by LoadGen's rule, one client's give the
    figures of its summary (the mean exactly, the percentiles within microseconds), and no trace
    is written."""
    request = loadgen_agent_pb2.RunTestRequest(
        session_id=session.session_id, settings=short_settings(scenario), record_sample_latencies=True
    )
    outcome = collect(agent.stub.RunTest(request, timeout=120))
    assert "mlperf_log_trace.json" not in outcome.files
    rows = read_sample_latencies(bytes(outcome.files["sample_latencies.npy"]))
    latencies = latencies_for_scenario(rows, scenario)
    expected_count = outcome.result.query_count if scenario == common_pb2.SCENARIO_MULTI_STREAM else len(rows)
    assert len(latencies) == expected_count
    merged = latency_stats(latencies)
    summary = outcome.result.latency
    assert merged.mean == summary.mean
    for name in ("p50", "p90"):
        mine, loadgen = durations.to_ns(getattr(merged, name)), durations.to_ns(getattr(summary, name))
        assert abs(mine - loadgen) <= max(0.01 * loadgen, 30_000), (name, mine, loadgen)
    # The tail of a 2-second test is a handful of samples: one stamp preempted moves it.
    for name in ("p95", "p97", "p99", "min", "max", "p999"):
        mine, loadgen = durations.to_ns(getattr(merged, name)), durations.to_ns(getattr(summary, name))
        assert abs(mine - loadgen) <= max(0.05 * loadgen, 200_000), (name, mine, loadgen)


def test_sample_latencies_are_only_kept_when_asked(agent: Agent, session: loadgen_agent_pb2.Session) -> None:
    outcome = run_test(agent, session.session_id, short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
    assert "sample_latencies.npy" not in outcome.files and "mlperf_log_trace.json" not in outcome.files


def test_the_tcp_transport_carries_samples_and_outputs_like_grpc(agent: Agent, sut: SutServer) -> None:
    """DATA_PLANE_TRANSPORT_TCP: the same messages over plain TCP. An accuracy run gets every
    sample's output back through it, and a Server run completes every sample it issued."""
    opened = agent.open(
        sut.address,
        dataset=common_pb2.DatasetSpec(
            synthetic=common_pb2.SyntheticDataset(sample_count=64, shape=[4], data_type=common_pb2.DATA_TYPE_INT32)
        ),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(
            transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP, streams=2, max_batch_size=8
        ),
    )
    try:
        accuracy = run_test(
            agent, opened.session_id, short_settings(common_pb2.SCENARIO_OFFLINE, mode=common_pb2.TEST_MODE_ACCURACY_ONLY)
        )
        entries = json.loads(bytes(accuracy.files["mlperf_log_accuracy.json"]))
        assert sorted(e["qsl_idx"] for e in entries) == list(range(64))
        assert accuracy.finished is not None and accuracy.finished.samples_sent == 64
        server = run_test(agent, opened.session_id, short_settings(common_pb2.SCENARIO_SERVER))
        assert server.result.sample_count > 0 and server.result.error_count == 0
        assert server.finished is not None and server.finished.samples_sent == server.result.sample_count
        assert durations.to_ns(server.result.latency.p50) >= 2_000_000  # the SUT's 2 ms
    finally:
        agent.close(opened.session_id)


def test_a_sut_agent_without_a_tcp_data_plane_fails_the_test_saying_so(agent: Agent) -> None:
    grpc_only = start_sut(0.001, SutAgentSettings(tcp_data_plane=False))
    try:
        opened = agent.open(
            grpc_only.address,
            data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP),
        )
        try:
            with pytest.raises(grpc.RpcError) as caught:
                run_test(agent, opened.session_id, short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "offers no TCP data plane" in (caught.value.details() or "")
        finally:
            agent.close(opened.session_id)
    finally:
        grpc_only.stop()


def test_the_default_transport_is_tcp_where_offered_and_grpc_elsewhere(agent: Agent) -> None:
    for offers_tcp in (True, False):
        manager = BackendManager(SutAgentSettings(tcp_data_plane=offers_tcp))
        running, port = create_sut_server("127.0.0.1:0", SutAgentSettings(tcp_data_plane=offers_tcp), manager)
        try:
            manager.start(sut_agent_pb2.SutConfig(synthetic=sut_agent_pb2.SyntheticBackendConfig()), restart=False)
            opened = agent.open(f"127.0.0.1:{port}")  # transport left unspecified
            try:
                outcome = run_test(agent, opened.session_id, short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
                assert outcome.result.sample_count > 0
            finally:
                agent.close(opened.session_id)
            accepted = manager.tcp_data_plane.accepted if manager.tcp_data_plane else 0
            assert (accepted > 0) == offers_tcp
        finally:
            running.stop(grace=0.5)
