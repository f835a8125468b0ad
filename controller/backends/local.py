"""Local backend: each agent is a child process on this machine, bound to an ephemeral port.

Each child's stdin is a pipe this process holds open: when the controller dies, even by kill -9,
the pipe closes and the agent stops itself (`MECBENCH_EXIT_WITH_PARENT`). Agents are stopped
with SIGTERM (graceful) then SIGKILL. Nothing runs between fork and exec: a child placed in a
network namespace enters it itself (`--netns`) before it starts any thread. Each agent's stderr
(its JSON logs) goes to a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from controller.backends.base import AgentHandle, AgentKind, DeploymentBackend, ShapingPoint
from controller.backends.topology import NetnsTopology, NodeLinks
from mecbench.core.channels import open_channel, wait_until_serving
from mecbench.core.errors import AlreadyExists, FailedPrecondition, Unavailable
from mecbench.core.logging import get_logger
from mecbench.core.server import EXIT_WITH_PARENT_ENV
from mecbench.v1 import sut_agent_pb2

log = get_logger("mecbench.controller.local")

_LISTENING = re.compile(r"listening on (\S+:\d+)")


@dataclass
class _Child:
    handle: AgentHandle
    process: subprocess.Popen[str]


class LocalProcessBackend(DeploymentBackend):
    name = "local"
    # Agents are this node's processes: the node agent can confine a SUT agent by its PID.
    places_processes = True

    def __init__(
        self,
        log_dir: Path,
        host: str = "127.0.0.1",
        start_timeout: float = 30.0,
        topology: NetnsTopology | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.host = host
        self.start_timeout = start_timeout
        self.topology = topology
        self._children: dict[str, _Child] = {}
        self._lock = threading.Lock()
        self.node_name = os.uname().nodename
        if topology is not None and not topology.created:
            topology.create()

    def _placement_netns(self, placement: str) -> tuple[str, str]:
        """(netns, address the controller dials) for a placement; the host namespace for ""."""
        if not placement or self.topology is None:
            return "", self.host
        if placement == "edge":
            return self.topology.edge.netns, self.topology.edge.management_ip
        if placement.startswith("sut-"):
            sut_node = self._sut_node(int(placement.removeprefix("sut-")))
            return sut_node.netns, sut_node.management_ip
        client = int(placement.removeprefix("client-"))
        node = self.topology.client_nodes[client]
        return node.netns, node.management_ip

    def sut_placement(self) -> str:
        return "edge" if self.topology is not None else ""

    def _sut_node(self, number: int) -> NodeLinks:
        assert self.topology is not None
        if not 1 <= number <= self.topology.sut_nodes:
            raise FailedPrecondition(
                f"the netns topology has {self.topology.sut_nodes} SUT node(s), a cluster SUT here needs one per "
                f"worker: set the controller's topology_sut_nodes (MECBENCH_CONTROLLER_TOPOLOGY_SUT_NODES) to {number} "
                "or more"
            )
        return self.topology.sut_node_links[number - 1]

    def member_placement(self, index: int) -> str:
        if self.topology is None:
            return ""
        self._sut_node(index + 1)  # refused here, before anything starts, when the topology lacks it
        return f"sut-{index + 1}"

    def start_sut_workers(self, name: str, config: sut_agent_pb2.SutConfig) -> list[AgentHandle]:
        for index in range(len(config.cluster.workers)):
            self.member_placement(index)
        return super().start_sut_workers(name, config)

    def cluster_host(self, agent: AgentHandle) -> str:
        if self.topology is None or not agent.placement:
            return self.host
        if agent.placement == "edge":
            return self.topology.edge_cluster_ip() if self.topology.sut_nodes else self.topology.edge.management_ip
        if agent.placement.startswith("sut-"):
            return self._sut_node(int(agent.placement.removeprefix("sut-"))).data_ip
        return super().cluster_host(agent)

    def cluster_shaping_points(self, index: int) -> list[ShapingPoint]:
        if self.topology is None:
            return super().cluster_shaping_points(index)
        node = self._sut_node(index + 1)
        return [
            ShapingPoint(self.topology.edge_cluster_interface(index + 1), self.topology.edge.netns),
            ShapingPoint(node.data_interface, node.netns),
        ]

    def loadgen_placement(self, client: int) -> str:
        return f"client-{client}" if self.topology is not None else ""

    def sut_address_for(self, sut: AgentHandle, client: int) -> str:
        if self.topology is None or sut.placement != "edge":
            return sut.address
        port = sut.address.rpartition(":")[2]
        return f"{self.topology.edge_data_ip(client)}:{port}"

    def shaping_points(self, side: str, client: int) -> list[ShapingPoint]:
        if self.topology is None:
            return super().shaping_points(side, client)
        if not 0 <= client < self.topology.clients:
            raise FailedPrecondition(f"the topology has {self.topology.clients} client namespaces, not {client + 1}")
        points = []
        if side in ("sut", "both"):
            points.append(ShapingPoint(self.topology.edge_data_interface(client), self.topology.edge.netns))
        if side in ("loadgen", "both"):
            node = self.topology.client_nodes[client]
            points.append(ShapingPoint(node.data_interface, node.netns))
        return points

    def start_agent(
        self, kind: AgentKind, name: str, env: dict[str, str] | None = None, placement: str = ""
    ) -> AgentHandle:
        with self._lock:
            if name in self._children and self._children[name].process.poll() is None:
                raise AlreadyExists(f"agent {name!r} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        netns, dial_host = self._placement_netns(placement)
        # In a namespace the agent listens on every address: the controller dials its management
        # address, LoadGen clients its data address.
        listen_host = "0.0.0.0" if netns else self.host
        command = [sys.executable, "-m", "mecbench", kind.value, "--listen", f"{listen_host}:0"]
        if netns:
            command += ["--netns", netns]
        child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", EXIT_WITH_PARENT_ENV: "1"}
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.PIPE,
                env=child_env,
                text=True,
                start_new_session=True,
            )
        bound = self._read_address(process, name, log_path, log_start)
        address = f"{dial_host}:{bound.rpartition(':')[2]}"
        handle = AgentHandle(
            name=name,
            kind=kind,
            address=address,
            node=placement or self.node_name,
            pid=process.pid,
            log_path=log_path,
            placement=placement,
        )
        with self._lock:
            self._children[name] = _Child(handle, process)
        channel = open_channel(address)
        try:
            wait_until_serving(channel, timeout=self.start_timeout)
        except Unavailable:
            self.stop_agent(name)
            raise
        finally:
            channel.close()
        log.info("agent_started", agent=name, kind=kind.value, address=address, pid=process.pid)
        return handle

    def _read_address(self, process: subprocess.Popen[str], name: str, log_path: Path, log_start: int) -> str:
        assert process.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                match = _LISTENING.search(line)
                if match and not found:
                    found.append(match.group(1))
                    break
            # Keep draining so the child never blocks on a full pipe.
            for _ in process.stdout:
                pass

        reader = threading.Thread(target=read, name=f"stdout-{name}", daemon=True)
        reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not found and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        if not found:
            self._terminate(process)
            with log_path.open("rb") as handle:
                handle.seek(log_start)
                tail = handle.read().decode(errors="replace")[-4000:]
            # The caller gets the agent's last words (the error, never a traceback); the whole
            # output stays in the controller's log and the agent's log file.
            lines = [line.strip() for line in tail.splitlines() if line.strip()]
            reason = lines[-1] if lines else "no output"
            log.error("agent_start_failed", agent=name, exit_code=process.poll(), log=str(log_path), output=tail)
            raise Unavailable(
                f"agent {name} did not start (exit code {process.poll()}): {reason[:500]} (its log: {log_path})"
            )
        return found[0]

    @staticmethod
    def _terminate(process: subprocess.Popen[str], grace: float = 5.0) -> None:
        if process.poll() is not None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def stop_agent(self, name: str) -> None:
        with self._lock:
            child = self._children.pop(name, None)
        if child is not None:
            self._terminate(child.process)
            log.info("agent_stopped", agent=name, exit_code=child.process.returncode)

    def agents(self) -> list[AgentHandle]:
        with self._lock:
            return [c.handle for c in self._children.values() if c.process.poll() is None]

    def is_alive(self, name: str) -> bool:
        with self._lock:
            child = self._children.get(name)
        return child is not None and child.process.poll() is None

    def close(self) -> None:
        with self._lock:
            names = list(self._children)
        for name in names:
            self.stop_agent(name)
        if self.topology is not None:
            self.topology.destroy()
