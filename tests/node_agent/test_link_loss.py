"""Loss without netem: on a kernel that lacks netem but has clsact and cls_bpf, a loss profile
is served by a random-drop bpf classifier; the probe says which mechanism serves and measures
what it drops. Skips, saying why, where the kernel has netem (netem serves loss there) or no bpf."""

from __future__ import annotations

import time

import pytest
from google.protobuf.duration_pb2 import Duration

from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent import loss
from node_agent.probe import probe_kernel
from tests.conftest import requires_root
from tests.node_agent.conftest import AgentUnderTest, VethPair, qdisc_kinds, target


def test_the_drop_program_compares_31_random_bits_with_the_probability() -> None:
    program = loss.drop_program(25.0)
    assert len(program) == 7 * 8
    code, regs, off, imm = (program[16], program[17], int.from_bytes(program[18:20], "little", signed=True),
                            int.from_bytes(program[20:24], "little", signed=True))
    assert (code, regs, off, imm) == (0xA5, 0, 2, 2**29)  # if r0 < 2^31 / 4 goto drop
    assert loss.threshold(100) == 2**31 - 1 and loss.threshold(0) == 0


@requires_root
@pytest.mark.root
@pytest.mark.parametrize("rate_bps", [0, 20_000_000])
def test_loss_is_served_by_a_bpf_drop_and_measured_by_the_probe(
    node_agent: AgentUnderTest, veth_pair: VethPair, rate_bps: int
) -> None:
    support = probe_kernel()
    if support.supports("netem"):
        pytest.skip("this kernel has netem, which serves loss itself")
    if not support.supports("bpf"):
        pytest.skip(f"no netem and no bpf classifier: {support.reasons.get('bpf')}")
    shaping = node_agent.stub.ApplyShaping(node_agent_pb2.ApplyShapingRequest(
        target=target(veth_pair.left, veth_pair.left_if), direction=common_pb2.DIRECTION_EGRESS,
        netem=common_pb2.NetemConfig(loss_percent=20.0, rate_bps=rate_bps), owner="run-loss",
        lease_duration=Duration(seconds=60),
    )).shaping
    kinds = {q.kind: q for q in shaping.qdiscs}
    assert set(kinds) == ({"clsact", "tbf"} if rate_bps else {"clsact"})
    assert kinds["clsact"].params["loss_percent"] == "20" and kinds["clsact"].params["loss_mechanism"] == "bpf"
    probe = node_agent.stub.ProbeShaping(node_agent_pb2.ProbeShapingRequest(
        shaping_id=shaping.shaping_id, peer_address=veth_pair.right_ip)).probe
    print(f"loss measured {probe.measured_loss_percent:.2f}% ({probe.loss_mechanism}); "
          f"rate {probe.measured_rate_bps / 1e6:.2f} Mbit/s; problems {list(probe.problems)}")
    assert probe.loss_mechanism == "bpf" and probe.requested_loss_percent == 20.0
    assert 15.0 <= probe.measured_loss_percent <= 25.0
    assert probe.as_requested, list(probe.problems)
    node_agent.stub.ClearShaping(node_agent_pb2.ClearShapingRequest(shaping_id=shaping.shaping_id))
    assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]


@requires_root
@pytest.mark.root
def test_the_node_reports_which_loss_mechanisms_its_kernel_has(node_agent: AgentUnderTest) -> None:
    info = node_agent.stub.GetNodeInfo(node_agent_pb2.GetNodeInfoRequest()).node
    for kind in ("clsact", "bpf", "netem"):
        assert (kind in info.supported_qdiscs) != (kind in info.unsupported_reasons)


@requires_root
@pytest.mark.root
def test_a_loss_schedule_replaces_the_drop_filter_at_each_step(node_agent: AgentUnderTest, veth_pair: VethPair) -> None:
    support = probe_kernel()
    if support.supports("netem") or not support.supports("bpf"):
        pytest.skip("loss by bpf serves kernels without netem and with cls_bpf; " + support.reasons.get("bpf", "netem"))
    schedule = common_pb2.LinkSchedule(steps=[
        common_pb2.LinkStep(at=Duration(), netem=common_pb2.NetemConfig(loss_percent=5.0, rate_bps=20_000_000)),
        common_pb2.LinkStep(at=Duration(nanos=200_000_000),
                            netem=common_pb2.NetemConfig(loss_percent=30.0, rate_bps=10_000_000)),
    ])
    shaping = node_agent.stub.ApplyShaping(node_agent_pb2.ApplyShapingRequest(
        target=target(veth_pair.left, veth_pair.left_if), direction=common_pb2.DIRECTION_EGRESS,
        netem=schedule.steps[0].netem, owner="run-loss-schedule", lease_duration=Duration(seconds=60),
        schedule=schedule,
    )).shaping
    node_agent.stub.StartSchedule(node_agent_pb2.StartScheduleRequest(shaping_id=shaping.shaping_id))
    time.sleep(0.5)
    stopped = node_agent.stub.StopSchedule(node_agent_pb2.StopScheduleRequest(shaping_id=shaping.shaping_id))
    assert [(s.params["loss_percent"], s.params["rate_bps"]) for s in stopped.applied] == [
        ("5", "20000000"), ("30", "10000000")]
    assert all(not s.error for s in stopped.applied)
