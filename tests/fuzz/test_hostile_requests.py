"""Every RPC of every service, fed arbitrary and hostile messages (hypothesis, from the message
descriptors): no crash, no traceback leaked to the client, a fitting status code, and the
service still serving afterwards. The counts of inputs tried are printed at the end."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from mecbench.core.channels import open_channel
from mecbench.v1 import controller_pb2, loadgen_agent_pb2, node_agent_pb2, sut_agent_pb2, sut_agent_pb2_grpc
from tests.controller.conftest import start_stack, stop_stack
from tests.fuzz.messages import messages
from tests.numbers import report

pytestmark = pytest.mark.slow

# What a bad request may get: a refusal naming the problem, or the outcome of doing it.
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
LEAKS = ("Traceback", 'File "', "Exception:", "Error(")
CALL_TIMEOUT_S = 20.0
EXAMPLES = 30
TRIED: collections.Counter[str] = collections.Counter()


def call(channel: grpc.Channel, method: MethodDescriptor, request: Message) -> grpc.StatusCode:
    """One call of any shape; streams send the request twice and read a few answers."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_type = message_factory.GetMessageClass(method.output_type)
    serialize = type(request).SerializeToString
    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(path, serialize, response_type.FromString)(request, timeout=CALL_TIMEOUT_S)
        elif not method.client_streaming:
            answers = channel.unary_stream(path, serialize, response_type.FromString)(request, timeout=CALL_TIMEOUT_S)
            for _ in itertools.islice(answers, 5):
                pass
            answers.cancel()
        elif not method.server_streaming:
            channel.stream_unary(path, serialize, response_type.FromString)(
                iter([request, request]), timeout=CALL_TIMEOUT_S
            )
        else:
            answers = channel.stream_stream(path, serialize, response_type.FromString)(
                iter([request, request]), timeout=CALL_TIMEOUT_S
            )
            for _ in itertools.islice(answers, 5):
                pass
            answers.cancel()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        details = exc.details() or ""
        assert code not in FORBIDDEN, f"{method.name}: {code.name}: {details}\nrequest: {request}"
        assert not any(leak in details for leak in LEAKS), f"{method.name} leaked: {details}"
        return code
    return grpc.StatusCode.OK


def still_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def fuzz_method(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=messages(method.input_type))
    def check(request: Message) -> None:
        code = call(channel, method, request)
        TRIED[f"{service.name}/{method.name} {code.name}"] += 1

    check()


def fuzz_service(
    channel: grpc.Channel, service: ServiceDescriptor, before: dict[str, Callable[[], object]] | None = None
) -> None:
    """Every method in turn; `before` readies the service for a method (a backend to serve)."""
    for method in service.methods:
        if before and method.name in before:
            before[method.name]()
        fuzz_method(channel, service, method)
        still_serving(channel)


@pytest.fixture(scope="module", autouse=True)
def report_what_was_tried() -> Iterator[None]:
    yield
    total = sum(TRIED.values())
    report("bad inputs", f"{total} hostile requests tried, none answered INTERNAL or with a traceback")
    for key, count in sorted(TRIED.items()):
        report("bad inputs", f"{key}: {count}")


def test_sut_agent_survives_hostile_requests(tmp_path: Path) -> None:
    from sut_agent.server import create_server
    from sut_agent.settings import SutAgentSettings

    settings_ = SutAgentSettings.load(max_workers=32, server_log_dir=tmp_path, model_dir=tmp_path)
    server, port = create_server("127.0.0.1:0", settings_)
    channel = open_channel(f"127.0.0.1:{port}")
    stub = sut_agent_pb2_grpc.SutAgentStub(channel)
    zero_time = sut_agent_pb2.SutConfig(synthetic=sut_agent_pb2.SyntheticBackendConfig(
        distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT))

    def serve() -> object:
        return stub.Start(sut_agent_pb2.StartRequest(config=zero_time, restart=True), timeout=10)

    try:
        fuzz_service(channel, sut_agent_pb2.DESCRIPTOR.services_by_name["SutAgent"],
                     {"StreamInfer": serve, "Infer": serve})
    finally:
        channel.close()
        server.stop(1)


def test_loadgen_agent_survives_hostile_requests(tmp_path: Path) -> None:
    from tests.loadgen_agent.conftest import start_agent

    agent = start_agent(tmp_path, open_timeout_s=10.0, sut_connect_timeout_s=2.0)
    try:
        fuzz_service(agent.channel, loadgen_agent_pb2.DESCRIPTOR.services_by_name["LoadGenAgent"])
    finally:
        agent.channel.close()
        agent.server.stop(1)


def test_controller_survives_hostile_requests(tmp_path: Path) -> None:
    stack = start_stack(tmp_path)
    try:
        fuzz_service(stack.channel, controller_pb2.DESCRIPTOR.services_by_name["Controller"])
    finally:
        stop_stack(stack)




def test_node_agent_survives_hostile_requests(tmp_path: Path) -> None:
    """The agent that holds NET_ADMIN: whatever arrives, its allowlists and validation answer, and
    nothing of the host's is shaped (its interfaces are checked before and after)."""
    from pyroute2 import IPRoute

    from node_agent.agent import NodeAgent
    from node_agent.gpus import StaticInventory
    from node_agent.server import create_server
    from node_agent.settings import NodeAgentSettings
    from tests.node_agent.conftest import DECLARED_GPUS

    def host_qdiscs() -> list[tuple[int, str, int]]:
        with IPRoute() as ipr:
            return sorted((q["index"], q.get_attr("TCA_KIND"), q["parent"]) for q in ipr.get_qdiscs())

    before = host_qdiscs()
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", reaper_interval_s=0.1)
    agent = NodeAgent(settings, gpu_inventory=StaticInventory(list(DECLARED_GPUS)))
    running, _port = create_server("127.0.0.1:0", settings, agent)
    channel = open_channel(running.address)
    try:
        fuzz_service(channel, node_agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"])
    finally:
        channel.close()
        running.stop(grace=1)
    assert host_qdiscs() == before
