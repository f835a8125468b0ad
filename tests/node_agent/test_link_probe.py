"""Verified shaping at the node agent: the qdiscs' own counters read back through netlink, and a
short probe through the shaped link that flags a link left at a rate other than the one asked."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from pyroute2 import IPRoute

from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent import tc
from tests.conftest import field_violations, requires_root
from tests.node_agent.conftest import AgentUnderTest, VethPair, error_code, target

pytestmark = [requires_root, pytest.mark.root]

RATE_BPS = 5_000_000


def apply_rate(agent: AgentUnderTest, pair: VethPair, rate_bps: int) -> node_agent_pb2.Shaping:
    return agent.stub.ApplyShaping(
        node_agent_pb2.ApplyShapingRequest(
            target=target(pair.left, pair.left_if), direction=common_pb2.DIRECTION_EGRESS,
            netem=common_pb2.NetemConfig(rate_bps=rate_bps), owner="run-probe", lease_duration=Duration(seconds=60),
        ),
        timeout=30,
    ).shaping


def root_counters(agent: AgentUnderTest) -> node_agent_pb2.QdiscCounters:
    (shaping,) = agent.stub.ListShaping(node_agent_pb2.ListShapingRequest()).shapings
    (root,) = [q for q in shaping.qdiscs if q.parent == "root"]
    return root.counters


def test_the_probe_measures_the_asked_rate_and_the_counters_show_the_overload(
    node_agent: AgentUnderTest, veth_pair: VethPair
) -> None:
    shaping = apply_rate(node_agent, veth_pair, RATE_BPS)
    before = root_counters(node_agent)
    probe = node_agent.stub.ProbeShaping(
        node_agent_pb2.ProbeShapingRequest(shaping_id=shaping.shaping_id, peer_address=veth_pair.right_ip)
    ).probe
    after = root_counters(node_agent)
    print(f"probe: {probe.measured_rate_bps / 1e6:.3f} Mbit/s of {probe.offered_rate_bps / 1e6:.3f} offered, "
          f"rtt {probe.rtt.ToNanoseconds() / 1e3:.0f} us; counters {after}")
    assert probe.peer_address == veth_pair.right_ip
    assert probe.saturated and probe.as_requested, list(probe.problems)
    assert abs(probe.measured_rate_bps - RATE_BPS) / RATE_BPS < 0.10
    assert probe.rtt_samples > 0 and probe.rtt.ToNanoseconds() > 0
    # The probe offered 1.5x the rate: the token bucket made packets wait, then dropped the rest.
    assert after.bytes - before.bytes > RATE_BPS / 8 * 0.5
    assert after.packets > before.packets
    assert after.overlimits > before.overlimits
    assert after.drops > before.drops


def test_a_link_left_at_another_rate_is_flagged_with_the_figures(
    node_agent: AgentUnderTest, veth_pair: VethPair
) -> None:
    shaping = apply_rate(node_agent, veth_pair, RATE_BPS)
    # Deliberately misconfigured behind the agent's back: the token bucket changed to 50 Mbit/s.
    with IPRoute(netns=veth_pair.left) as ipr:
        index = ipr.link_lookup(ifname=veth_pair.left_if)[0]
        ipr.tc("change", "tbf", index, tc.ROOT_HANDLE, rate=50_000_000 // 8, burst=25_000, limit=340_000)
    probe = node_agent.stub.ProbeShaping(
        node_agent_pb2.ProbeShapingRequest(shaping_id=shaping.shaping_id, peer_address=veth_pair.right_ip)
    ).probe
    assert not probe.as_requested
    (problem,) = probe.problems
    assert problem.startswith("rate: measured") and "asked 5.000 Mbit/s" in problem
    assert probe.measured_rate_bps > RATE_BPS * 1.3


def test_probe_requests_are_checked(node_agent: AgentUnderTest) -> None:
    with pytest.raises(grpc.RpcError) as bad:
        node_agent.stub.ProbeShaping(
            node_agent_pb2.ProbeShapingRequest(peer_address="not-an-ip", duration=Duration(seconds=60))
        )
    assert error_code(bad.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad.value)) == {"shaping_id", "peer_address", "duration"}
    with pytest.raises(grpc.RpcError) as unknown:
        node_agent.stub.ProbeShaping(node_agent_pb2.ProbeShapingRequest(shaping_id="shp-nothing"))
    assert error_code(unknown.value) == grpc.StatusCode.NOT_FOUND
