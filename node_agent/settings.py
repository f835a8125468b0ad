"""Node agent settings: `MECBENCH_NODE_AGENT_*` environment variables override the defaults.

Tuples are comma-separated in the environment, e.g.
`MECBENCH_NODE_AGENT_HOST_INTERFACE_ALLOWLIST=mb*,cni*`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mecbench.core.settings import from_env


def default_state_dir() -> Path:
    """Where leases and installed shaping are recorded: a system path for root (a DaemonSet
    mounts it from the host so a restarted agent finds its records), the user's state
    directory otherwise (an unprivileged agent cannot shape, but still serves GPUs and telemetry)."""
    if os.geteuid() == 0:
        return Path("/var/lib/mecbench/node-agent")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mecbench" / "node-agent"


KUBELET_POD_RESOURCES_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")


@dataclass
class NodeAgentSettings:
    # Reported node name; "" = this machine's hostname.
    node_name: str = ""
    # Holds the sqlite database of leases, shaping and GPU allocations. Agents that share it
    # (a restarted one, or several on one machine) share one view of what MECBench installed.
    state_dir: Path = field(default_factory=default_state_dir)
    # Interfaces of the agent's own (host) network namespace that may be shaped, as fnmatch
    # patterns. The uplink (eth*, en*, wl*, bond*) is deliberately absent: shaping it by mistake
    # cuts the node off. Only MECBench's own interfaces match (the netns topology names its
    # host-side veths mb<name>m<i>/mb<name>d<i>): `veth*` would match every container runtime's
    # and CNI's veths, other tenants' pods included.
    host_interface_allowlist: tuple[str, ...] = ("mb*",)
    # Interfaces inside any other network namespace (pods, the netns topology's nodes), which
    # cannot carry the node's uplink.
    netns_interface_allowlist: tuple[str, ...] = ("*",)
    # Which other namespaces may be shaped at all: named ones (and /run/netns paths) by name,
    # pods by their Kubernetes namespace. MECBench's own (the netns topology's "mb-*", the
    # controller's "mecbench" pods) match; another program's namespaces are not the agent's to touch.
    netns_name_allowlist: tuple[str, ...] = ("mb*", "mec*")
    pod_namespace_allowlist: tuple[str, ...] = ("mecbench*",)
    # Never shaped, whatever the allowlists say.
    interface_denylist: tuple[str, ...] = ("lo",)
    # Lease length when a request gives none, and the longest one granted.
    default_lease_s: float = 60.0
    # A holder renews its lease every few seconds; an hour bounds what a holder that vanished
    # without clearing can leave behind.
    max_lease_s: float = 3600.0
    # How often the reaper looks for lapsed leases (removal happens within this of expiry).
    reaper_interval_s: float = 0.2
    # How pods are resolved to their sandbox's network namespace: "proc" scans
    # <proc_root>/*/cgroup for the pod UID (in a DaemonSet: the host's /proc mounted at proc_root);
    # "runtime" reads the container runtime's records (containerd, k3s, CRI-O; see
    # MECBENCH_NODE_AGENT_RUNTIME_BUNDLE_ROOTS); "auto" tries proc, then runtime; "disabled" refuses pods.
    pod_resolver: Literal["proc", "runtime", "auto", "disabled"] = "proc"
    proc_root: Path = field(default_factory=lambda: Path("/proc"))
    # Probe the kernel's qdisc support at start (in a scratch namespace). Off: assume nothing works.
    probe_kernel: bool = True
    # Also list interfaces of named namespaces (/var/run/netns) in GetNodeInfo.
    list_named_netns: bool = True
    # gRPC worker threads; every open StreamTelemetry holds one.
    max_workers: int = field(default=32, metadata={"min": 1})
    # Shortest telemetry interval accepted.
    min_telemetry_interval_s: float = 0.05
    # Placement (PlaceProcess): which cgroup version confines processes ("auto": v1 where its cpu
    # or memory hierarchy is mounted, else v2), and the group every placement's group is made in,
    # at each hierarchy's root.
    cgroup_version: Literal["auto", "v1", "v2"] = "auto"
    cgroup_parent: str = "mecbench"
    # Which processes a request may place, as fnmatch patterns over the command line (arguments
    # joined by spaces): the SUT agents the local backend starts. A request names a PID; without
    # this any process of the node could be confined. PID 1 and the agent itself never are.
    placeable_processes: tuple[str, ...] = ("* -m mecbench sut-agent *",)
    # GPUs this node has by declaration instead of NVML discovery, each "<uuid>" or "<uuid>=<name>":
    # for nodes whose GPUs are assigned outside NVML's view, and for tests on machines without a
    # GPU. Reported as declared (NodeInfo label "gpus"), never as discovered.
    declared_gpus: tuple[str, ...] = ()
    # The kubelet's pod-resources socket (the DaemonSet mounts its folder): the GPUs a pod was
    # given are read there; where it is missing, from NVML's process lists.
    pod_resources_socket: Path | None = field(default_factory=lambda: KUBELET_POD_RESOURCES_SOCKET)
    # Prometheus /metrics on the gRPC server's host: -1 off, 0 any free port (logged as
    # metrics_listening), else that port.
    metrics_port: int = -1

    @classmethod
    def load(cls, **overrides: object) -> NodeAgentSettings:
        return from_env(cls, "MECBENCH_NODE_AGENT_", None, **overrides)
