"""Shaping through the NodeAgent gRPC API on real qdiscs in real namespaces, measured by TCP
throughput; leases, reconcile after kill -9, and bad input that must touch nothing."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, node_agent_pb2, node_agent_pb2_grpc
from node_agent.probe import probe_kernel
from tests.conftest import requires_root, start_service_process
from tests.node_agent.conftest import (
    AgentUnderTest,
    VethPair,
    error_code,
    measure_throughput,
    qdisc_kinds,
    target,
)

pytestmark = requires_root

UNSHAPED_FLOOR_BPS = 300e6  # a veth pair carries gigabits; anything near the shaped rates is shaping left behind


def apply(
    agent: AgentUnderTest,
    shaping_target: node_agent_pb2.ShapingTarget,
    rate_bps: int,
    direction: int = common_pb2.DIRECTION_EGRESS,
    lease_s: int = 60,
    owner: str = "run-test",
    replace: bool = False,
) -> node_agent_pb2.Shaping:
    reply = agent.stub.ApplyShaping(
        node_agent_pb2.ApplyShapingRequest(
            target=shaping_target,
            direction=direction,  # type: ignore[arg-type]
            netem=common_pb2.NetemConfig(rate_bps=rate_bps),
            owner=owner,
            lease_duration=Duration(seconds=lease_s),
            replace=replace,
        ),
        timeout=30,
    )
    return reply.shaping


@pytest.mark.parametrize("rate_bps", [10_000_000, 50_000_000])
def test_egress_rate_limit_is_measured_within_ten_percent(
    node_agent: AgentUnderTest, veth_pair: VethPair, rate_bps: int
) -> None:
    shaping = apply(node_agent, target(veth_pair.left, veth_pair.left_if), rate_bps)
    # What the kernel reads back, not what was asked.
    (root,) = [q for q in shaping.qdiscs if q.parent == "root"]
    assert root.kind == "tbf" and root.params["rate_bps"] == str(rate_bps) and root.owned
    measured = measure_throughput(veth_pair)
    assert abs(measured - rate_bps) / rate_bps < 0.10, f"measured {measured / 1e6:.2f} Mbit/s"

    cleared = node_agent.stub.ClearShaping(node_agent_pb2.ClearShapingRequest(shaping_id=shaping.shaping_id))
    assert list(cleared.cleared_shaping_ids) == [shaping.shaping_id]
    assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
    assert measure_throughput(veth_pair, seconds=1.0, warmup=0.2) > UNSHAPED_FLOOR_BPS


def test_ingress_rate_limit_goes_through_an_ifb_and_is_removed_with_it(
    node_agent: AgentUnderTest, veth_pair: VethPair
) -> None:
    rate_bps = 10_000_000
    shaping = apply(node_agent, target(veth_pair.right, veth_pair.right_if), rate_bps, common_pb2.DIRECTION_INGRESS)
    assert shaping.ifb_interface.startswith("mbifb")
    kinds = {(q.interface, q.kind) for q in shaping.qdiscs}
    assert kinds == {(veth_pair.right_if, "ingress"), (shaping.ifb_interface, "tbf")}
    measured = measure_throughput(veth_pair)
    assert abs(measured - rate_bps) / rate_bps < 0.10, f"measured {measured / 1e6:.2f} Mbit/s"

    node_agent.stub.ClearShaping(node_agent_pb2.ClearShapingRequest(owner="run-test"))
    assert qdisc_kinds(veth_pair.right, veth_pair.right_if) == ["noqueue"]
    assert qdisc_kinds(veth_pair.right, shaping.ifb_interface) == []  # the ifb device is gone too
    assert measure_throughput(veth_pair, seconds=1.0, warmup=0.2) > UNSHAPED_FLOOR_BPS


def test_clear_is_idempotent_and_replace_is_explicit(node_agent: AgentUnderTest, veth_pair: VethPair) -> None:
    where = target(veth_pair.left, veth_pair.left_if)
    first = apply(node_agent, where, 10_000_000)
    with pytest.raises(grpc.RpcError) as refused:
        apply(node_agent, where, 20_000_000, owner="run-other")
    assert error_code(refused.value) == grpc.StatusCode.ALREADY_EXISTS
    assert first.shaping_id in (refused.value.details() or "")
    second = apply(node_agent, where, 20_000_000, owner="run-other", replace=True)
    listed = node_agent.stub.ListShaping(node_agent_pb2.ListShapingRequest())
    assert [s.shaping_id for s in listed.shapings] == [second.shaping_id]
    assert listed.shapings[0].qdiscs[0].params["rate_bps"] == "20000000"
    for _ in range(2):
        node_agent.stub.ClearShaping(node_agent_pb2.ClearShapingRequest(target=where))
    assert node_agent.stub.ClearShaping(node_agent_pb2.ClearShapingRequest(owner="nobody")).cleared_shaping_ids == []
    assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]


def test_a_lapsed_lease_removes_the_shaping_within_a_second(node_agent: AgentUnderTest, veth_pair: VethPair) -> None:
    shaping = apply(node_agent, target(veth_pair.left, veth_pair.left_if), 10_000_000, lease_s=1)
    expires_at = shaping.lease.expires_at.ToNanoseconds() / 1e9
    renewed = node_agent.stub.RenewLease(
        node_agent_pb2.RenewLeaseRequest(lease_id=shaping.lease.lease_id, lease_duration=Duration(seconds=1))
    )
    expires_at = renewed.lease.expires_at.ToNanoseconds() / 1e9
    while qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["tbf"]:
        assert time.time() < expires_at + 1.0, "shaping outlived its lease by more than a second"
        time.sleep(0.02)
    assert time.time() >= expires_at
    assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
    with pytest.raises(grpc.RpcError) as lapsed:
        node_agent.stub.RenewLease(node_agent_pb2.RenewLeaseRequest(lease_id=shaping.lease.lease_id))
    assert error_code(lapsed.value) == grpc.StatusCode.NOT_FOUND


def _start_agent_process(state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    return start_service_process(
        "node-agent", {"MECBENCH_NODE_AGENT_STATE_DIR": str(state_dir), "MECBENCH_NODE_AGENT_REAPER_INTERVAL_S": "0.1"}
    )


def test_kill_9_then_restart_removes_shaping_whose_lease_lapsed(tmp_path: Path, veth_pair: VethPair) -> None:
    state_dir = tmp_path / "agent-state"
    process, address = _start_agent_process(state_dir)
    try:
        with open_channel(address) as channel:
            stub = node_agent_pb2_grpc.NodeAgentStub(channel)
            stub.ApplyShaping(
                node_agent_pb2.ApplyShapingRequest(
                    target=target(veth_pair.left, veth_pair.left_if),
                    netem=common_pb2.NetemConfig(rate_bps=10_000_000),
                    owner="run-killed",
                    lease_duration=Duration(seconds=2),
                ),
                timeout=30,
            )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    # Nobody is left to remove it: the kernel keeps it until an agent comes back.
    assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["tbf"]
    time.sleep(2.2)
    restarted, _address = _start_agent_process(state_dir)
    try:
        # Reconcile runs before the agent serves.
        assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
    finally:
        restarted.terminate()
        restarted.wait(10)


def test_shaping_with_a_live_lease_survives_an_agent_restart(tmp_path: Path, veth_pair: VethPair) -> None:
    """A restart (an upgrade, a crash) within the lease must not pull a running test's network
    from under it; the owner keeps renewing through the new agent."""
    state_dir = tmp_path / "agent-state"
    process, address = _start_agent_process(state_dir)
    with open_channel(address) as channel:
        shaping = node_agent_pb2_grpc.NodeAgentStub(channel).ApplyShaping(
            node_agent_pb2.ApplyShapingRequest(
                target=target(veth_pair.left, veth_pair.left_if),
                netem=common_pb2.NetemConfig(rate_bps=10_000_000), owner="run-live",
                lease_duration=Duration(seconds=60),
            ),
            timeout=30,
        ).shaping
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    restarted, address = _start_agent_process(state_dir)
    try:
        assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["tbf"]
        with open_channel(address) as channel:
            stub = node_agent_pb2_grpc.NodeAgentStub(channel)
            stub.RenewLease(node_agent_pb2.RenewLeaseRequest(lease_id=shaping.lease.lease_id))
            stub.ClearShaping(node_agent_pb2.ClearShapingRequest(owner="run-live"))
        assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
    finally:
        restarted.terminate()
        restarted.wait(10)


BAD_REQUESTS = [
    ({"delay": Duration(seconds=-1)}, "veth-l", "netem.delay", grpc.StatusCode.INVALID_ARGUMENT),
    ({"loss_percent": 120.0}, "veth-l", "netem.loss_percent", grpc.StatusCode.INVALID_ARGUMENT),
    ({"rate_bps": 10_000_000}, "veth/l", "target.interface", grpc.StatusCode.INVALID_ARGUMENT),
    ({"rate_bps": 10_000_000}, "veth;rm -rf", "target.interface", grpc.StatusCode.INVALID_ARGUMENT),
    ({"rate_bps": 10_000_000}, "$(reboot)", "target.interface", grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("netem", "interface", "field", "code"), BAD_REQUESTS)
def test_bad_input_is_refused_and_touches_nothing(
    node_agent: AgentUnderTest,
    veth_pair: VethPair,
    netem: dict[str, object],
    interface: str,
    field: str,
    code: grpc.StatusCode,
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        node_agent.stub.ApplyShaping(
            node_agent_pb2.ApplyShapingRequest(
                target=target(veth_pair.left, interface), netem=common_pb2.NetemConfig(**netem), owner="run-bad"  # type: ignore[arg-type]
            )
        )
    assert error_code(refused.value) == code
    assert field in (refused.value.details() or "")
    assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
    assert not node_agent.stub.ListShaping(node_agent_pb2.ListShapingRequest()).shapings


def test_missing_namespace_and_interface_are_not_found(node_agent: AgentUnderTest, veth_pair: VethPair) -> None:
    for shaping_target in (target("mbt-does-not-exist", "veth-l"), target(veth_pair.left, "nosuch0")):
        with pytest.raises(grpc.RpcError) as missing:
            apply(node_agent, shaping_target, 10_000_000)
        assert error_code(missing.value) == grpc.StatusCode.NOT_FOUND
    assert not node_agent.stub.ListShaping(node_agent_pb2.ListShapingRequest()).shapings


def test_the_host_uplink_is_not_in_the_allowlist(node_agent: AgentUnderTest) -> None:
    for interface in ("lo", "eth0"):
        with pytest.raises(grpc.RpcError) as refused:
            apply(node_agent, node_agent_pb2.ShapingTarget(interface=interface), 10_000_000)
        assert error_code(refused.value) in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


def test_netem_on_a_kernel_without_it_fails_with_the_probes_reason(
    node_agent: AgentUnderTest, veth_pair: VethPair
) -> None:
    support = probe_kernel()
    if support.supports("netem"):
        pytest.skip("this kernel has netem; the refusal path cannot be exercised")
    with pytest.raises(grpc.RpcError) as refused:
        node_agent.stub.ApplyShaping(
            node_agent_pb2.ApplyShapingRequest(
                target=target(veth_pair.left, veth_pair.left_if),
                netem=common_pb2.NetemConfig(delay=Duration(nanos=20_000_000)),
                owner="run-netem",
            )
        )
    assert error_code(refused.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "netem" in (refused.value.details() or "") and support.reasons["netem"] in (refused.value.details() or "")
    assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]


def test_netem_delay_is_installed_and_read_back(node_agent: AgentUnderTest, veth_pair: VethPair) -> None:
    support = probe_kernel()
    if not support.supports("netem"):
        pytest.skip(f"kernel probe: {support.reasons.get('netem')}")
    shaping = node_agent.stub.ApplyShaping(
        node_agent_pb2.ApplyShapingRequest(
            target=target(veth_pair.left, veth_pair.left_if),
            netem=common_pb2.NetemConfig(delay=Duration(nanos=20_000_000), rate_bps=10_000_000),
            owner="run-netem",
        )
    ).shaping
    netem = [q for q in shaping.qdiscs if q.kind == "netem"]
    assert netem and netem[0].params["delay_us"] == "20000"


def test_node_info_reports_the_probe_and_interfaces(node_agent: AgentUnderTest, veth_pair: VethPair) -> None:
    info = node_agent.stub.GetNodeInfo(node_agent_pb2.GetNodeInfoRequest()).node
    assert {"tbf", "htb"} <= set(info.supported_qdiscs)
    for kind in ("netem", "tbf", "htb", "ingress", "ifb"):
        assert (kind in info.supported_qdiscs) != (kind in info.unsupported_reasons)
    assert info.cpu_count >= 1 and info.memory_total_bytes > 0
    assert any(i.name == veth_pair.left_if and i.netns == veth_pair.left for i in info.interfaces)
    assert info.agent_address == node_agent.address


def test_namespaces_that_are_not_mecbenchs_are_refused(node_agent: AgentUnderTest) -> None:
    """Another program's network namespaces are not the agent's to shape, by name or by path."""
    for target_ in (
        node_agent_pb2.ShapingTarget(interface="veth0", netns_name="othersvc"),
        node_agent_pb2.ShapingTarget(interface="veth0", netns_path="/var/run/netns/othersvc"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            node_agent.stub.ApplyShaping(node_agent_pb2.ApplyShapingRequest(
                target=target_, direction=common_pb2.DIRECTION_EGRESS,
                netem=common_pb2.NetemConfig(rate_bps=1_000_000), owner="run-x",
            ))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "NETNS_NAME_ALLOWLIST" in (refused.value.details() or "")
