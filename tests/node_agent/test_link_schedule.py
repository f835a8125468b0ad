"""Time-varying links at the node agent: a schedule changes the installed qdiscs in place (same
qdisc, counters running on), its applied timeline read back from the kernel; netem schedules'
change messages checked by decoding them (this kernel has no netem), and run for real where a
kernel has it."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWQDISC

from mecbench.core import durations
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent import tc
from node_agent.probe import probe_kernel
from tests.conftest import field_violations, requires_root
from tests.node_agent.conftest import AgentUnderTest, VethPair, error_code, target


def rate_steps(*steps: tuple[float, int]) -> common_pb2.LinkSchedule:
    return common_pb2.LinkSchedule(
        steps=[common_pb2.LinkStep(at=durations.from_seconds(at), netem=common_pb2.NetemConfig(rate_bps=rate))
               for at, rate in steps],
        source="test",
    )


def apply(agent: AgentUnderTest, pair: VethPair, schedule: common_pb2.LinkSchedule,
          netem: common_pb2.NetemConfig | None = None) -> node_agent_pb2.Shaping:
    return agent.stub.ApplyShaping(
        node_agent_pb2.ApplyShapingRequest(
            target=target(pair.left, pair.left_if), direction=common_pb2.DIRECTION_EGRESS,
            netem=netem or schedule.steps[0].netem, owner="run-schedule", lease_duration=Duration(seconds=60),
            schedule=schedule,
        ),
        timeout=30,
    ).shaping


def root_packets(agent: AgentUnderTest) -> int:
    (shaping,) = agent.stub.ListShaping(node_agent_pb2.ListShapingRequest()).shapings
    (root,) = [q for q in shaping.qdiscs if q.parent == "root"]
    return int(root.counters.packets)


@requires_root
@pytest.mark.root
def test_a_rate_schedule_changes_the_bucket_in_place_and_records_what_the_kernel_took(
    node_agent: AgentUnderTest, veth_pair: VethPair
) -> None:
    shaping = apply(node_agent, veth_pair, rate_steps((0, 50_000_000), (0.3, 5_000_000), (0.6, 50_000_000)))
    node_agent.stub.ProbeShaping(node_agent_pb2.ProbeShapingRequest(
        shaping_id=shaping.shaping_id, peer_address=veth_pair.right_ip, duration=Duration(nanos=200_000_000)))
    packets_before = root_packets(node_agent)
    assert packets_before > 0
    started = node_agent.stub.StartSchedule(node_agent_pb2.StartScheduleRequest(shaping_id=shaping.shaping_id))
    assert started.started_at.seconds > 0
    time.sleep(0.9)
    stopped = node_agent.stub.StopSchedule(node_agent_pb2.StopScheduleRequest(shaping_id=shaping.shaping_id))
    applied = [(s.step, s.params["rate_bps"], durations.to_seconds(s.applied) - durations.to_seconds(s.planned))
               for s in stopped.applied]
    print(f"applied {applied}")
    assert [(step, rate) for step, rate, _ in applied] == [(0, "50000000"), (1, "5000000"), (2, "50000000")]
    assert all(not s.error for s in stopped.applied)
    assert all(0 <= late < 0.1 for _, _, late in applied)
    # The same tbf, changed: its counters ran on (a delete and add would have started them at 0).
    assert root_packets(node_agent) >= packets_before
    (root,) = [q for q in node_agent.stub.ListShaping(node_agent_pb2.ListShapingRequest()).shapings[0].qdiscs
               if q.parent == "root"]
    assert root.handle == "6d65:" and root.params["rate_bps"] == "50000000"
    with pytest.raises(grpc.RpcError) as again:
        node_agent.stub.StopSchedule(node_agent_pb2.StopScheduleRequest(shaping_id=shaping.shaping_id))
    assert error_code(again.value) == grpc.StatusCode.NOT_FOUND


@requires_root
@pytest.mark.root
def test_schedules_are_checked_whole_before_anything_is_installed(
    node_agent: AgentUnderTest, veth_pair: VethPair
) -> None:
    bad = common_pb2.LinkSchedule(steps=[
        common_pb2.LinkStep(at=Duration(seconds=1), netem=common_pb2.NetemConfig(rate_bps=5_000_000)),
        common_pb2.LinkStep(at=Duration(seconds=1), netem=common_pb2.NetemConfig(rate_bps=10)),
    ], period=Duration(nanos=1))
    with pytest.raises(grpc.RpcError) as refused:
        apply(node_agent, veth_pair, bad)
    assert error_code(refused.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(refused.value)) == {
        "schedule.steps[0].at", "schedule.steps[1].at", "schedule.steps[1].netem.rate_bps", "schedule.period",
    }
    # A rate-only shaping cannot become a delay in place.
    mixed = rate_steps((0, 5_000_000))
    mixed.steps.append(common_pb2.LinkStep(at=Duration(seconds=1), netem=common_pb2.NetemConfig(
        rate_bps=5_000_000, delay=Duration(nanos=10_000_000))))
    with pytest.raises(grpc.RpcError) as kinds:
        apply(node_agent, veth_pair, mixed)
    assert set(field_violations(kinds.value)) == {"schedule.steps[1].netem"}
    assert not node_agent.stub.ListShaping(node_agent_pb2.ListShapingRequest()).shapings
    with pytest.raises(grpc.RpcError) as unknown:
        node_agent.stub.StartSchedule(node_agent_pb2.StartScheduleRequest(shaping_id="shp-none"))
    assert error_code(unknown.value) == grpc.StatusCode.NOT_FOUND


class RecordingNetlink:
    """Stands in for the kernel's netlink socket, which on this kernel has no netem to change:
    records each request so the messages can be decoded as the kernel would read them."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, int, int]] = []
        self.tc_calls: list[tuple[Any, ...]] = []
        self.status = {"nlm_generator": False}

    def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> list[Any]:
        self.requests.append((msg, msg_type, msg_flags))
        return []

    def tc(self, *args: Any, **kwargs: Any) -> None:
        self.tc_calls.append((args, kwargs))


def decoded(msg: Any) -> tuple[dict[str, int], int, int]:
    msg.encode()
    echoed = tc.mecbench_tcmsg(msg.data)
    echoed.decode()
    options = echoed.get_attr("TCA_OPTIONS")
    return {k: int(options[k]) for k in ("delay", "jitter", "loss", "limit")}, int(echoed["handle"]), int(
        echoed["parent"])


def test_a_netem_step_is_a_change_of_the_installed_netem_not_a_new_one() -> None:
    netlink = RecordingNetlink()
    step = tc.RootPlan(netem=tc.NetemParams(delay_ns=40_000_000, jitter_ns=5_000_000, loss=2.0))
    tc.change_root(netlink, 7, step, mtu=1500)
    ((msg, msg_type, flags),) = netlink.requests
    assert msg_type == RTM_NEWQDISC
    assert flags == NLM_F_REQUEST | NLM_F_ACK and not flags & (NLM_F_CREATE | NLM_F_EXCL)
    qopt, handle, parent = decoded(msg)
    ticks = tc.psched_ticks_per_us()
    assert (handle, parent) == (tc.ROOT_HANDLE, tc.TC_H_ROOT)
    assert qopt["delay"] == int(40_000 * ticks) and qopt["jitter"] == int(5_000 * ticks)
    assert qopt["loss"] == tc.probability(2.0)


def test_a_rate_and_netem_step_changes_the_htb_class_and_its_netem_leaf() -> None:
    netlink = RecordingNetlink()
    step = tc.RootPlan(rate_bytes=625_000, burst_bytes=20_000, netem=tc.NetemParams(delay_ns=10_000_000, limit=1000))
    tc.change_root(netlink, 7, step, mtu=1500)
    ((args, kwargs),) = netlink.tc_calls
    assert args[:4] == ("change-class", "htb", 7, tc.DEFAULT_CLASS)
    assert kwargs["rate"] == kwargs["ceil"] == 625_000 and kwargs["parent"] == tc.ROOT_HANDLE
    ((msg, _type, flags),) = netlink.requests
    assert not flags & NLM_F_CREATE
    qopt, handle, parent = decoded(msg)
    assert (handle, parent) == (tc.LEAF_HANDLE, tc.DEFAULT_CLASS)
    assert qopt["delay"] == int(10_000 * tc.psched_ticks_per_us())


@requires_root
@pytest.mark.root
def test_a_delay_schedule_runs_on_a_kernel_with_netem(node_agent: AgentUnderTest, veth_pair: VethPair) -> None:
    support = probe_kernel()
    if not support.supports("netem"):
        pytest.skip(f"netem schedules need netem; kernel probe: {support.reasons.get('netem')}")
    schedule = common_pb2.LinkSchedule(steps=[
        common_pb2.LinkStep(at=Duration(), netem=common_pb2.NetemConfig(delay=Duration(nanos=5_000_000))),
        common_pb2.LinkStep(at=Duration(nanos=300_000_000),
                            netem=common_pb2.NetemConfig(delay=Duration(nanos=50_000_000))),
    ])
    shaping = apply(node_agent, veth_pair, schedule)
    node_agent.stub.StartSchedule(node_agent_pb2.StartScheduleRequest(shaping_id=shaping.shaping_id))
    time.sleep(0.5)
    stopped = node_agent.stub.StopSchedule(node_agent_pb2.StopScheduleRequest(shaping_id=shaping.shaping_id))
    assert [s.params["delay_us"] for s in stopped.applied] == ["5000", "50000"]
    probe = node_agent.stub.ProbeShaping(node_agent_pb2.ProbeShapingRequest(
        shaping_id=shaping.shaping_id, peer_address=veth_pair.right_ip)).probe
    assert 0.045 <= durations.to_seconds(probe.rtt) <= 0.06
