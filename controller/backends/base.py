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
    labels: dict[str, str] = field(default_factory=dict)


class DeploymentBackend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def start_agent(self, kind: AgentKind, name: str, env: dict[str, str] | None = None) -> AgentHandle:
        """Start an agent and return once it answers its health check."""

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
