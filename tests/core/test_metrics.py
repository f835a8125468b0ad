"""Prometheus /metrics on every service: real servers on loopback, real RPCs, a real scrape over
HTTP parsed by prometheus_client's own parser."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import IPRoute, netns

from controller.app import ControllerApp
from controller.server import create_server as create_controller
from controller.settings import ControllerSettings
from loadgen_agent.server import create_server as create_loadgen
from loadgen_agent.settings import LoadGenAgentSettings
from mecbench.core.channels import open_channel
from mecbench.core.server import build_server
from mecbench.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    loadgen_agent_pb2,
    loadgen_agent_pb2_grpc,
    node_agent_pb2,
    node_agent_pb2_grpc,
    sut_agent_pb2,
    sut_agent_pb2_grpc,
)
from node_agent.agent import NodeAgent
from node_agent.gpus import StaticInventory
from node_agent.server import create_server as create_node_agent
from node_agent.settings import NodeAgentSettings
from sut_agent.server import create_server as create_sut
from sut_agent.settings import SutAgentSettings
from tests.conftest import requires_root
from tests.controller.conftest import short_settings as controller_short_settings
from tests.controller.conftest import synthetic_sut
from tests.loadgen_agent.conftest import agent_settings, collect, start_sut
from tests.loadgen_agent.conftest import short_settings as loadgen_short_settings

SETTINGS = [
    (ControllerSettings, "MECBENCH_CONTROLLER_METRICS_PORT"),
    (LoadGenAgentSettings, "MECBENCH_LOADGEN_METRICS_PORT"),
    (NodeAgentSettings, "MECBENCH_NODE_AGENT_METRICS_PORT"),
    (SutAgentSettings, "MECBENCH_SUT_METRICS_PORT"),
]


class Scrape:
    """One scrape of a /metrics endpoint."""

    def __init__(self, port: int | None) -> None:
        assert port is not None, "metrics are off"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            self.families: dict[str, Metric] = {f.name: f for f in text_string_to_metric_families(response.read().decode())}

    def samples(self, name: str, **labels: str) -> list[float]:
        """Values of the samples named `name` whose labels include `labels`."""
        family = name.removesuffix("_total").removesuffix("_count").removesuffix("_bucket")
        found = self.families.get(family)
        if found is None:
            return []
        return [s.value for s in found.samples if s.name == name and labels.items() <= s.labels.items()]

    def value(self, name: str, **labels: str) -> float:
        """The one sample named `name` with `labels` (AssertionError when not exactly one)."""
        values = self.samples(name, **labels)
        assert len(values) == 1, f"{name}{labels}: {values}"
        return values[0]


def refused(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).close()
    except urllib.error.URLError:
        return True
    return False


def rpc_count(scrape: Scrape, service: str, method: str, code: str) -> float:
    """Calls counted by both the counter and the histogram (which must agree)."""
    labels = {"service": f"mecbench.v1.{service}", "method": method, "code": code}
    total = sum(scrape.samples("mecbench_rpc_total", **labels))
    assert sum(scrape.samples("mecbench_rpc_duration_seconds_count", **labels)) == total
    return total


def code_of(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError)
    code = call.code()
    assert isinstance(code, grpc.StatusCode)
    return code


# --- settings and the endpoint itself ----------------------------------------------------------------


@pytest.mark.parametrize(("cls", "variable"), SETTINGS, ids=[v for _, v in SETTINGS])
def test_metrics_port_is_off_by_default_and_set_from_the_environment(
    cls: type, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(variable, raising=False)
    assert cls.load().metrics_port == -1  # type: ignore[attr-defined]
    monkeypatch.setenv(variable, "9464")
    assert cls.load().metrics_port == 9464  # type: ignore[attr-defined]


def test_metrics_off_keeps_and_binds_nothing() -> None:
    running = build_server("127.0.0.1:0", lambda server: None, [])
    try:
        assert running.metrics_port is None and running.metrics_registry is None
    finally:
        running.stop(0)


class BrokenCollector:
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("the state this collector reads is gone")


def test_a_failing_collector_costs_its_own_metrics_not_the_scrape_and_stop_closes_the_endpoint() -> None:
    running = build_server("127.0.0.1:0", lambda server: None, [], metrics_port=0, collectors=[BrokenCollector()])
    port = running.metrics_port
    assert port
    with open_channel(running.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    labels = {"service": "grpc.health.v1.Health", "method": "Check", "code": "OK"}
    assert Scrape(port).value("mecbench_rpc_total", **labels) == 1
    running.stop(0)
    assert refused(port)


def test_a_taken_metrics_port_fails_the_start_and_frees_the_grpc_port() -> None:
    first = build_server("127.0.0.1:0", lambda server: None, [], metrics_port=0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    try:
        with pytest.raises(OSError, match="metrics endpoint"):
            build_server(f"127.0.0.1:{grpc_port}", lambda server: None, [], metrics_port=first.metrics_port or -1)
        # Bound again at once: the failed start did not keep it.
        build_server(f"127.0.0.1:{grpc_port}", lambda server: None, []).stop(0)
    finally:
        first.stop(0)


def test_a_stream_its_caller_cancels_is_counted_as_cancelled() -> None:
    running = build_server("127.0.0.1:0", lambda server: None, [], metrics_port=0)
    try:
        with open_channel(running.address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            next(call)  # the stream is open and stays open: Watch ends only when its caller leaves
            call.cancel()
        labels = {"service": "grpc.health.v1.Health", "method": "Watch"}
        deadline = time.monotonic() + 10
        while not Scrape(running.metrics_port).samples("mecbench_rpc_total", code="CANCELLED", **labels):
            assert time.monotonic() < deadline, "the cancelled stream was never counted"
            time.sleep(0.05)
        assert Scrape(running.metrics_port).samples("mecbench_rpc_total", code="OK", **labels) == []
    finally:
        running.stop(0)


# --- the SUT agent ----------------------------------------------------------------------------------


def test_sut_agent_reports_rpcs_samples_and_backend_state() -> None:
    running, port = create_sut("127.0.0.1:0", SutAgentSettings.load(max_workers=16, metrics_port=0))
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = sut_agent_pb2_grpc.SutAgentStub(channel)
        before = Scrape(running.metrics_port)
        assert before.value("mecbench_sut_backend_state", state="STOPPED") == 1
        assert before.value("mecbench_sut_backend_state", state="READY") == 0
        assert before.value("mecbench_sut_samples_completed_total") == 0
        assert before.samples("mecbench_sut_backend") == []

        with pytest.raises(grpc.RpcError) as refused_infer:  # no backend yet
            stub.Infer(sut_agent_pb2.InferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=[1], sample_indices=[0])))
        assert code_of(refused_infer.value) == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as bad_start:
            stub.Start(sut_agent_pb2.StartRequest(config=sut_agent_pb2.SutConfig()), timeout=30)
        assert code_of(bad_start.value) == grpc.StatusCode.INVALID_ARGUMENT
        stub.Start(sut_agent_pb2.StartRequest(config=synthetic_sut(0.001)), timeout=30)
        for first in range(0, 30, 10):
            ids = list(range(first, first + 10))
            stub.Infer(sut_agent_pb2.InferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=ids, sample_indices=ids)))
        stub.GetStats(sut_agent_pb2.GetStatsRequest(reset=True))

        after = Scrape(running.metrics_port)
        assert rpc_count(after, "SutAgent", "Infer", "OK") == 3
        assert rpc_count(after, "SutAgent", "Infer", "FAILED_PRECONDITION") == 1
        assert rpc_count(after, "SutAgent", "Start", "INVALID_ARGUMENT") == 1
        assert rpc_count(after, "SutAgent", "Start", "OK") == 1
        # GetStats(reset) zeroes what GetStats reports; the counter goes on.
        assert after.value("mecbench_sut_samples_completed_total") == 30
        assert after.value("mecbench_sut_samples_failed_total") == 0
        assert after.value("mecbench_sut_in_flight") == 0
        assert after.value("mecbench_sut_backend_state", state="READY") == 1
        assert after.value("mecbench_sut_backend", backend="synthetic") == 1
        assert after.value("mecbench_sut_backend_state", state="STOPPED") == 0
        # A 1 ms service time lands each Infer in the 1-2.5 ms bucket or above, never below 1 ms.
        labels = {"service": "mecbench.v1.SutAgent", "method": "Infer", "code": "OK"}
        assert after.value("mecbench_rpc_duration_seconds_bucket", le="0.001", **labels) == 0
        assert after.value("mecbench_rpc_duration_seconds_bucket", le="+Inf", **labels) == 3
    finally:
        channel.close()
        running.stop(1)


# --- the controller --------------------------------------------------------------------------------


def test_controller_reports_runs_by_state_and_its_rpcs(tmp_path: Path) -> None:
    settings = ControllerSettings.load(data_dir=tmp_path, metrics_port=0, telemetry_interval_s=0.0)
    app = ControllerApp(settings)
    running, port = create_controller("127.0.0.1:0", settings, app=app)
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = controller_pb2_grpc.ControllerStub(channel)
        empty = Scrape(running.metrics_port)
        assert empty.value("mecbench_runs", state="SUCCEEDED") == 0
        assert empty.value("mecbench_experiments", state="RUNNING") == 0
        assert empty.value("mecbench_spool_pending_objects") == 0

        stub.ListRuns(controller_pb2.ListRunsRequest())
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetRun(controller_pb2.GetRunRequest(run_id="run-nope"))
        assert code_of(missing.value) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as bad:
            stub.StartRun(controller_pb2.StartRunRequest(spec=controller_pb2.RunSpec(experiment_id="metrics")))
        assert code_of(bad.value) == grpc.StatusCode.INVALID_ARGUMENT

        stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="sut-1ms", config=synthetic_sut(0.001)), timeout=60)
        spec = controller_pb2.RunSpec(
            experiment_id="metrics", sut_id="sut-1ms",
            settings=controller_short_settings(common_pb2.SCENARIO_SINGLE_STREAM),
        )
        run = stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
        events = list(stub.WatchRun(controller_pb2.WatchRunRequest(run_id=run.run_id), timeout=60))
        assert events[-1].state == common_pb2.RUN_STATE_SUCCEEDED, events[-1].run.error

        after = Scrape(running.metrics_port)
        assert after.value("mecbench_runs", state="SUCCEEDED") >= 1
        assert after.value("mecbench_runs", state="RUNNING") == 0
        assert rpc_count(after, "Controller", "ListRuns", "OK") == 1
        assert rpc_count(after, "Controller", "GetRun", "NOT_FOUND") == 1
        assert rpc_count(after, "Controller", "StartRun", "INVALID_ARGUMENT") == 1
        assert rpc_count(after, "Controller", "StartRun", "OK") == 1
        # A stream is one call, observed when it ends: after the run's seconds, not at its start.
        assert rpc_count(after, "Controller", "WatchRun", "OK") == 1
        watch = {"service": "mecbench.v1.Controller", "method": "WatchRun", "code": "OK"}
        assert after.value("mecbench_rpc_duration_seconds_bucket", le="0.5", **watch) == 0
    finally:
        channel.close()
        running.stop(1)
    # Stopping the controller closes its endpoint, before the registry the collector reads.
    assert running.metrics_port is not None and refused(running.metrics_port)


# --- the LoadGen agent -----------------------------------------------------------------------------


def test_loadgen_agent_reports_live_qps_and_samples_per_session(tmp_path: Path) -> None:
    sut = start_sut(0.002)
    running, port = create_loadgen("127.0.0.1:0", agent_settings(tmp_path, metrics_port=0))
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = loadgen_agent_pb2_grpc.LoadGenAgentStub(channel)
        session = stub.OpenSession(
            loadgen_agent_pb2.OpenSessionRequest(sut_address=sut.address, owner="run-metrics"), timeout=60
        ).session
        labels = {"session": session.session_id, "owner": "run-metrics"}
        opened = Scrape(running.metrics_port)
        assert opened.value("mecbench_loadgen_sessions_open") == 1
        assert opened.value("mecbench_loadgen_sessions", state="IDLE") == 1
        assert opened.value("mecbench_loadgen_live_qps", **labels) == 0

        live: list[float] = []

        def on_event(kind: str) -> None:
            if kind == "progress":
                live.append(Scrape(running.metrics_port).value("mecbench_loadgen_live_qps", **labels))

        settings = loadgen_short_settings(common_pb2.SCENARIO_SERVER)
        request = loadgen_agent_pb2.RunTestRequest(session_id=session.session_id, settings=settings)
        outcome = collect(stub.RunTest(request, timeout=120), on_event)
        assert outcome.finished is not None and outcome.progress
        # The server scenario asks for 200 QPS: while it ran the gauge read about that.
        assert max(live) > 100, live

        done = Scrape(running.metrics_port)
        assert done.value("mecbench_loadgen_samples_completed_total", **labels) == outcome.finished.samples_sent > 0
        assert done.value("mecbench_loadgen_live_qps", **labels) == 0
        assert rpc_count(done, "LoadGenAgent", "RunTest", "OK") == 1
        assert rpc_count(done, "LoadGenAgent", "OpenSession", "OK") == 1

        stub.CloseSession(loadgen_agent_pb2.CloseSessionRequest(session_id=session.session_id))
        with pytest.raises(grpc.RpcError) as unknown:
            stub.CloseSession(loadgen_agent_pb2.CloseSessionRequest(session_id="ls-nope"))
        assert code_of(unknown.value) == grpc.StatusCode.NOT_FOUND
        closed = Scrape(running.metrics_port)
        assert closed.value("mecbench_loadgen_sessions_open") == 0
        assert closed.samples("mecbench_loadgen_live_qps", **labels) == []
        assert rpc_count(closed, "LoadGenAgent", "CloseSession", "NOT_FOUND") == 1
    finally:
        channel.close()
        running.stop(1)
        sut.stop()


# --- the node agent --------------------------------------------------------------------------------


@pytest.fixture
def node_agent(tmp_path: Path) -> Iterator[tuple[node_agent_pb2_grpc.NodeAgentStub, int | None]]:
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", metrics_port=0)
    agent = NodeAgent(settings, gpu_inventory=StaticInventory([]))
    running, port = create_node_agent("127.0.0.1:0", settings, agent)
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield node_agent_pb2_grpc.NodeAgentStub(channel), running.metrics_port
    finally:
        channel.close()
        running.stop(1)


def test_node_agent_reports_its_rpcs_and_no_shaping_when_none_is_installed(
    node_agent: tuple[node_agent_pb2_grpc.NodeAgentStub, int | None],
) -> None:
    stub, metrics_port = node_agent
    stub.GetNodeInfo(node_agent_pb2.GetNodeInfoRequest(), timeout=30)
    with pytest.raises(grpc.RpcError) as bad:
        stub.ApplyShaping(node_agent_pb2.ApplyShapingRequest(), timeout=30)
    assert code_of(bad.value) == grpc.StatusCode.INVALID_ARGUMENT
    scrape = Scrape(metrics_port)
    assert rpc_count(scrape, "NodeAgent", "GetNodeInfo", "OK") == 1
    assert rpc_count(scrape, "NodeAgent", "ApplyShaping", "INVALID_ARGUMENT") == 1
    assert scrape.samples("mecbench_shaping_active") == []
    assert scrape.value("mecbench_shaping_leases") == 0
    assert scrape.value("mecbench_gpus_allocated") == 0


@pytest.fixture
def veth_netns() -> Iterator[str]:
    """A fresh named namespace holding an up veth pair, `mbm0` and `mbm1`."""
    name = f"mbm-{uuid.uuid4().hex[:6]}"
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="mbm0", kind="veth", peer="mbm1")
            for interface in ("mbm0", "mbm1"):
                ipr.link("set", index=ipr.link_lookup(ifname=interface)[0], state="up")
        yield name
    finally:
        with contextlib.suppress(OSError):
            netns.remove(name)


@requires_root
def test_node_agent_reports_active_shaping_until_it_is_cleared(
    node_agent: tuple[node_agent_pb2_grpc.NodeAgentStub, int | None], veth_netns: str
) -> None:
    stub, metrics_port = node_agent
    target = node_agent_pb2.ShapingTarget(interface="mbm0", netns_name=veth_netns)
    shaping = stub.ApplyShaping(
        node_agent_pb2.ApplyShapingRequest(
            target=target, direction=common_pb2.DIRECTION_EGRESS, netem=common_pb2.NetemConfig(rate_bps=10_000_000),
            owner="run-metrics", lease_duration=Duration(seconds=60),
        ),
        timeout=30,
    ).shaping
    shaped = Scrape(metrics_port)
    assert shaped.value("mecbench_shaping_active", interface="mbm0", netns=veth_netns, direction="egress") == 1
    assert shaped.samples("mecbench_shaping_active", direction="ingress") == []
    assert shaped.value("mecbench_shaping_leases") == 1

    stub.ClearShaping(node_agent_pb2.ClearShapingRequest(shaping_id=shaping.shaping_id), timeout=30)
    cleared = Scrape(metrics_port)
    assert cleared.samples("mecbench_shaping_active") == []
    assert rpc_count(cleared, "NodeAgent", "ClearShaping", "OK") == 1
