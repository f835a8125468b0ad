"""The SUT agent's server: lifecycle, streams, errors, health and reflection, on a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mecbench.core import durations
from mecbench.v1 import sut_agent_pb2
from tests.conftest import field_violations
from tests.sut_agent.conftest import Agent, synthetic


def _requests(
    batches: list[list[int]], hold: threading.Event | None = None
) -> Iterator[sut_agent_pb2.StreamInferRequest]:
    for ids in batches:
        yield sut_agent_pb2.StreamInferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=ids, sample_indices=ids))
    if hold is not None:
        hold.wait(10)  # keeps the stream half-open until the test lets go



def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def status(agent: Agent) -> sut_agent_pb2.SutStatus:
    reply: sut_agent_pb2.GetStatusResponse = agent.stub.GetStatus(sut_agent_pb2.GetStatusRequest())
    return reply.status


def test_stream_answers_every_sample_with_its_id(agent: Agent) -> None:
    agent.start(synthetic(0.0))
    batches = [list(range(start, start + 100)) for start in range(0, 10_000, 100)]
    answered: list[int] = []
    messages = 0
    for response in agent.stub.StreamInfer(_requests(batches), timeout=60):
        batch = response.batch
        assert len(batch.queue_us) == len(batch.compute_us) == len(batch.sample_ids)
        answered += batch.sample_ids
        messages += 1
    assert sorted(answered) == list(range(10_000))
    assert messages <= len(batches)
    assert agent.stats().samples_completed == 10_000
    assert status(agent).in_flight == 0


def test_several_streams_at_once(agent: Agent) -> None:
    agent.start(synthetic(0.001, max_concurrency=4))
    results: dict[int, list[int]] = {}

    def run(stream: int) -> None:
        batches = [list(range(stream * 1000 + b * 10, stream * 1000 + b * 10 + 10)) for b in range(20)]
        got: list[int] = []
        for response in agent.stub.StreamInfer(_requests(batches), timeout=60):
            got += response.batch.sample_ids
        results[stream] = got

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for stream in range(4):
        assert sorted(results[stream]) == list(range(stream * 1000, stream * 1000 + 200))


def test_status_reports_in_flight_and_open_streams(agent: Agent) -> None:
    agent.start(synthetic(0.3))
    hold = threading.Event()
    call = agent.stub.StreamInfer(_requests([[1, 2, 3]], hold), timeout=30)
    try:
        wait_for(lambda: status(agent).open_streams == 1 and status(agent).in_flight == 3)
        hold.set()
        assert sorted(next(call).batch.sample_ids) == [1, 2, 3]
    finally:
        hold.set()
        call.cancel()
    wait_for(lambda: status(agent).open_streams == 0 and status(agent).in_flight == 0)


def test_cancelled_stream_ends_cleanly(agent: Agent) -> None:
    agent.start(synthetic(0.5))
    hold = threading.Event()
    call = agent.stub.StreamInfer(_requests([[1], [2]], hold), timeout=30)
    wait_for(lambda: status(agent).in_flight == 2)
    call.cancel()
    hold.set()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: status(agent).open_streams == 0)
    wait_for(lambda: status(agent).in_flight == 0)  # the samples still finish in the backend
    agent.start(synthetic(0.0))
    assert list(agent.infer([9]).sample_ids) == [9]


def test_start_semantics_and_idempotent_stop(agent: Agent) -> None:
    first = synthetic(0.001)
    assert agent.start(first).state == sut_agent_pb2.BACKEND_STATE_READY
    started_at = status(agent).started_at
    same = agent.start(first, restart=False)  # the same config: nothing restarts
    assert same.state == sut_agent_pb2.BACKEND_STATE_READY and same.started_at == started_at
    with pytest.raises(grpc.RpcError) as info:
        agent.start(synthetic(0.002), restart=False)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert status(agent).config == first
    replaced = agent.start(synthetic(0.002), restart=True)
    assert durations.to_ns(replaced.config.synthetic.mean) == 2_000_000
    for _ in range(2):
        reply: sut_agent_pb2.StopResponse = agent.stub.Stop(sut_agent_pb2.StopRequest())
        assert reply.status.state == sut_agent_pb2.BACKEND_STATE_STOPPED
    assert agent.start(first, restart=False).state == sut_agent_pb2.BACKEND_STATE_READY


def test_data_plane_needs_a_ready_backend(agent: Agent) -> None:
    agent.stub.Stop(sut_agent_pb2.StopRequest())
    with pytest.raises(grpc.RpcError) as info:
        agent.infer([1])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        list(agent.stub.StreamInfer(_requests([[1]]), timeout=10))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_stop_fails_samples_in_flight(agent: Agent) -> None:
    agent.start(synthetic(5.0, max_concurrency=1))
    replies: list[sut_agent_pb2.ResponseBatch] = []
    thread = threading.Thread(target=lambda: replies.append(agent.infer([1, 2])))
    thread.start()
    wait_for(lambda: status(agent).in_flight == 2)
    agent.stub.Stop(sut_agent_pb2.StopRequest())
    thread.join(10)
    assert sorted(replies[0].sample_ids) == [1, 2]
    assert list(replies[0].errors) == ["backend stopped", "backend stopped"]
    assert status(agent).in_flight == 0


def test_bad_config_reports_every_field_and_starts_nothing(agent: Agent) -> None:
    agent.stub.Stop(sut_agent_pb2.StopRequest())
    bad = sut_agent_pb2.SutConfig(
        synthetic=sut_agent_pb2.SyntheticBackendConfig(
            distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_UNIFORM,
            mean=durations.from_seconds(-0.001),
            stddev=durations.from_seconds(-0.001),
            low=durations.from_seconds(0.003),
            high=durations.from_seconds(0.001),
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        agent.start(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(info.value)) == ["config.synthetic.mean", "config.synthetic.stddev", "config.synthetic.low"]
    assert status(agent).state == sut_agent_pb2.BACKEND_STATE_STOPPED

    with pytest.raises(grpc.RpcError) as info:
        agent.start(sut_agent_pb2.SutConfig())
    assert list(field_violations(info.value)) == ["config.backend"]

    # A running backend survives a restart with a bad config.
    agent.start(synthetic(0.001))
    with pytest.raises(grpc.RpcError) as info:
        agent.start(bad, restart=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status(agent).state == sut_agent_pb2.BACKEND_STATE_READY
    assert list(agent.infer([4]).sample_ids) == [4]


def test_external_backend_over_grpc_names_bad_fields_and_unreachable_servers(agent: Agent) -> None:
    agent.stub.Stop(sut_agent_pb2.StopRequest())
    with pytest.raises(grpc.RpcError) as info:
        agent.start(sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(server_type="openai")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"config.external.endpoint", "config.external.model"} <= set(field_violations(info.value))
    assert status(agent).state == sut_agent_pb2.BACKEND_STATE_STOPPED
    # Nothing listens on port 1: preparing the model fails, and the status says why.
    unreachable = sut_agent_pb2.ExternalBackendConfig(server_type="openai", endpoint="127.0.0.1:1", model="m")
    with pytest.raises(grpc.RpcError) as info:
        agent.start(sut_agent_pb2.SutConfig(external=unreachable))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "127.0.0.1:1" in (info.value.details() or "")
    assert status(agent).state == sut_agent_pb2.BACKEND_STATE_FAILED
    assert "127.0.0.1:1" in status(agent).message
    # No server was started by this agent: its log is empty, and reading it streams nothing.
    assert list(agent.stub.GetServerLog(sut_agent_pb2.GetServerLogRequest())) == []


def test_mismatched_batch_arrays_are_invalid(agent: Agent) -> None:
    agent.start(synthetic(0.0))
    batch = sut_agent_pb2.QueryBatch(sample_ids=[1, 2], payloads=[b"x"])
    with pytest.raises(grpc.RpcError) as info:
        agent.stub.Infer(sut_agent_pb2.InferRequest(batch=batch), timeout=10)
    assert list(field_violations(info.value)) == ["batch.payloads"]


def test_health_and_reflection_answer(agent: Agent) -> None:
    health = health_pb2_grpc.HealthStub(agent.channel)
    for service in ("", "mecbench.v1.SutAgent"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(agent.channel)
    answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "mecbench.v1.SutAgent" in names


def test_stream_fails_when_the_backend_stops_under_it(agent: Agent) -> None:
    agent.start(synthetic(0.0))
    proceed = threading.Event()

    def requests() -> Iterator[sut_agent_pb2.StreamInferRequest]:
        yield sut_agent_pb2.StreamInferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=[1, 2]))
        proceed.wait(10)
        yield sut_agent_pb2.StreamInferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=[3]))

    call = agent.stub.StreamInfer(requests(), timeout=30)
    assert sorted(next(call).batch.sample_ids) == [1, 2]
    agent.stub.Stop(sut_agent_pb2.StopRequest())
    proceed.set()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_infer_without_a_deadline(agent: Agent) -> None:
    agent.start(synthetic(0.001))
    reply: sut_agent_pb2.InferResponse = agent.stub.Infer(
        sut_agent_pb2.InferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=[1, 2]))
    )
    assert sorted(reply.batch.sample_ids) == [1, 2]
