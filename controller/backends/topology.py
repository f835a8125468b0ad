"""A namespaced local topology: an edge node, client nodes and SUT nodes on one machine.

The SUT agent runs in the edge namespace; each LoadGen client runs in a client namespace of its
own. Each client reaches the edge over a data veth pair (the path that traffic shaping sits on);
every namespace also has a management veth to the root namespace, over which the controller
talks to the agents, so shaping the data path never slows the control path.

SUT nodes (`sut_nodes`, 0 unless asked for) hold the workers of a cluster SUT (SutConfig.cluster)
whose head is the edge's SUT agent: each is joined to the edge by a cluster veth pair of its own
(`member<j>` in the edge, `cluster0` in the SUT node), which shaping can target like a data link
(inter-node bandwidth is a real factor for tensor parallelism). A SUT node routes the whole
cluster subnet through the edge, which forwards between SUT nodes.

Address plan for topology slot `t` (0..63), node `i` (0 = edge, 1..n = clients, n+j = SUT node j)
and SUT node `j` (1..k), each link a /30:
  management: 10.232.t.(4i+1) root side, 10.232.t.(4i+2) namespace side
  data:       10.231.t.(4i+1) edge side, 10.231.t.(4i+2) client side   (1 <= i <= n)
  cluster:    10.233.t.(4j+1) edge side, 10.233.t.(4j+2) SUT node side (1 <= j <= k)
The head advertises the edge's address on the first cluster link, 10.233.t.5.
All configuration goes through netlink (pyroute2); nothing shells out to `ip`.

Nothing outlives its owner: the controller that creates a topology holds an exclusive lock on
it (`/run/mecbench/topology-NAME.lock`, released by the kernel when it dies, however it dies)
and starts a reaper process that waits on a pipe from it. When the controller is gone the pipe
closes and the reaper removes the namespaces (and with their veths every qdisc on them), unless
a new controller holds the lock by then. A controller that finds namespaces of its name that no
live owner holds removes and rebuilds them rather than failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

from mecbench.core.errors import FailedPrecondition, InvalidArgument
from mecbench.core.logging import get_logger
from mecbench.core.netns import NETNS_DIR

log = get_logger("mecbench.controller.topology")

MAX_SLOTS = 64
MAX_CLIENTS = 62
# Clients and SUT nodes share the management plan: 4 * (clients + sut_nodes) + 2 <= 254.
MAX_NODES = 63
LOCK_DIR = Path("/run/mecbench")
_REAPER_LOCK_WAIT_S = 10.0


def _try_lock(name: str) -> int | None:
    """An open descriptor holding topology `name`'s exclusive lock, or None when a live process
    holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(LOCK_DIR / f"topology-{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    return descriptor


@dataclass(frozen=True)
class NodeLinks:
    """One namespace of the topology and its addresses."""

    netns: str
    management_ip: str  # namespace side; agents listen on 0.0.0.0, the controller dials this
    data_ip: str  # edge: unused; client: its address on the data link
    data_interface: str  # name of the data veth inside this namespace ("" for the edge)


@dataclass
class NetnsTopology:
    name: str
    slot: int
    clients: int
    sut_nodes: int = 0
    edge: NodeLinks = field(init=False)
    client_nodes: list[NodeLinks] = field(init=False)
    # SUT node j (1-based) is sut_node_links[j - 1]; its data_ip/data_interface are its cluster link's.
    sut_node_links: list[NodeLinks] = field(init=False)
    created: bool = False
    _lock: int | None = field(default=None, init=False, repr=False)
    _reaper: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.slot < MAX_SLOTS:
            raise InvalidArgument(f"must be 0..{MAX_SLOTS - 1}", field="topology.slot")
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise InvalidArgument(f"must be 1..{MAX_CLIENTS}", field="topology.clients")
        if not self.name.isalnum() or len(self.name) > 8:
            raise InvalidArgument("1-8 letters or digits", field="topology.name")
        if not 0 <= self.sut_nodes <= MAX_NODES - self.clients:
            raise InvalidArgument(f"clients and SUT nodes together are at most {MAX_NODES}", field="topology.sut_nodes")
        self.edge = NodeLinks(f"mb-{self.name}-edge", self._ip("232", 0, 2), "", "")
        self.client_nodes = [
            NodeLinks(f"mb-{self.name}-c{i}", self._ip("232", i, 2), self._ip("231", i, 2), "data0")
            for i in range(1, self.clients + 1)
        ]
        self.sut_node_links = [
            NodeLinks(f"mb-{self.name}-s{j}", self._ip("232", self.clients + j, 2), self._ip("233", j, 2), "cluster0")
            for j in range(1, self.sut_nodes + 1)
        ]

    def _ip(self, net: str, node: int, host: int) -> str:
        return f"10.{net}.{self.slot}.{4 * node + host}"

    def edge_data_ip(self, client: int) -> str:
        """Where client `client` (0-based) reaches the edge over its data link."""
        return self._ip("231", client + 1, 1)

    def edge_data_interface(self, client: int) -> str:
        """The edge-side veth of client `client`'s data link (shape here for the SUT side)."""
        return f"data{client + 1}"

    def edge_cluster_ip(self) -> str:
        """The address the cluster's head (the edge's SUT agent) advertises to SUT nodes."""
        return self._ip("233", 1, 1)

    def edge_cluster_interface(self, node: int) -> str:
        """The edge-side veth of SUT node `node`'s (1-based) cluster link."""
        return f"member{node}"

    def _all_nodes(self) -> list[NodeLinks]:
        return [self.edge, *self.client_nodes, *self.sut_node_links]

    def _root_links(self) -> list[str]:
        """Names the topology's veths have in the root namespace (before their move, or left over)."""
        management = [f"mb{self.name}m{index}" for index in range(self.clients + self.sut_nodes + 1)]
        data = [f"mb{self.name}d{index}" for index in range(self.clients + 1)]
        return management + data + [f"mb{self.name}s{j}" for j in range(1, self.sut_nodes + 1)]

    # --- lifecycle ---------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Namespaces and root-side links of this topology's name that exist now."""
        found = [n.netns for n in self._all_nodes() if os.path.exists(os.path.join(NETNS_DIR, n.netns))]
        with IPRoute() as root:
            found += [name for name in self._root_links() if root.link_lookup(ifname=name)]
        return found

    def create(self) -> None:
        if os.geteuid() != 0:
            raise FailedPrecondition("the netns topology needs root (network namespaces and veth pairs)")
        if self._lock is None:
            self._lock = _try_lock(self.name)
            if self._lock is None:
                raise FailedPrecondition(
                    f"topology {self.name!r} is in use by a running controller "
                    f"({LOCK_DIR}/topology-{self.name}.lock); give this one another topology_name and slot"
                )
        leftovers = self.leftovers()
        if leftovers:
            # Nobody alive holds the lock: a controller that died left these. Rebuild.
            log.warning("topology_leftovers_removed", name=self.name, leftovers=leftovers)
            self._remove()
        try:
            nodes = self._all_nodes()
            for node in nodes:
                netns.create(node.netns)
                with NetNS(node.netns) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            with IPRoute() as root:
                for index, node in enumerate(nodes):
                    host_side = f"mb{self.name}m{index}"
                    self._veth(root, host_side, "mgmt0", node.netns)
                    root_index = root.link_lookup(ifname=host_side)[0]
                    root.addr("add", index=root_index, address=self._ip("232", index, 1), prefixlen=30)
                    root.link("set", index=root_index, state="up")
                    self._configure(node.netns, "mgmt0", self._ip("232", index, 2))
                for index, node in enumerate(self.client_nodes, start=1):
                    temp = f"mb{self.name}d{index}"
                    self._veth(root, temp, node.data_interface, node.netns)
                    # Move the edge end into the edge namespace under its final name.
                    root.link("set", index=root.link_lookup(ifname=temp)[0], net_ns_fd=self.edge.netns)
                    with NetNS(self.edge.netns) as edge:
                        edge_index = edge.link_lookup(ifname=temp)[0]
                        edge.link("set", index=edge_index, ifname=f"data{index}")
                    self._configure(self.edge.netns, f"data{index}", self._ip("231", index, 1))
                    self._configure(node.netns, node.data_interface, node.data_ip)
                for j, node in enumerate(self.sut_node_links, start=1):
                    temp = f"mb{self.name}s{j}"
                    self._veth(root, temp, node.data_interface, node.netns)
                    root.link("set", index=root.link_lookup(ifname=temp)[0], net_ns_fd=self.edge.netns)
                    with NetNS(self.edge.netns) as edge:
                        edge.link("set", index=edge.link_lookup(ifname=temp)[0], ifname=self.edge_cluster_interface(j))
                    self._configure(self.edge.netns, self.edge_cluster_interface(j), self._ip("233", j, 1))
                    self._configure(node.netns, node.data_interface, node.data_ip)
                    with NetNS(node.netns) as ns:
                        # Every member is reached through the edge (the head is there; it forwards).
                        ns.route("add", dst=f"10.233.{self.slot}.0/24", gateway=self._ip("233", j, 1))
            if self.sut_nodes > 1:
                _enable_forwarding(self.edge.netns)
            self.created = True
            self._start_reaper()
            log.info("topology_created", name=self.name, clients=self.clients, sut_nodes=self.sut_nodes,
                     slot=self.slot)
        except Exception:
            self.destroy()
            raise

    def _start_reaper(self) -> None:
        """A process that removes the topology once this one is gone (see the module docstring)."""
        with (LOCK_DIR / f"topology-{self.name}.reaper.log").open("ab") as log_file:
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "controller.backends.topology", self.name, str(self.slot), str(self.clients),
                 str(self.sut_nodes)],
                stdin=subprocess.PIPE, stdout=log_file, stderr=log_file, start_new_session=True,
            )

    @staticmethod
    def _veth(root: IPRoute, name: str, peer: str, peer_netns: str) -> None:
        root.link("add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_netns})

    @staticmethod
    def _configure(namespace: str, interface: str, address: str) -> None:
        with NetNS(namespace) as ns:
            index = ns.link_lookup(ifname=interface)[0]
            ns.addr("add", index=index, address=address, prefixlen=30)
            ns.link("set", index=index, state="up")

    def destroy(self) -> None:
        """Remove the namespaces (their veths go with them) and any root-side leftovers, then
        let the reaper and the lock go."""
        self._remove()
        # The lock first: the reaper, once its pipe closes, takes it at once, finds nothing left
        # and exits (holding the lock meanwhile kept it waiting its full 10 s on every stop).
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._reaper is not None:
            reaper, self._reaper = self._reaper, None
            if reaper.stdin is not None:
                with contextlib.suppress(OSError):
                    reaper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.wait(10)

    def _remove(self) -> None:
        with IPRoute() as root:
            for name in self._root_links():
                for link in root.link_lookup(ifname=name):
                    with contextlib.suppress(Exception):
                        root.link("del", index=link)
        for node in self._all_nodes():
            if os.path.exists(os.path.join(NETNS_DIR, node.netns)):
                with contextlib.suppress(Exception):
                    netns.remove(node.netns)
        self.created = False


def _enable_forwarding(namespace: str) -> None:
    """IPv4 forwarding in `namespace` (a sysctl of the namespace: written by a child that entered
    it, as a thread of this process must not move between namespaces)."""
    code = (
        "import sys; from mecbench.core.netns import enter_netns; enter_netns(sys.argv[1]); "
        "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"
    )
    done = subprocess.run([sys.executable, "-c", code, namespace], capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace")[-300:]
        raise FailedPrecondition(f"cannot enable forwarding in {namespace}: {why}")


def _reap_when_owner_is_gone(name: str, slot: int, clients: int, sut_nodes: int = 0) -> None:
    """The reaper: wait for the owner's pipe to close, then remove the topology unless a live
    controller holds it again."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    # Processes the owner forked without exec (pyroute2's namespace helpers) hold its lock for
    # a moment after it died: wait for them, but not for a new controller that took it over.
    deadline = time.monotonic() + _REAPER_LOCK_WAIT_S
    lock = _try_lock(name)
    while lock is None and time.monotonic() < deadline:
        time.sleep(0.1)
        lock = _try_lock(name)
    if lock is None:
        log.info("topology_held_by_another_controller", name=name)
        return
    try:
        topology = NetnsTopology(name, slot, clients, sut_nodes)
        if topology.leftovers():
            log.warning("topology_reaped", name=name, leftovers=topology.leftovers())
            topology._remove()
    finally:
        os.close(lock)


if __name__ == "__main__":
    _reap_when_owner_is_gone(
        sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0
    )
