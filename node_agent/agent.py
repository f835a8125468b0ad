"""The node agent's logic, without gRPC: shaping, GPUs, leases and telemetry over one state
database. The servicer translates messages to and from these calls."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from mecbench.core.errors import Violations
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent.cgroups import detect as detect_cgroups
from node_agent.gpus import Allocation, GpuAllocator, GpuInventory, NvmlInventory, declared_inventory
from node_agent.netns import NETNS_DIR, Namespace, NamespaceGone, host_namespace, resolve_named
from node_agent.placement import LEASE_KIND as PLACEMENT_LEASE
from node_agent.placement import PlacementManager
from node_agent.podnetns import make_pod_resolver
from node_agent.probe import KernelSupport, assume_nothing, probe_kernel
from node_agent.settings import NodeAgentSettings
from node_agent.shaping import ShapingManager
from node_agent.state import LeaseRecord, Reaper, StateStore
from node_agent.telemetry import NodeSampler, cpu_count, read_memory
from node_agent.validation import check_duration, check_lease, check_owner, check_target

log = get_logger("mecbench.node_agent")

DEFAULT_TELEMETRY_INTERVAL_S = 1.0


class NodeAgent:
    """One per node. Opening it reconciles: shaping recorded by an earlier agent whose lease is
    not live is removed before anything else happens, then a reaper removes what lapsed leases
    hold for as long as the agent runs."""

    def __init__(
        self,
        settings: NodeAgentSettings,
        gpu_inventory: GpuInventory | None = None,
        kernel_support: KernelSupport | None = None,
    ) -> None:
        self.settings = settings
        self.node_name = settings.node_name or socket.gethostname()
        self.store = StateStore(settings.state_dir / "state.sqlite3")
        if kernel_support is None:
            kernel_support = probe_kernel() if settings.probe_kernel else assume_nothing()
        self.kernel_support = kernel_support
        self._owned_inventory = gpu_inventory is None
        if gpu_inventory is None and settings.declared_gpus:
            gpu_inventory = declared_inventory(settings.declared_gpus)
        self.gpu_inventory: GpuInventory = gpu_inventory or NvmlInventory()
        self.shaping = ShapingManager(
            self.store, settings, kernel_support, make_pod_resolver(settings.pod_resolver, settings.proc_root)
        )
        self.gpus = GpuAllocator(self.store, self.gpu_inventory)
        cgroups, cgroups_reason = detect_cgroups(settings.cgroup_version, settings.cgroup_parent)
        self.placements = PlacementManager(
            self.store, settings, self.gpus, self.gpu_inventory, cgroups, cgroups_reason, lambda: read_memory()[1],
            settings.proc_root,
        )
        self.shaping.reconcile()
        self.placements.reconcile()
        self._reaper = Reaper(self.reap, settings.reaper_interval_s)
        self._reaper.start()

    def close(self) -> None:
        """Stop the reaper. What leases hold stays: it is removed when they lapse, by this agent's
        successor if need be; an agent going away is no reason to drop a run's network."""
        self._reaper.stop()
        if self._owned_inventory and isinstance(self.gpu_inventory, NvmlInventory):
            self.gpu_inventory.close()
        self.store.close()

    def outlive_owner(self) -> None:
        """The process that started this agent is gone (a controller killed with SIGKILL), and
        with it whoever renewed the leases: keep enforcing them until each has lapsed and what
        it held is removed, then let the agent stop. Nothing it installed outlives its lease."""
        leases = self.store.leases()
        if not leases:
            return
        deadline = max(lease.expires_at for lease in leases)
        log.info("outliving_owner", leases=len(leases), seconds=round(max(deadline - time.time(), 0.0), 1))
        while self.store.leases() and time.time() < deadline + 5.0:
            self.reap()
            time.sleep(self.settings.reaper_interval_s)

    def reap(self) -> None:
        for lease in self.store.lapsed_leases():
            self.expire(lease)

    def expire(self, lease: LeaseRecord) -> None:
        if lease.kind == "gpus":
            self.gpus.release(lease.lease_id)
        elif lease.kind == PLACEMENT_LEASE:
            self.placements.remove_lease(lease)
        else:
            removed = self.shaping.remove_lease(lease)
            if removed:
                log.info("lease_lapsed", lease_id=lease.lease_id, owner=lease.owner, removed=removed)

    # --- requests -----------------------------------------------------------------------------

    def apply_shaping(self, request: node_agent_pb2.ApplyShapingRequest) -> node_agent_pb2.Shaping:
        return self.shaping.apply(request)

    def clear_shaping(self, request: node_agent_pb2.ClearShapingRequest) -> list[str]:
        return self.shaping.clear(request)

    def list_shaping(self, include_foreign: bool) -> node_agent_pb2.ListShapingResponse:
        return self.shaping.list_all(include_foreign)

    def probe_shaping(self, request: node_agent_pb2.ProbeShapingRequest) -> node_agent_pb2.LinkProbe:
        return self.shaping.probe(request)

    def start_schedule(self, request: node_agent_pb2.StartScheduleRequest) -> node_agent_pb2.StartScheduleResponse:
        return self.shaping.start_schedule_message(request)

    def stop_schedule(self, request: node_agent_pb2.StopScheduleRequest) -> node_agent_pb2.StopScheduleResponse:
        return self.shaping.stop_schedule_message(request)

    def renew_lease(self, request: node_agent_pb2.RenewLeaseRequest) -> LeaseRecord:
        return self.shaping.renew(request.lease_id, request.lease_duration)

    def allocate_gpus(self, request: node_agent_pb2.AllocateGpusRequest) -> Allocation:
        violations = Violations()
        check_owner(request.owner, "owner", violations)
        lease_s = check_lease(request.lease_duration, "lease_duration", self.settings, violations)
        violations.raise_if_any()
        return self.gpus.allocate(request.request, request.owner, lease_s)

    def release_gpus(self, lease_id: str) -> list[int]:
        return self.gpus.release(lease_id)

    def place_process(self, request: node_agent_pb2.PlaceProcessRequest) -> node_agent_pb2.Placement:
        return self.placements.place(request)

    def get_placement(self, placement_id: str) -> node_agent_pb2.Placement:
        return self.placements.get(placement_id)

    def release_placement(self, request: node_agent_pb2.ReleasePlacementRequest) -> list[str]:
        return self.placements.release(request)

    def pod_placement(self, request: node_agent_pb2.GetPodPlacementRequest) -> node_agent_pb2.GetPodPlacementResponse:
        return self.placements.pod(request)

    # --- node info ----------------------------------------------------------------------------

    def node_info(self, agent_address: str = "") -> common_pb2.NodeInfo:
        _used, memory_total = read_memory()
        info = common_pb2.NodeInfo(
            name=self.node_name,
            agent_address=agent_address,
            kernel=os.uname().release,
            cpu_count=cpu_count(),
            memory_total_bytes=memory_total,
            supported_qdiscs=list(self.kernel_support.supported),
            unsupported_reasons=self.kernel_support.reasons,
            gpus=self.gpus.listed(),
        )
        if self.gpu_inventory.unavailable_reason:
            info.labels["gpus"] = self.gpu_inventory.unavailable_reason
        info.interfaces.extend(_interfaces(host_namespace()))
        if self.settings.list_named_netns and Path(NETNS_DIR).is_dir():
            for name in sorted(os.listdir(NETNS_DIR)):
                try:
                    info.interfaces.extend(_interfaces(resolve_named(name)))
                except Exception as exc:  # noqa: BLE001 - removed while listing, or not a namespace: skip it
                    log.debug("netns_skipped", netns=name, reason=str(exc))
        return info

    # --- telemetry ----------------------------------------------------------------------------

    def telemetry(
        self, request: node_agent_pb2.StreamTelemetryRequest, is_active: Callable[[], bool]
    ) -> Iterator[common_pb2.TelemetrySample]:
        """Samples every `interval` until `duration` has passed or `is_active()` turns false.
        Checked in full before the first sample."""
        violations = Violations()
        interval_ns = check_duration(request.interval, "interval", violations, max_ns=3600 * 10**9)
        interval_s = interval_ns / 1e9 if interval_ns else DEFAULT_TELEMETRY_INTERVAL_S
        if interval_ns and interval_s < self.settings.min_telemetry_interval_s:
            violations.add("interval", f"must be at least {self.settings.min_telemetry_interval_s:g}s")
        duration_s = check_duration(request.duration, "duration", violations) / 1e9
        targets = [check_target(t, f"interfaces[{i}]", violations) for i, t in enumerate(request.interfaces)]
        violations.raise_if_any()
        fixed = [(self.shaping.resolve_namespace(t), t.interface) for t in targets]
        return self._samples(fixed, interval_s, duration_s, is_active)

    def _samples(
        self,
        fixed: list[tuple[Namespace, str]],
        interval_s: float,
        duration_s: float,
        is_active: Callable[[], bool],
    ) -> Iterator[common_pb2.TelemetrySample]:
        sampler = NodeSampler(self.node_name, self.gpu_inventory)
        started = time.monotonic()
        next_at = started + interval_s
        while is_active():
            # Sleep in short steps so a cancelled stream frees its thread promptly.
            while (left := next_at - time.monotonic()) > 0:
                if not is_active():
                    return
                time.sleep(min(left, 0.1))
            interfaces = fixed or self.shaping.interfaces_of_live_shaping()
            yield sampler.sample(interfaces)
            next_at += interval_s
            if duration_s and time.monotonic() - started >= duration_s:
                return


def _interfaces(ns: Namespace) -> list[common_pb2.NetworkInterface]:
    found = []
    try:
        with ns.netlink() as ipr:
            addresses: dict[int, list[str]] = {}
            for addr in ipr.get_addr():
                addresses.setdefault(int(addr["index"]), []).append(
                    f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}"
                )
            for link in ipr.get_links():
                index = int(link["index"])
                found.append(
                    common_pb2.NetworkInterface(
                        name=str(link.get_attr("IFLA_IFNAME")),
                        index=index,
                        mac=str(link.get_attr("IFLA_ADDRESS") or ""),
                        addresses=addresses.get(index, []),
                        mtu=int(link.get_attr("IFLA_MTU") or 0),
                        up=bool(link["flags"] & 1),
                        netns=ns.label,
                    )
                )
    except (NamespaceGone, NetlinkError, OSError) as exc:
        log.debug("interfaces_unreadable", netns=ns.label, reason=str(exc))
    return found
