"""The narrow interface between the controller and where agents run (local processes or pods)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


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
class ShapingPoint:
    """An interface traffic shaping can be applied to, and the network namespace it lives in."""

    interface: str
    netns: str


class DeploymentBackend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def start_agent(
        self, kind: AgentKind, name: str, env: dict[str, str] | None = None, placement: str = ""
    ) -> AgentHandle:
        """Start an agent (at `placement` in the topology) and return once it answers its health check."""

    def sut_placement(self) -> str:
        """Where SUT agents run; "" is the host itself."""
        return ""

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

    @abc.abstractmethod
    def stop_agent(self, name: str) -> None:
        """Stop an agent; stopping one that is gone is not an error."""

    @abc.abstractmethod
    def agents(self) -> list[AgentHandle]:
        """Agents this backend started that are still running."""

    @abc.abstractmethod
    def is_alive(self, name: str) -> bool:
        """Whether the agent's process (or pod) is still running."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every agent this backend started."""
