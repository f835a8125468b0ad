"""The narrow interface between the controller and where agents run (local processes or pods)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from mecbench.v1 import node_agent_pb2, sut_agent_pb2


class AgentKind(StrEnum):
    SUT = "sut-agent"
    LOADGEN = "loadgen-agent"
    NODE = "node-agent"


@dataclass
class AgentHandle:
    """A running agent: its name, kind and gRPC address, and where its logs go."""

    name: str
    kind: AgentKind
    address: str
    node: str
    pid: int = 0
    log_path: Path | None = None
    # Where in the topology it runs: "" (the host), "edge", or "client-<i>".
    placement: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PodRef:
    """A Kubernetes pod as the node agent resolves it to its network namespace (by UID)."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class ShapingPoint:
    """An interface traffic shaping can be applied to, and the network namespace it lives in.

    A cluster backend names the namespace by its pod instead (`pod`), on the node it runs on
    (`node`: that node's agent shapes it); `netns` is then empty.
    """

    interface: str
    netns: str
    pod: PodRef | None = None
    node: str = ""

    def target(self) -> node_agent_pb2.ShapingTarget:
        """The node agent's ShapingTarget for this point."""
        if self.pod is not None:
            return node_agent_pb2.ShapingTarget(
                interface=self.interface,
                pod=node_agent_pb2.PodReference(namespace=self.pod.namespace, name=self.pod.name, uid=self.pod.uid),
            )
        return node_agent_pb2.ShapingTarget(interface=self.interface, netns_name=self.netns)


class DeploymentBackend(abc.ABC):
    name: str = ""
    # How many points cluster_shaping_points gives per member link: 2 (the head's end, then the
    # worker's) where each end can be shaped alone, 1 where only the link as a whole can.
    cluster_link_ends: int = 2

    @abc.abstractmethod
    def start_agent(
        self, kind: AgentKind, name: str, env: dict[str, str] | None = None, placement: str = ""
    ) -> AgentHandle:
        """Start an agent (at `placement` in the topology) and return once it answers its health check."""

    def start_sut_agent(self, name: str, config: sut_agent_pb2.SutConfig, placement: str = "") -> AgentHandle:
        """Start the SUT agent that will serve `config`. A cluster backend shapes its pod from the
        config (image, resources, GPUs, node selector). `config.env` is never the agent's: it
        reaches only the server the agent starts, through the config itself."""
        return self.start_agent(AgentKind.SUT, name, placement=placement)

    def needs_new_sut_agent(self, old: sut_agent_pb2.SutConfig, new: sut_agent_pb2.SutConfig) -> bool:
        """Whether serving `new` instead of `old` takes a new agent (a pod's image or resources
        cannot change in place), rather than a restart of the backend inside the same agent."""
        return False

    def sut_placement(self) -> str:
        """Where SUT agents run; "" is the host itself."""
        return ""

    # --- cluster SUTs (SutConfig.cluster): the head is the SUT agent above, the workers these --

    def member_placement(self, index: int) -> str:
        """Where worker `index` (0-based) of a cluster SUT runs; "" is the host itself."""
        return ""

    def start_sut_workers(self, name: str, config: sut_agent_pb2.SutConfig) -> list[AgentHandle]:
        """Start one SUT agent per worker of `config.cluster`, in order, named `{name}-{worker}`, each
        on a node of its own, and return them once each answers its health check. On failure none
        is left running. A cluster backend shapes each from its SutMember (resources, GPUs, node
        selector) and the head's image."""
        started: list[AgentHandle] = []
        try:
            for index, worker in enumerate(config.cluster.workers):
                started.append(
                    self.start_agent(AgentKind.SUT, f"{name}-{worker.name}", placement=self.member_placement(index))
                )
        except BaseException:
            self.stop_sut_workers(name, started)
            raise
        return started

    def stop_sut_workers(self, name: str, workers: list[AgentHandle]) -> None:
        """Stop a cluster SUT's worker agents, the last first."""
        for worker in reversed(workers):
            self.stop_agent(worker.name)

    def cluster_host(self, agent: AgentHandle) -> str:
        """The address the other members of its cluster reach `agent` at (its runtime advertises it)."""
        return agent.address.rpartition(":")[0].strip("[]")

    def cluster_shaping_points(self, index: int) -> list[ShapingPoint]:
        """The link between a cluster SUT's head and worker `index` (0-based), both ends."""
        from mecbench.core.errors import FailedPrecondition

        raise FailedPrecondition(f"the {self.name} backend's topology has no links between cluster members to shape")

    def loadgen_placement(self, client: int) -> str:
        """Where LoadGen client `client` runs; "" means one shared LoadGen server for all clients."""
        return ""

    def sut_address_for(self, sut: AgentHandle, client: int) -> str:
        """The address client `client` reaches the SUT's data plane at."""
        return sut.address

    def shaping_points(self, side: str, client: int) -> list[ShapingPoint]:
        """Interfaces on the path between client `client` and the SUT, on the `sut` or `loadgen` side."""
        from mecbench.core.errors import FailedPrecondition

        raise FailedPrecondition(
            f"the {self.name} backend's topology has no shaped path (use the netns topology, which needs root)"
        )

    def sut_shaping_points(self, side: str, client: int, sut: AgentHandle) -> list[ShapingPoint]:
        """`shaping_points` for a run on the SUT agent `sut`: where each SUT has its own pod, the
        path to shape is that pod's. Backends with one shared path ignore `sut`."""
        return self.shaping_points(side, client)

    @abc.abstractmethod
    def stop_agent(self, name: str) -> None:
        """Stop an agent; stopping one that is gone is not an error."""

    @abc.abstractmethod
    def agents(self) -> list[AgentHandle]:
        """Agents this backend started that are still running."""

    @abc.abstractmethod
    def is_alive(self, name: str) -> bool:
        """Whether the agent's process (or pod) is still running."""

    def agent_problem(self, name: str) -> str:
        """Why an agent that is not alive ended, in words ("" when the backend cannot tell): a
        cluster backend says which of its pod's states ended it (deleted, a container restarted
        after an OOM kill, ...)."""
        return ""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every agent this backend started."""
