"""The controller's view of its agents: deployed SUTs, LoadGen servers and their open sessions.

Sessions are kept open across runs and repeats (the point of the LoadGen server): a session is
keyed by the LoadGen server, the SUT address, the dataset and the data-plane options, so the
dataset is loaded and the connection made once.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import dataclass, field

from controller.agent_clients import (
    SLOW_CALL_TIMEOUT_S,
    AgentConnector,
    GrpcAgentConnector,
    LoadGenAgentClient,
    NodeAgentClient,
    SutAgentClient,
)
from controller.backends.base import AgentHandle, AgentKind, DeploymentBackend
from mecbench.core import durations
from mecbench.core.errors import (
    FailedPrecondition,
    MecbenchError,
    NotFound,
    Unavailable,
)
from mecbench.core.logging import get_logger
from mecbench.core.sut_config import HEAD_MEMBER
from mecbench.v1 import (
    common_pb2,
    controller_pb2,
    loadgen_agent_pb2,
    node_agent_pb2,
    sut_agent_pb2,
)

log = get_logger("mecbench.controller.agents")

DEFAULT_LOADGEN = "loadgen-default"
# A SUT's placement (cgroups, GPUs) is held by a lease the pool renews: if this controller dies,
# the node agent releases it this long after the last renewal.
PLACEMENT_LEASE_S = 30.0
PLACEMENT_RENEW_S = 5.0
# How long a cluster's members may take to start and join, unless the config says.
CLUSTER_JOIN_TIMEOUT_S = 120.0


def wants_placement(config: sut_agent_pb2.SutConfig) -> bool:
    """Whether serving `config` asks for CPU, memory or GPUs the SUT must be confined to."""
    resources, gpus = config.resources, config.gpus
    return bool(resources.cpu_cores or resources.memory_bytes or resources.cpus or resources.exclusive_cpus
                or gpus.count or gpus.uuids or gpus.indices)


def same_placement(old: sut_agent_pb2.SutConfig, new: sut_agent_pb2.SutConfig) -> bool:
    return old.resources == new.resources and old.gpus == new.gpus


def member_config(member: sut_agent_pb2.SutMember) -> sut_agent_pb2.SutConfig:
    """A cluster worker's placement request, as a SutConfig (what placement reads of one)."""
    return sut_agent_pb2.SutConfig(resources=member.resources, gpus=member.gpus, node_selector=member.node_selector)


@dataclass
class MemberHandle:
    """A worker of a cluster SUT: its own SUT agent, running the cluster runtime's worker process."""

    name: str
    agent: AgentHandle
    client: SutAgentClient
    spec: sut_agent_pb2.SutMember
    # The address the other members reach it at.
    host: str = ""
    placement: node_agent_pb2.Placement | None = None


@dataclass
class SutHandle:
    sut_id: str
    agent: AgentHandle
    config: sut_agent_pb2.SutConfig
    client: SutAgentClient
    ephemeral: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    held_by: str = ""
    # Where the node agent confined the SUT agent (and the server it starts); None = not placed.
    placement: node_agent_pb2.Placement | None = None
    # Why the placement cannot be vouched for any more (its lease was lost); "" while it holds.
    placement_lost: str = ""
    # Cluster SUTs (config.cluster): the workers in order (this handle's agent is the head), the
    # address the head advertises to them and where its runtime listens.
    workers: list[MemberHandle] = field(default_factory=list)
    head_host: str = ""
    head_address: str = ""

    @property
    def is_cluster(self) -> bool:
        return self.config.HasField("cluster")


@dataclass
class LoadGenHandle:
    loadgen_id: str
    agent: AgentHandle
    client: LoadGenAgentClient
    sessions: dict[str, str] = field(default_factory=dict)  # session key -> session id


@dataclass
class NodeAgentHandle:
    agent: AgentHandle
    client: NodeAgentClient


class AgentPool:
    def __init__(
        self, backend: DeploymentBackend, node_agent_env: dict[str, str] | None = None,
        connector: AgentConnector | None = None,
    ) -> None:
        """`connector` makes the clients of the agents the backend starts (gRPC unless a test
        gives in-memory fakes)."""
        self.backend = backend
        self.connector: AgentConnector = connector or GrpcAgentConnector()
        self.node_agent_env = node_agent_env or {}
        self._suts: dict[str, SutHandle] = {}
        self._loadgens: dict[str, LoadGenHandle] = {}
        self._node: NodeAgentHandle | None = None
        self._nodes: dict[str, NodeAgentHandle] = {}
        # Nodes whose node agent could not be found for reading a member pod's placement.
        self._nodes_without_agent: set[str] = set()
        self._lock = threading.RLock()
        self._renewer_stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # --- node agents ------------------------------------------------------------------------

    def node_agent(self) -> NodeAgentHandle:
        """This node's agent, started on first use (shaping, GPUs, telemetry)."""
        with self._lock:
            if self._node is not None and self.backend.is_alive(self._node.agent.name):
                return self._node
            if self._node is not None:
                self._node.client.close()
            agent = self.backend.start_agent(AgentKind.NODE, "node-agent", env=self.node_agent_env)
            self._node = NodeAgentHandle(agent, self.connector.node(agent))
            return self._node

    def node_agent_on(self, node: str) -> NodeAgentHandle:
        """The node agent of `node` (cluster backends run one per node); "" is this node's."""
        if not node:
            return self.node_agent()
        with self._lock:
            handle = self._nodes.get(node)
            if handle is not None and self.backend.is_alive(handle.agent.name):
                return handle
            if handle is not None:
                handle.client.close()
            agent = self.backend.start_agent(AgentKind.NODE, f"node-agent-{node}", placement=node)
            handle = NodeAgentHandle(agent, self.connector.node(agent))
            self._nodes[node] = handle
            return handle

    def node_infos(self) -> list[common_pb2.NodeInfo]:
        node = self.node_agent()
        info = node.client.get_node_info()
        info.agent_address = node.agent.address
        return [info]

    # --- SUTs -------------------------------------------------------------------------------

    def deploy_sut(self, sut_id: str, config: sut_agent_pb2.SutConfig, ephemeral: bool = False) -> SutHandle:
        with self._lock:
            existing = self._suts.get(sut_id)
        if existing is not None and (existing.is_cluster or config.HasField("cluster")):
            if existing.config == config and not self.cluster_failure(existing):
                return existing
            if existing.held_by:
                raise FailedPrecondition(f"SUT {sut_id!r} is in use by run {existing.held_by}: its cluster cannot "
                                         "change now")
            # A cluster is redeployed as a whole: a new config, or a member that failed.
            self.remove_sut(sut_id)
            existing = None
        if config.HasField("cluster"):
            return self._deploy_cluster(sut_id, config, ephemeral)
        if existing is not None and not existing.held_by and not self.backend.is_alive(existing.agent.name):
            # Its agent died (killed, crashed): forget it and start a fresh one under the same id.
            log.warning("sut_agent_gone", sut_id=sut_id, agent=existing.agent.name)
            self.remove_sut(sut_id)
            existing = None
        if existing is not None and self._places() and not same_placement(existing.config, config):
            # A placement is the agent process's: other limits take a new agent.
            if existing.held_by:
                raise FailedPrecondition(
                    f"SUT {sut_id!r} is in use by run {existing.held_by}: its resources and GPUs cannot change now"
                )
            self.remove_sut(sut_id)
            existing = None
        if existing is not None and existing.config != config and not existing.held_by \
                and self.backend.needs_new_sut_agent(existing.config, config):
            # A pod's image, resources or GPUs cannot change in place: a new agent serves it.
            self.remove_sut(sut_id)
            existing = None
        if existing is not None:
            if existing.config != config:
                self._start_backend(existing, config, restart=True)
            return existing
        placed = self._places() and wants_placement(config)
        if placed:
            # Refused here, before any process starts, when this node cannot confine it as asked.
            self.check_placement(config, f"sut-{sut_id}")
        agent = self.backend.start_sut_agent(f"sut-{sut_id}", config, placement=self.backend.sut_placement())
        handle = SutHandle(sut_id, agent, config, self.connector.sut(agent, f"SUT agent {sut_id}"), ephemeral)
        try:
            if placed:
                # Before the backend starts: the server the agent starts is born inside.
                self._place(handle, config)
            self._start_backend(handle, config, restart=False)
        except BaseException:
            handle.client.close()
            self.backend.stop_agent(agent.name)
            self._release_placement(handle)
            raise
        with self._lock:
            self._suts[sut_id] = handle
        return handle

    # --- cluster SUTs: a head (the SUT agent that serves) and workers, each on a node of its own ---

    def _deploy_cluster(self, sut_id: str, config: sut_agent_pb2.SutConfig, ephemeral: bool) -> SutHandle:
        """Start the head's agent and each worker's, place each, then the runtime in order (the
        head, each worker joining it), then the server on the head once every member is up."""
        name = f"sut-{sut_id}"
        if self._places():
            # Refused here, before any process starts, when this node cannot confine a member as asked.
            self.check_placement(config, name)
            for worker in config.cluster.workers:
                self.check_placement(member_config(worker), f"{name}-{worker.name}")
        agent = self.backend.start_sut_agent(name, config, placement=self.backend.sut_placement())
        handle = SutHandle(sut_id, agent, config, self.connector.sut(agent, f"SUT agent {sut_id}"), ephemeral)
        try:
            workers = self.backend.start_sut_workers(name, config)
            for spec, worker_agent in zip(config.cluster.workers, workers, strict=True):
                handle.workers.append(MemberHandle(
                    spec.name, worker_agent,
                    self.connector.sut(worker_agent, f"SUT {sut_id} cluster member {spec.name}"), spec,
                    host=self.backend.cluster_host(worker_agent),
                ))
            if self._places() and wants_placement(config):
                self._place(handle, config)
            for member in handle.workers:
                if self._places() and wants_placement(member_config(member.spec)):
                    member.placement = self._place_process(
                        member_config(member.spec), f"{name}-{member.name}", member.agent.pid
                    )
            join_timeout = durations.to_seconds(config.cluster.join_timeout) or CLUSTER_JOIN_TIMEOUT_S
            handle.head_host = self.backend.cluster_host(agent)
            head = self._start_member(
                handle.client, join_timeout,
                sut_agent_pb2.StartMemberRequest(cluster=config.cluster, role=sut_agent_pb2.MEMBER_ROLE_HEAD,
                                                 member=HEAD_MEMBER, host=handle.head_host),
                handle.placement,
            )
            handle.head_address = head.address
            for member in handle.workers:
                self._start_member(
                    member.client, join_timeout,
                    sut_agent_pb2.StartMemberRequest(
                        cluster=config.cluster, role=sut_agent_pb2.MEMBER_ROLE_WORKER, member=member.name,
                        host=member.host, head_address=head.address,
                    ),
                    member.placement,
                )
            self._start_backend(handle, config, restart=False, join_timeout=join_timeout)
        except BaseException:
            self._stop_cluster(handle)
            raise
        log.info("cluster_sut_deployed", sut_id=sut_id, runtime=config.cluster.runtime, head=handle.head_address,
                 workers=[m.agent.name for m in handle.workers])
        with self._lock:
            self._suts[sut_id] = handle
        return handle

    @staticmethod
    def _start_member(
        client: SutAgentClient, timeout: float,
        request: sut_agent_pb2.StartMemberRequest, placement: node_agent_pb2.Placement | None,
    ) -> sut_agent_pb2.MemberStatus:
        if placement is not None:
            request.visible_gpus.extend(g.uuid for g in placement.applied.gpus)
        return client.start_member(request, timeout=SLOW_CALL_TIMEOUT_S + timeout)

    def _stop_cluster(self, handle: SutHandle) -> None:
        """The reverse of `_deploy_cluster`: the server, the workers (the last first), the head."""
        with contextlib.suppress(MecbenchError):
            handle.client.stop(timeout=30)
        for member in reversed(handle.workers):
            with contextlib.suppress(MecbenchError):
                member.client.stop_member()
            member.client.close()
        self.backend.stop_sut_workers(handle.agent.name, [m.agent for m in handle.workers])
        for member in handle.workers:
            placement, member.placement = member.placement, None
            self._release(placement, f"{handle.sut_id}/{member.name}")
        with contextlib.suppress(MecbenchError):
            handle.client.stop_member()
        handle.client.close()
        self.backend.stop_agent(handle.agent.name)
        self._release_placement(handle)

    def cluster_failure(self, handle: SutHandle) -> str:
        """Why a cluster SUT cannot serve as a whole: the first member (the head first) whose agent
        is gone or whose runtime process failed, named; "" while every member runs, or for a SUT
        that is no cluster."""
        if not handle.is_cluster:
            return ""
        members = [(HEAD_MEMBER, handle.agent, handle.client),
                   *((m.name, m.agent, m.client) for m in handle.workers)]
        for name, agent, client in members:
            if not self.backend.is_alive(agent.name):
                why = self.backend.agent_problem(agent.name)
                return f"cluster member {name} (SUT agent {agent.name}) is not running" + (f": {why}" if why else "")
            try:
                status = client.get_status()
            except MecbenchError as exc:
                return f"cluster member {name} (SUT agent {agent.name}) does not answer: {exc.code.name}"
            member = status.member
            if member.state != sut_agent_pb2.BACKEND_STATE_READY:
                state = sut_agent_pb2.BackendState.Name(member.state).removeprefix("BACKEND_STATE_")
                why = member.message.splitlines()[0] if member.message else "not running"
                return f"cluster member {name} (SUT agent {agent.name}) is {state}: {why}"
        return ""

    def cluster_members(self, handle: SutHandle, placements: bool = False) -> list[controller_pb2.ClusterMember]:
        """Every member of a cluster SUT, the head first, with its node, address and status (and,
        with `placements`, the placement the node agent holds for it now)."""
        if not handle.is_cluster:
            return []
        rows: list[tuple[str, sut_agent_pb2.MemberRole.ValueType, AgentHandle, SutAgentClient, str,
                         sut_agent_pb2.SutConfig, node_agent_pb2.Placement | None]] = [
            (HEAD_MEMBER, sut_agent_pb2.MEMBER_ROLE_HEAD, handle.agent, handle.client, handle.head_host,
             handle.config, handle.placement),
        ]
        rows += [(m.name, sut_agent_pb2.MEMBER_ROLE_WORKER, m.agent, m.client, m.host, member_config(m.spec),
                  m.placement) for m in handle.workers]
        members = []
        for name, role, agent, client, host, config, placement in rows:
            member = controller_pb2.ClusterMember(
                name=name, role=role, endpoint=common_pb2.Endpoint(name=agent.name, address=agent.address),
                node=agent.node, host=host,
            )
            with contextlib.suppress(MecbenchError):
                member.status.CopyFrom(client.get_status(timeout=5).member)
            if placements:
                if placement is not None:
                    now = self._read_placement_id(placement.placement_id)
                elif not self._places() and wants_placement(config):
                    now = self._read_pod_placement(f"{handle.sut_id}/{name}", agent, config)
                else:
                    now = None
                if now is not None:
                    member.placement.CopyFrom(controller_pb2.SutPlacement(
                        requested=config.resources, requested_gpus=config.gpus, applied=now.applied, usage=now.usage,
                    ))
            members.append(member)
        return members

    def member_log(self, member: MemberHandle | SutHandle, offset: int, limit: int) -> bytes:
        """What a cluster member's runtime process wrote since `offset`; b"" when its agent cannot say."""
        parts: list[bytes] = []
        try:
            parts.extend(member.client.get_server_log(
                sut_agent_pb2.GetServerLogRequest(offset=offset, limit=limit, member=True)
            ))
        except MecbenchError as exc:
            log.warning("member_log_unavailable", agent=member.agent.name, code=exc.code.name)
        return b"".join(parts)

    def member_log_size(self, member: MemberHandle | SutHandle) -> int:
        try:
            return int(member.client.get_status().member.log_size)
        except MecbenchError:
            return 0

    # --- placement (the local backend: the node agent confines the SUT agent's process tree) ----

    def _places(self) -> bool:
        # Only a backend whose agents are this node's processes can have them placed by PID; a
        # cluster gives the pod its limits itself.
        return bool(getattr(self.backend, "places_processes", False))

    def _placement_request(
        self, config: sut_agent_pb2.SutConfig, owner: str, pid: int = 0
    ) -> node_agent_pb2.PlaceProcessRequest:
        request = node_agent_pb2.PlaceProcessRequest(
            pid=pid, resources=config.resources, gpus=config.gpus, owner=owner, validate_only=not pid
        )
        request.lease_duration.FromSeconds(int(PLACEMENT_LEASE_S))
        return request

    def check_placement(self, config: sut_agent_pb2.SutConfig, owner: str) -> None:
        """FAILED_PRECONDITION naming what this node lacks when `config`'s resources and GPUs
        cannot be applied as asked; nothing changes either way."""
        if not (self._places() and wants_placement(config)):
            return
        self.node_agent().client.place_process(self._placement_request(config, owner))

    def _place(self, handle: SutHandle, config: sut_agent_pb2.SutConfig) -> None:
        handle.placement = self._place_process(config, f"sut-{handle.sut_id}", handle.agent.pid)

    def _place_process(self, config: sut_agent_pb2.SutConfig, owner: str, pid: int) -> node_agent_pb2.Placement:
        placement = self.node_agent().client.place_process(self._placement_request(config, owner, pid))
        log.info("sut_placed", owner=owner, placement_id=placement.placement_id,
                 pid=pid, cpu_cores=placement.applied.cpu_cores,
                 cpus=list(placement.applied.cpus), memory_bytes=placement.applied.memory_limit_bytes)
        self._start_renewer()
        return placement

    def _read_placement_id(self, placement_id: str) -> node_agent_pb2.Placement | None:
        try:
            return self.node_agent().client.get_placement(placement_id)
        except MecbenchError as exc:
            log.warning("placement_unread", placement_id=placement_id, error=str(exc))
            return None

    def read_placement(self, handle: SutHandle) -> node_agent_pb2.Placement | None:
        """The SUT's placement as the kernel holds it now, with its group's counters; None when
        it is not placed."""
        if handle.placement is None:
            if not self._places() and wants_placement(handle.config):
                return self._read_pod_placement(handle.sut_id, handle.agent, handle.config)
            return None
        return self.node_agent().client.get_placement(handle.placement.placement_id)

    def _read_pod_placement(
        self, owner: str, agent: AgentHandle, config: sut_agent_pb2.SutConfig
    ) -> node_agent_pb2.Placement | None:
        """On a cluster the kubelet confines a SUT's pod (or a cluster member's) from its requests
        and limits; the node agent of the pod's node reads back what the pod got. None (and a
        warning) where it cannot be read: the result then records no placement rather than the
        request as if applied."""
        try:
            pods = [p for p in self.backend.sut_shaping_points("sut", 0, agent) if p.pod is not None]
        except MecbenchError:
            return None
        if not pods:
            return None
        point = pods[0]
        assert point.pod is not None
        node = self._known_node_agent(point.node)
        if node is None and point.node and self._node is not None and point.node not in self._nodes_without_agent:
            # A cluster member on a node of its own: node agents run here (one is in use), one
            # per node, so its node's is found (nothing else reaches it in a run without shaping).
            # A node where none could be found is not waited for again at every repeat.
            try:
                node = self.node_agent_on(point.node)
            except MecbenchError as exc:
                self._nodes_without_agent.add(point.node)
                log.warning("pod_placement_unread", sut_id=owner, pod=point.pod.name, error=str(exc))
                return None
        if node is None:
            # Never waits for one to appear (a cluster without the DaemonSet): telemetry and
            # shaping find the node's agent when the run has any.
            log.info("pod_placement_unread", sut_id=owner, pod=point.pod.name, reason="no node agent in use")
            return None
        reference = node_agent_pb2.PodReference(namespace=point.pod.namespace, name=point.pod.name, uid=point.pod.uid)
        try:
            reply = node.client.get_pod_placement(reference)
        except MecbenchError as exc:
            log.warning("pod_placement_unread", sut_id=owner, pod=point.pod.name, error=str(exc))
            return None
        return node_agent_pb2.Placement(
            pid=reply.applied.pids[0] if reply.applied.pids else 0, resources=config.resources,
            gpus=config.gpus, applied=reply.applied, usage=reply.usage,
        )

    def _known_node_agent(self, node: str) -> NodeAgentHandle | None:
        """The node agent of `node` this pool already talks to, if it is alive; never starts one."""
        with self._lock:
            known = [self._nodes.get(node)] if node else []
            known.append(self._node)
        for handle in known:
            if handle is not None and (not node or node in (handle.agent.node, handle.agent.placement)) \
                    and self.backend.is_alive(handle.agent.name):
                return handle
        return None

    def _release_placement(self, handle: SutHandle) -> None:
        placement, handle.placement = handle.placement, None
        self._release(placement, handle.sut_id)

    def _release(self, placement: node_agent_pb2.Placement | None, sut_id: str) -> None:
        if placement is None:
            return
        try:
            self.node_agent().client.release_placement(placement.placement_id)
        except MecbenchError as exc:
            # Its lease still lapses on the node agent: a placement never outlives its SUT for long.
            log.error("release_placement_failed", sut_id=sut_id, placement_id=placement.placement_id,
                      error=str(exc))

    def _start_renewer(self) -> None:
        with self._lock:
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_placements, name="placement-leases", daemon=True)
                self._renewer.start()

    def _renew_placements(self) -> None:
        while not self._renewer_stop.wait(PLACEMENT_RENEW_S):
            with self._lock:
                placed = [h for h in self._suts.values() if h.placement is not None and not h.placement_lost]
                # A cluster's workers have placements of their own, vouched for with the SUT's.
                placed_workers = [
                    (h, m.placement) for h in self._suts.values() for m in h.workers
                    if m.placement is not None and not h.placement_lost
                ]
            leases: list[tuple[SutHandle, node_agent_pb2.Placement | None]] = [(h, h.placement) for h in placed]
            for handle, placement in [*leases, *placed_workers]:
                if placement is None:
                    continue
                request = node_agent_pb2.RenewLeaseRequest(lease_id=placement.lease.lease_id)
                request.lease_duration.FromSeconds(int(PLACEMENT_LEASE_S))
                try:
                    self.node_agent().client.renew_lease(request)
                except MecbenchError as exc:
                    log.warning("placement_renewal_failed", sut_id=handle.sut_id, error=str(exc))
                    if isinstance(exc, NotFound):
                        handle.placement_lost = (
                            f"the node agent no longer holds SUT {handle.sut_id}'s placement "
                            f"{placement.placement_id} (its lease lapsed)"
                        )

    @staticmethod
    def _start_backend(
        handle: SutHandle, config: sut_agent_pb2.SutConfig, restart: bool, join_timeout: float = 0.0
    ) -> None:
        """Start (or restart) the SUT's backend; a cluster's head waits up to `join_timeout` more
        for its members to join."""
        request = sut_agent_pb2.StartRequest(config=config, restart=restart)
        if handle.placement is not None:
            # The GPUs the node agent allocated, by UUID: the served process sees only these.
            request.visible_gpus.extend(g.uuid for g in handle.placement.applied.gpus)
        handle.client.start(request, timeout=SLOW_CALL_TIMEOUT_S + join_timeout)
        handle.config = config

    def get_sut(self, sut_id: str) -> SutHandle:
        with self._lock:
            handle = self._suts.get(sut_id)
        if handle is None:
            raise NotFound(f"SUT {sut_id!r} is not deployed")
        return handle

    def remove_sut(self, sut_id: str) -> None:
        with self._lock:
            handle = self._suts.pop(sut_id, None)
        if handle is None:
            return
        if handle.is_cluster:
            self._stop_cluster(handle)
        else:
            with contextlib.suppress(MecbenchError):  # the process is stopped next either way
                handle.client.stop()
            handle.client.close()
            self.backend.stop_agent(handle.agent.name)
            self._release_placement(handle)
        with self._lock:
            for loadgen in self._loadgens.values():
                for key in [k for k in loadgen.sessions if k.startswith(handle.agent.address + "|")]:
                    session_id = loadgen.sessions.pop(key)
                    self._close_session(loadgen, session_id)

    def sut_deployment(self, handle: SutHandle) -> controller_pb2.SutDeployment:
        deployment = controller_pb2.SutDeployment(
            sut_id=handle.sut_id,
            config=handle.config,
            endpoint=common_pb2.Endpoint(name=handle.agent.name, address=handle.agent.address),
            node=handle.agent.node,
            held_by_run_id=handle.held_by,
            members=self.cluster_members(handle),
        )
        try:
            deployment.status.CopyFrom(handle.client.get_status(timeout=5))
        except MecbenchError as exc:
            deployment.status.message = f"unreachable: {exc.code.name}"
        return deployment

    def sut_status(self, handle: SutHandle) -> sut_agent_pb2.SutStatus:
        return handle.client.get_status()

    def sut_serving(self, handle: SutHandle) -> sut_agent_pb2.SutStatus:
        """The SUT's status when it can serve a test; FAILED_PRECONDITION saying why when not."""
        status = self.sut_status(handle)
        if status.state != sut_agent_pb2.BACKEND_STATE_READY:
            state = sut_agent_pb2.BackendState.Name(status.state).removeprefix("BACKEND_STATE_")
            raise FailedPrecondition(f"SUT {handle.sut_id} is {state}: {status.message or 'not ready'}")
        return status

    def sut_failure(self, handle: SutHandle) -> str:
        """Why the SUT's backend stopped serving (its server died or hangs); "" while it serves."""
        status = self.sut_status(handle)
        if status.state == sut_agent_pb2.BACKEND_STATE_FAILED:
            return status.message or "failed"
        return ""

    def sut_server_log(self, handle: SutHandle, offset: int, limit: int) -> bytes:
        """What the SUT's external server wrote since `offset`; b"" when the agent cannot say (a
        log is worth keeping, never worth failing a measured run for)."""
        parts: list[bytes] = []
        try:
            parts.extend(handle.client.get_server_log(sut_agent_pb2.GetServerLogRequest(offset=offset, limit=limit)))
        except MecbenchError as exc:
            log.warning("server_log_unavailable", sut=handle.sut_id, code=exc.code.name)
        return b"".join(parts)

    def sut_stats(self, handle: SutHandle, reset: bool) -> sut_agent_pb2.SutStats:
        return handle.client.get_stats(reset)

    # --- LoadGen servers and sessions -------------------------------------------------------

    def loadgen_for_client(self, client: int, loadgen_id: str = "") -> LoadGenHandle:
        """The LoadGen server client `client` runs on: the named one, the shared default, or (in a
        topology with client nodes) the one on that client's node."""
        placement = self.backend.loadgen_placement(client)
        if loadgen_id:
            return self.deploy_loadgen(loadgen_id)
        return self.deploy_loadgen(f"loadgen-{placement}" if placement else DEFAULT_LOADGEN, placement)

    def deploy_loadgen(self, loadgen_id: str = DEFAULT_LOADGEN, placement: str = "") -> LoadGenHandle:
        with self._lock:
            existing = self._loadgens.get(loadgen_id)
            if existing is not None and self.backend.is_alive(existing.agent.name):
                return existing
        if existing is not None:
            self.forget_loadgen(loadgen_id)
        agent = self.backend.start_agent(AgentKind.LOADGEN, loadgen_id, placement=placement)
        handle = LoadGenHandle(loadgen_id, agent, self.connector.loadgen(agent, f"LoadGen agent {loadgen_id}"))
        with self._lock:
            self._loadgens[loadgen_id] = handle
        return handle

    def forget_loadgen(self, loadgen_id: str) -> None:
        with self._lock:
            handle = self._loadgens.pop(loadgen_id, None)
        if handle is not None:
            handle.client.close()
            self.backend.stop_agent(handle.agent.name)

    def session_for(
        self,
        loadgen: LoadGenHandle,
        sut: SutHandle,
        dataset: common_pb2.DatasetSpec,
        data_plane: loadgen_agent_pb2.DataPlaneOptions,
        client: int,
        owner: str,
    ) -> tuple[str, bool]:
        """An open session for this SUT, dataset and client slot; (session id, newly opened)."""
        sut_address = self.backend.sut_address_for(sut.agent, client)
        key = "|".join(
            [
                sut.agent.address,
                dataset.SerializeToString(deterministic=True).hex(),
                data_plane.SerializeToString(deterministic=True).hex(),
                str(client),
            ]
        )
        with self._lock:
            session_id = loadgen.sessions.get(key)
        if session_id is not None:
            return session_id, False
        request = loadgen_agent_pb2.OpenSessionRequest(
            sut_address=sut_address,
            dataset=dataset,
            data_plane=data_plane,
            label=f"client-{client}",
            owner=owner,
        )
        session = loadgen.client.open_session(request)
        with self._lock:
            loadgen.sessions[key] = session.session_id
        return session.session_id, True

    def drop_session(self, loadgen: LoadGenHandle, session_id: str) -> None:
        """Forget (and close) a session that failed, so the next run opens a fresh one."""
        with self._lock:
            for key, value in list(loadgen.sessions.items()):
                if value == session_id:
                    del loadgen.sessions[key]
        self._close_session(loadgen, session_id)

    @staticmethod
    def _close_session(loadgen: LoadGenHandle, session_id: str) -> None:
        with contextlib.suppress(MecbenchError):  # already gone is fine
            loadgen.client.close_session(session_id)

    def loadgen_deployment(self, handle: LoadGenHandle) -> controller_pb2.LoadGenDeployment:
        return controller_pb2.LoadGenDeployment(
            loadgen_id=handle.loadgen_id,
            endpoint=common_pb2.Endpoint(name=handle.agent.name, address=handle.agent.address),
            node=handle.agent.node,
        )

    def check_alive(self, handle: SutHandle | LoadGenHandle) -> None:
        if isinstance(handle, SutHandle) and handle.is_cluster:
            failure = self.cluster_failure(handle)
            if failure:
                raise Unavailable(failure)
        if not self.backend.is_alive(handle.agent.name):
            kind = "SUT agent" if isinstance(handle, SutHandle) else "LoadGen agent"
            raise Unavailable(f"{kind} {handle.agent.name} is not running")

    @staticmethod
    def hold_sut(handle: SutHandle, run_id: str, wait: bool, cancelled: threading.Event) -> bool:
        """Take the SUT for a run: wait for it (queue) or refuse naming the holder.

        Returns False when the run was cancelled while it waited.
        """
        if not wait:
            if not handle.lock.acquire(blocking=False):
                raise FailedPrecondition(f"SUT {handle.sut_id!r} is in use by run {handle.held_by}")
        else:
            while not handle.lock.acquire(timeout=0.1):
                if cancelled.is_set():
                    return False
        handle.held_by = run_id
        return True

    @staticmethod
    def release_sut(handle: SutHandle, run_id: str) -> None:
        if handle.held_by == run_id:
            handle.held_by = ""
            handle.lock.release()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    def close(self) -> None:
        with self._lock:
            loadgens = list(self._loadgens)
            suts = list(self._suts)
        for loadgen_id in loadgens:
            self.forget_loadgen(loadgen_id)
        for sut_id in suts:
            self.remove_sut(sut_id)
        self._renewer_stop.set()
        if self._node is not None:
            self._node.client.close()
        self.backend.close()
