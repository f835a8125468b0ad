"""Node agent fixtures: a real agent on loopback, and a pair of real network namespaces joined by
a veth pair to shape and to measure TCP throughput across."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from pyroute2 import IPRoute, netns

from mecbench.core.channels import open_channel
from mecbench.v1 import node_agent_pb2, node_agent_pb2_grpc
from node_agent.agent import NodeAgent
from node_agent.gpus import GpuDevice, StaticInventory
from node_agent.server import create_server
from node_agent.settings import NodeAgentSettings

# Two GPUs declared, not discovered: no GPU on this machine (NVML is exercised for real where
# the device tool lends one; see tests/node_agent/test_gpus.py).
DECLARED_GPUS = [
    GpuDevice(0, "GPU-00000000-0000-0000-0000-000000000000", "Declared A", 80 * 2**30, 0),
    GpuDevice(1, "GPU-11111111-1111-1111-1111-111111111111", "Declared B", 80 * 2**30, 0),
]


@dataclass
class AgentUnderTest:
    agent: NodeAgent
    stub: node_agent_pb2_grpc.NodeAgentStub
    address: str
    state_dir: Path


@pytest.fixture
def node_agent(tmp_path: Path) -> Iterator[AgentUnderTest]:
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", reaper_interval_s=0.1)
    agent = NodeAgent(settings, gpu_inventory=StaticInventory(list(DECLARED_GPUS)))
    running, _port = create_server("127.0.0.1:0", settings, agent)
    channel = open_channel(running.address)
    try:
        yield AgentUnderTest(agent, node_agent_pb2_grpc.NodeAgentStub(channel), running.address, settings.state_dir)
    finally:
        channel.close()
        running.stop(grace=1)


@dataclass(frozen=True)
class VethPair:
    """Namespace `left` (10.233.<n>.1, interface `veth-l`) joined to `right` (.2, `veth-r`)."""

    left: str
    right: str
    left_ip: str
    right_ip: str
    left_if: str = "veth-l"
    right_if: str = "veth-r"


_THROUGHPUT_SINK = """
import socket, sys, time, json
from mecbench.core.netns import enter_netns
enter_netns(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[2], 5201)); s.listen(1); print("ready", flush=True)
conn, _ = s.accept()
warmup, total = float(sys.argv[3]), float(sys.argv[4])
start = time.monotonic(); counted = 0; t0 = None
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    now = time.monotonic()
    if now - start >= warmup:
        if t0 is None:
            t0 = now
        counted += len(data)
    if now - start >= total:
        break
print(json.dumps({"bits_per_s": counted * 8 / (time.monotonic() - t0)}), flush=True)
"""

_THROUGHPUT_SOURCE = """
import socket, sys, time
from mecbench.core.netns import enter_netns
enter_netns(sys.argv[1])
c = socket.create_connection((sys.argv[2], 5201), timeout=10)
chunk = b"x" * (1 << 16); end = time.monotonic() + float(sys.argv[3])
try:
    while time.monotonic() < end:
        c.sendall(chunk)
except OSError:
    pass
"""


def measure_throughput(pair: VethPair, seconds: float = 3.0, warmup: float = 0.7) -> float:
    """TCP goodput in bit/s from `left` to `right`, past a warm-up that absorbs the bucket's burst."""
    sink = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_THROUGHPUT_SINK), pair.right, pair.right_ip, str(warmup),
         str(warmup + seconds)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        source = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_THROUGHPUT_SOURCE), pair.left, pair.right_ip,
             str(warmup + seconds + 1)],
            timeout=warmup + seconds + 30, capture_output=True, text=True,
        )
        out, _ = sink.communicate(timeout=30)
        assert source.returncode == 0, source.stderr
        return float(json.loads(out)["bits_per_s"])
    finally:
        if sink.poll() is None:
            sink.kill()


@pytest.fixture
def veth_pair() -> Iterator[VethPair]:
    tag = uuid.uuid4().hex[:6]
    octet = int(tag, 16) % 200 + 20
    pair = VethPair(f"mbt-{tag}-l", f"mbt-{tag}-r", f"10.233.{octet}.1", f"10.233.{octet}.2")
    netns.create(pair.left)
    netns.create(pair.right)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=f"mbt{tag}l", kind="veth", peer=f"mbt{tag}r")
            left = ipr.link_lookup(ifname=f"mbt{tag}l")[0]
            right = ipr.link_lookup(ifname=f"mbt{tag}r")[0]
            ipr.link("set", index=left, net_ns_fd=pair.left)
            ipr.link("set", index=right, net_ns_fd=pair.right)
        for name, old, new, ip in ((pair.left, f"mbt{tag}l", pair.left_if, pair.left_ip),
                                   (pair.right, f"mbt{tag}r", pair.right_if, pair.right_ip)):
            with IPRoute(netns=name) as ipr:
                index = ipr.link_lookup(ifname=old)[0]
                ipr.link("set", index=index, ifname=new)
                ipr.addr("add", index=index, address=ip, prefixlen=24)
                ipr.link("set", index=index, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield pair
    finally:
        for name in (pair.left, pair.right):
            with contextlib.suppress(OSError):
                netns.remove(name)


def qdisc_kinds(namespace: str, interface: str) -> list[str]:
    """What the kernel has on an interface, read directly (not through the agent)."""
    with IPRoute(netns=namespace) as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return []
        return sorted(str(m.get_attr("TCA_KIND")) for m in ipr.get_qdiscs(index=found[0]))


def error_code(call: grpc.RpcError) -> grpc.StatusCode:
    code = call.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def target(pair_ns: str, interface: str) -> node_agent_pb2.ShapingTarget:
    return node_agent_pb2.ShapingTarget(interface=interface, netns_name=pair_ns)
