"""Network profiles applied for the length of a run: ApplyShaping on the node agent under a
lease that a background thread renews, and ClearShaping at the end whatever happened. If the
controller dies, the node agent removes the shaping when the lease lapses. If the node agent
dies (a renewal finds it gone), the run cannot vouch for its network any more: `on_lost` ends it.

Each client may have its own profile (a client group's): each client's path is shaped with its
own. What the network really did is kept with every repeat: before the first test the node agent
probes each shaped link (rate and round trip against what was asked; see node_agent/linkprobe.py),
and around each repeat the qdiscs' own counters are read back (bytes, packets, drops, overlimits,
requeues), their backlog sampled while the tests run for its peak.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from controller.agents import AgentPool, NodeAgentHandle
from controller.backends.base import AgentHandle, DeploymentBackend, ShapingPoint
from mecbench.core import durations
from mecbench.core.errors import FailedPrecondition, MecbenchError, NotFound, Unavailable
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2

log = get_logger("mecbench.controller.shaping")

RENEW_INTERVAL_S = 1.0
# How often the qdiscs' backlog is read while a repeat runs (the kernel keeps no peak of it).
BACKLOG_SAMPLE_S = 0.1
COUNTER_FIELDS = ("bytes", "packets", "drops", "overlimits", "requeues")

# A cluster link's ends: the head's (side SUT), the worker's (LOADGEN), both (BOTH, the default).
_CLUSTER_ENDS = {
    common_pb2.SHAPING_SIDE_UNSPECIFIED: slice(0, 2),
    common_pb2.SHAPING_SIDE_SUT: slice(0, 1),
    common_pb2.SHAPING_SIDE_LOADGEN: slice(1, 2),
    common_pb2.SHAPING_SIDE_BOTH: slice(0, 2),
}


def check_cluster_side(backend: DeploymentBackend, cluster: common_pb2.NetworkProfile) -> None:
    """FAILED_PRECONDITION when `cluster` asks for one end of a member link (side SUT or LOADGEN)
    of a backend that can shape such a link only as a whole."""
    one_end = cluster.side in (common_pb2.SHAPING_SIDE_SUT, common_pb2.SHAPING_SIDE_LOADGEN)
    if one_end and backend.cluster_link_ends < 2:
        raise FailedPrecondition(
            f"spec.cluster_network.side: the {backend.name} backend shapes a cluster member link at the "
            "worker's interface only (leave side unset, or BOTH)"
        )


_SIDES = {
    common_pb2.SHAPING_SIDE_UNSPECIFIED: "sut",
    common_pb2.SHAPING_SIDE_SUT: "sut",
    common_pb2.SHAPING_SIDE_LOADGEN: "loadgen",
    common_pb2.SHAPING_SIDE_BOTH: "both",
}


def is_shaped(profile: common_pb2.NetworkProfile) -> bool:
    return profile.HasField("netem") and profile.netem.ByteSize() > 0


@dataclass
class AppliedShaping:
    """One ApplyShaping of the run: which client's path, where, and what the agent installed."""

    node: NodeAgentHandle
    client: int
    profile: str
    shaping: node_agent_pb2.Shaping
    probe: node_agent_pb2.LinkProbe | None = None
    probe_error: str = ""
    schedule: common_pb2.LinkSchedule | None = None
    # A link that is no client's path: a cluster SUT's, "cluster <worker>" (client is then -1).
    link: str = ""

    @property
    def where(self) -> str:
        return self.link or f"client {self.client}"


def _counters(message: node_agent_pb2.QdiscCounters) -> dict[str, int]:
    return {name: int(getattr(message, name)) for name in (*COUNTER_FIELDS, "backlog_bytes", "backlog_packets")}


@dataclass
class _RepeatCounters:
    before: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    peaks: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict)
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    sampler: threading.Thread | None = None
    # Schedules started for this repeat (when its first test started), and any failure to.
    schedules_started: bool = False
    schedule_errors: list[str] = field(default_factory=list)


class RunShaping:
    """Shaping held for one run. Use as a context manager around the run's tests."""

    def __init__(self, pool: AgentPool, run_id: str, profile: common_pb2.NetworkProfile | None, clients: int,
                 lease_s: float, on_lost: Callable[[str], None] | None = None, sut: AgentHandle | None = None,
                 client_profiles: Sequence[common_pb2.NetworkProfile | None] | None = None,
                 probe: bool = True, cluster_profile: common_pb2.NetworkProfile | None = None,
                 cluster_members: Sequence[str] = ()) -> None:
        self.pool = pool
        self.on_lost = on_lost
        self.sut = sut
        self.run_id = run_id
        # The profile of each client (None: its path is not shaped).
        self.client_profiles: list[common_pb2.NetworkProfile | None] = (
            list(client_profiles) if client_profiles is not None else [profile] * clients
        )
        self.lease_s = lease_s
        self.probe_links = probe
        # A cluster SUT's links (head to each of `cluster_members`, its workers), and their profile.
        self.cluster_profile = cluster_profile
        self.cluster_members = list(cluster_members)
        self.applied: list[AppliedShaping] = []
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._repeat: _RepeatCounters | None = None
        self._schedule_lock = threading.Lock()

    @property
    def leases(self) -> list[tuple[NodeAgentHandle, str]]:
        """(node agent, lease id) of every shaping applied: on a cluster, each on its own node."""
        return [(a.node, a.shaping.lease.lease_id) for a in self.applied]

    def _points(self, side: str, client: int) -> list[ShapingPoint]:
        if self.sut is not None:
            return self.pool.backend.sut_shaping_points(side, client, self.sut)
        return self.pool.backend.shaping_points(side, client)

    def __enter__(self) -> RunShaping:
        # One shaping per interface: clients whose paths cross the same one (every client of a
        # Kubernetes SUT pod crosses its eth0) share it; a node agent refuses a second one there.
        shared: dict[tuple[str, bytes], tuple[int, common_pb2.NetworkProfile]] = {}
        try:
            for client, profile in enumerate(self.client_profiles):
                if profile is None or not is_shaped(profile):
                    continue
                side = _SIDES[profile.side]
                direction = profile.direction or common_pb2.DIRECTION_EGRESS
                for point in self._points(side, client):
                    key = (point.node, point.target().SerializeToString(deterministic=True))
                    if key in shared:
                        first, first_profile = shared[key]
                        if first_profile != profile:
                            raise FailedPrecondition(
                                f"clients {first} and {client} cross the same interface ({point.interface} on "
                                f"{point.node or 'this node'}) with different network profiles; it can be "
                                "shaped one way only"
                            )
                        continue
                    shared[key] = (client, profile)
                    self._apply(point, profile, direction, client)
            cluster = self.cluster_profile
            if cluster is not None and is_shaped(cluster):
                check_cluster_side(self.pool.backend, cluster)
                for index, member in enumerate(self.cluster_members):
                    # Each end shapes what it sends: both ends make the link slow both ways. A backend
                    # with one point per link (a worker pod's interface, whose other end also carries
                    # the clients' traffic) shapes that point both ways unless told otherwise, and
                    # cannot shape one end alone.
                    points = self.pool.backend.cluster_shaping_points(index)
                    if len(points) > 1:
                        ends, default = points[_CLUSTER_ENDS[cluster.side]], common_pb2.DIRECTION_EGRESS
                    else:
                        ends, default = points, common_pb2.DIRECTION_BOTH
                    for point in ends:
                        self._apply(point, cluster, cluster.direction or default, -1, f"cluster {member}")
        except BaseException:
            self._clear()
            raise
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.run_id}", daemon=True)
        self._renewer.start()
        if self.probe_links:
            self.probe()
        return self

    def _apply(self, point: ShapingPoint, profile: common_pb2.NetworkProfile,
               direction: common_pb2.Direction.ValueType, client: int, link: str = "") -> None:
        node = self.pool.node_agent_on(point.node)
        request = node_agent_pb2.ApplyShapingRequest(
            target=point.target(),
            direction=direction,
            netem=profile.netem,
            owner=self.run_id,
            lease_duration=durations.from_seconds(self.lease_s),
        )
        if profile.HasField("schedule"):
            request.schedule.CopyFrom(profile.schedule)
        shaping = node.client.apply_shaping(request)
        self.applied.append(AppliedShaping(node, client, profile.name, shaping,
                                           schedule=request.schedule if profile.HasField("schedule") else None,
                                           link=link))
        log.info("shaping_applied", run_id=self.run_id, interface=point.interface, netns=point.netns,
                 profile=profile.name, client=client, link=link)

    # --- verification --------------------------------------------------------------------------

    def probe(self) -> None:
        """Probe every shaped link once (before the run's first test). A probe that cannot run is
        recorded as such; it does not stop the run."""
        for applied in self.applied:
            try:
                applied.probe = applied.node.client.probe_shaping(applied.shaping.shaping_id)
            except MecbenchError as exc:
                applied.probe_error = f"{exc.code.name}: {exc}"
                log.warning("link_probe_failed", run_id=self.run_id, shaping_id=applied.shaping.shaping_id,
                            error=applied.probe_error)

    def problems(self) -> list[str]:
        """Each way a shaped link is off what was asked, naming the client and the interface."""
        found: list[str] = []
        for applied in self.applied:
            if applied.probe is not None and not applied.probe.as_requested:
                where = f"{applied.where} ({applied.profile}) {applied.probe.netns}/{applied.probe.interface}"
                found.extend(f"{where}: {problem}" for problem in applied.probe.problems)
        return found

    def _read(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """Every qdisc of the run's shapings, as the kernel reports it now, by (shaping, interface, handle)."""
        ours = {a.shaping.shaping_id: a for a in self.applied}
        readings: dict[tuple[str, str, str], dict[str, Any]] = {}
        nodes = {id(a.node): a.node for a in self.applied}
        for node in nodes.values():
            for shaping in node.client.list_shaping():
                applied = ours.get(shaping.shaping_id)
                if applied is None:
                    continue
                for qdisc in shaping.qdiscs:
                    readings[(shaping.shaping_id, qdisc.interface, qdisc.handle)] = {
                        "client": applied.client, "profile": applied.profile, "netns": qdisc.netns,
                        **({"link": applied.link} if applied.link else {}),
                        "kind": qdisc.kind, "params": dict(qdisc.params), "counters": _counters(qdisc.counters),
                    }
        return readings

    def start_repeat(self) -> None:
        """Read the counters before a repeat's tests, and sample the backlog while they run."""
        if not self.applied:
            return
        state = _RepeatCounters()
        try:
            state.before = self._read()
        except MecbenchError as exc:
            log.warning("qdisc_counters_unread", run_id=self.run_id, error=str(exc))
        for key, reading in state.before.items():
            state.peaks[key] = (reading["counters"]["backlog_bytes"], reading["counters"]["backlog_packets"])
        state.sampler = threading.Thread(target=self._sample, args=(state,), name=f"backlog-{self.run_id}",
                                         daemon=True)
        state.sampler.start()
        self._repeat = state

    def test_started(self) -> None:
        """A client's test has started: start every schedule from its first step (once a repeat),
        so the link changes in step with the test."""
        state = self._repeat
        if state is None:
            return
        with self._schedule_lock:
            if state.schedules_started:
                return
            state.schedules_started = True
        for applied in self.applied:
            if applied.schedule is None:
                continue
            try:
                applied.node.client.start_schedule(applied.shaping.shaping_id)
            except MecbenchError as exc:
                state.schedule_errors.append(f"client {applied.client}: {exc.code.name}: {exc}")
                log.warning("schedule_start_failed", run_id=self.run_id, error=str(exc))

    def _stop_schedules(self, state: _RepeatCounters) -> list[dict[str, Any]]:
        """Stop the repeat's schedules; each one's requested steps beside what was applied."""
        timelines = []
        for applied in self.applied:
            if applied.schedule is None:
                continue
            entry: dict[str, Any] = {
                "client": applied.client, "profile": applied.profile, "shaping_id": applied.shaping.shaping_id,
                "schedule": json_format.MessageToDict(applied.schedule, preserving_proto_field_name=True),
            }
            if state.schedules_started:
                try:
                    stopped = applied.node.client.stop_schedule(applied.shaping.shaping_id)
                    entry["started_at"] = stopped.started_at.ToJsonString()
                    entry["applied"] = [
                        json_format.MessageToDict(step, preserving_proto_field_name=True) for step in stopped.applied
                    ]
                except MecbenchError as exc:
                    entry["error"] = f"{exc.code.name}: {exc}"
            else:
                entry["error"] = "no test started: the schedule was not run"
            timelines.append(entry)
        return timelines

    def _sample(self, state: _RepeatCounters) -> None:
        while not state.stop.wait(BACKLOG_SAMPLE_S):
            try:
                readings = self._read()
            except MecbenchError:
                continue
            state.samples += 1
            for key, reading in readings.items():
                counters = reading["counters"]
                old = state.peaks.get(key, (0, 0))
                state.peaks[key] = (max(old[0], counters["backlog_bytes"]), max(old[1], counters["backlog_packets"]))

    def end_repeat(self) -> dict[str, Any] | None:
        """What the network did during the repeat (counters before, after and their difference,
        peak backlog), with the probes and whether the links were as asked."""
        state, self._repeat = self._repeat, None
        if state is None:
            return None
        state.stop.set()
        if state.sampler is not None:
            state.sampler.join(timeout=10)
        schedules = self._stop_schedules(state)
        try:
            after = self._read()
        except MecbenchError as exc:
            after = {}
            log.warning("qdisc_counters_unread", run_id=self.run_id, error=str(exc))
        qdiscs = []
        for key in sorted(set(state.before) | set(after)):
            shaping_id, interface, handle = key
            before_reading, after_reading = state.before.get(key), after.get(key)
            reading = after_reading or before_reading
            assert reading is not None
            entry: dict[str, Any] = {
                "shaping_id": shaping_id, "client": reading["client"], "profile": reading["profile"],
                **({"link": reading["link"]} if "link" in reading else {}),
                "interface": interface, "netns": reading["netns"], "kind": reading["kind"], "handle": handle,
                "params": reading["params"],
                "before": before_reading["counters"] if before_reading else None,
                "after": after_reading["counters"] if after_reading else None,
            }
            if before_reading and after_reading:
                entry["delta"] = {
                    name: after_reading["counters"][name] - before_reading["counters"][name] for name in COUNTER_FIELDS
                }
            peak = state.peaks.get(key)
            if peak is not None and after_reading:
                peak = (max(peak[0], after_reading["counters"]["backlog_bytes"]),
                        max(peak[1], after_reading["counters"]["backlog_packets"]))
            entry["peak_backlog_bytes"], entry["peak_backlog_packets"] = peak or (0, 0)
            qdiscs.append(entry)
        problems = self.problems()
        return {
            "qdiscs": qdiscs,
            "backlog_samples": state.samples,
            "backlog_sample_interval_s": BACKLOG_SAMPLE_S,
            "probes": [
                {
                    "client": a.client, "profile": a.profile, "shaping_id": a.shaping.shaping_id,
                    **({"link": a.link} if a.link else {}),
                    **({"probe": json_format.MessageToDict(a.probe, preserving_proto_field_name=True)}
                       if a.probe is not None else {}),
                    **({"error": a.probe_error} if a.probe_error else {}),
                }
                for a in self.applied
            ],
            "link_as_requested": not problems,
            "problems": problems,
            **({"schedules": schedules} if schedules else {}),
            **({"schedule_errors": state.schedule_errors} if state.schedule_errors else {}),
        }

    # --- leases --------------------------------------------------------------------------------

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
                    node.client.renew_lease(
                        node_agent_pb2.RenewLeaseRequest(
                            lease_id=lease_id, lease_duration=durations.from_seconds(self.lease_s)
                        ),
                        timeout=5,
                    )
                except MecbenchError as exc:
                    log.warning("lease_renewal_failed", run_id=self.run_id, lease_id=lease_id, error=str(exc))
                    if isinstance(exc, Unavailable | NotFound):
                        self._lost(f"node agent {node.agent.name} lost the run's shaping ({exc.code.name}: {exc})")
                        return

    def _lost(self, reason: str) -> None:
        if self.on_lost is not None and not self._stop.is_set():
            self.on_lost(reason)

    def _clear(self) -> None:
        # Every node the run shaped on, asked again (a node agent that died and came back has
        # re-adopted the run's shaping from its state directory); at least this node's.
        nodes = {node.agent.placement for node, _ in self.leases} or {""}
        for placement in sorted(nodes):
            node = self.pool.node_agent_on(placement)
            try:
                node.client.clear_shaping(self.run_id)
            except MecbenchError as exc:
                # The lease still lapses on the node agent: shaping never outlives the run for long.
                log.error("clear_shaping_failed", run_id=self.run_id, node=placement, error=str(exc))

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._repeat is not None:
            self._repeat.stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        self._clear()
