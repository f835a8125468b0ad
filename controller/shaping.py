"""Network profiles applied for the length of a run: ApplyShaping on the node agent under a
lease that a background thread renews, and ClearShaping at the end whatever happened. If the
controller dies, the node agent removes the shaping when the lease lapses."""

from __future__ import annotations

import threading

import grpc

from controller.agents import AgentPool, remote_error
from mecbench.core import durations
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2

log = get_logger("mecbench.controller.shaping")

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
                 lease_s: float) -> None:
        self.pool = pool
        self.run_id = run_id
        self.profile = profile
        self.clients = clients
        self.lease_s = lease_s
        self.leases: list[str] = []
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> RunShaping:
        node = self.pool.node_agent()
        side = _SIDES[self.profile.side]
        direction = self.profile.direction or common_pb2.DIRECTION_EGRESS
        try:
            for client in range(self.clients):
                for point in self.pool.backend.shaping_points(side, client):
                    request = node_agent_pb2.ApplyShapingRequest(
                        target=node_agent_pb2.ShapingTarget(interface=point.interface, netns_name=point.netns),
                        direction=direction,
                        netem=self.profile.netem,
                        owner=self.run_id,
                        lease_duration=durations.from_seconds(self.lease_s),
                    )
                    reply = node.stub.ApplyShaping(request, timeout=30)
                    self.leases.append(reply.shaping.lease.lease_id)
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
        node = self.pool.node_agent()
        while not self._stop.wait(self.lease_s / 3):
            for lease_id in self.leases:
                try:
                    node.stub.RenewLease(
                        node_agent_pb2.RenewLeaseRequest(
                            lease_id=lease_id, lease_duration=durations.from_seconds(self.lease_s)
                        ),
                        timeout=5,
                    )
                except grpc.RpcError as exc:
                    log.warning("lease_renewal_failed", run_id=self.run_id, lease_id=lease_id, error=exc.details())

    def _clear(self) -> None:
        try:
            self.pool.node_agent().stub.ClearShaping(node_agent_pb2.ClearShapingRequest(owner=self.run_id), timeout=30)
        except grpc.RpcError as exc:
            # The lease still lapses on the node agent: shaping never outlives the run for long.
            log.error("clear_shaping_failed", run_id=self.run_id, error=exc.details())

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        self._clear()
