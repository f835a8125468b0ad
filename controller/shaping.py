"""Network profiles applied for the length of a run: ApplyShaping on the node agent under a
lease that a background thread renews, and ClearShaping at the end whatever happened. If the
controller dies, the node agent removes the shaping when the lease lapses. If the node agent
dies (a renewal finds it gone), the run cannot vouch for its network any more: `on_lost` ends it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from controller.agents import AgentPool, NodeAgentHandle, remote_error
from controller.backends.base import AgentHandle, ShapingPoint
from mecbench.core import durations
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2

log = get_logger("mecbench.controller.shaping")

RENEW_INTERVAL_S = 1.0

_SIDES = {
    common_pb2.SHAPING_SIDE_UNSPECIFIED: "sut",
    common_pb2.SHAPING_SIDE_SUT: "sut",
    common_pb2.SHAPING_SIDE_LOADGEN: "loadgen",
    common_pb2.SHAPING_SIDE_BOTH: "both",
}


def is_shaped(profile: common_pb2.NetworkProfile) -> bool:
    return profile.HasField("netem") and profile.netem.ByteSize() > 0


class RunShaping:
    """Shaping held for one run. Use as a context manager around the run's tests."""

    def __init__(self, pool: AgentPool, run_id: str, profile: common_pb2.NetworkProfile, clients: int,
                 lease_s: float, on_lost: Callable[[str], None] | None = None, sut: AgentHandle | None = None) -> None:
        self.pool = pool
        self.on_lost = on_lost
        self.sut = sut
        self.run_id = run_id
        self.profile = profile
        self.clients = clients
        self.lease_s = lease_s
        # (node agent, lease id) of every shaping applied: on a cluster, each on its own node.
        self.leases: list[tuple[NodeAgentHandle, str]] = []
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _points(self, side: str, client: int) -> list[ShapingPoint]:
        if self.sut is not None:
            return self.pool.backend.sut_shaping_points(side, client, self.sut)
        return self.pool.backend.shaping_points(side, client)

    def __enter__(self) -> RunShaping:
        side = _SIDES[self.profile.side]
        direction = self.profile.direction or common_pb2.DIRECTION_EGRESS
        try:
            for client in range(self.clients):
                for point in self._points(side, client):
                    node = self.pool.node_agent_on(point.node)
                    request = node_agent_pb2.ApplyShapingRequest(
                        target=point.target(),
                        direction=direction,
                        netem=self.profile.netem,
                        owner=self.run_id,
                        lease_duration=durations.from_seconds(self.lease_s),
                    )
                    reply = node.stub.ApplyShaping(request, timeout=30)
                    self.leases.append((node, reply.shaping.lease.lease_id))
                    log.info("shaping_applied", run_id=self.run_id, interface=point.interface, netns=point.netns,
                             profile=self.profile.name)
        except grpc.RpcError as exc:
            self._clear()
            raise remote_error("node agent", exc) from None
        except BaseException:
            self._clear()
            raise
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.run_id}", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        # Renewed often enough that a dead node agent is noticed within seconds.
        interval = min(self.lease_s / 3, RENEW_INTERVAL_S)
        while not self._stop.wait(interval):
            for node, lease_id in self.leases:
                if not self.pool.backend.is_alive(node.agent.name):
                    self._lost(
                        f"node agent {node.agent.name} is not running: it stopped while holding the run's shaping"
                    )
                    return
                try:
                    node.stub.RenewLease(
                        node_agent_pb2.RenewLeaseRequest(
                            lease_id=lease_id, lease_duration=durations.from_seconds(self.lease_s)
                        ),
                        timeout=5,
                    )
                except grpc.RpcError as exc:
                    log.warning("lease_renewal_failed", run_id=self.run_id, lease_id=lease_id, error=exc.details())
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                        self._lost(f"node agent {node.agent.name} lost the run's shaping ({exc.code().name}: "
                                   f"{exc.details()})")
                        return

    def _lost(self, reason: str) -> None:
        if self.on_lost is not None and not self._stop.is_set():
            self.on_lost(reason)

    def _clear(self) -> None:
        # Every node the run shaped on, asked again (a node agent that died and came back has
        # re-adopted the run's shaping from its state directory); at least this node's.
        nodes = {node.agent.placement for node, _ in self.leases} or {""}
        for placement in sorted(nodes):
            try:
                node = self.pool.node_agent_on(placement)
                node.stub.ClearShaping(node_agent_pb2.ClearShapingRequest(owner=self.run_id), timeout=30)
            except grpc.RpcError as exc:
                # The lease still lapses on the node agent: shaping never outlives the run for long.
                log.error("clear_shaping_failed", run_id=self.run_id, node=placement, error=exc.details())

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        self._clear()
