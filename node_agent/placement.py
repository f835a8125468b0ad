"""Placement: a process (and whatever it starts later) confined to a CPU quota, an optional set of
cores, a memory limit and the GPUs allocated to it, all under one lease.

A request is checked in full against this node before anything changes: a limit the node cannot
enforce (no cgroup controller, no write access, more cores or memory than exist, no such GPU, cores
another placement reserved) is refused with FAILED_PRECONDITION naming each gap, never applied in
part or skipped. The placement is recorded ("placing") before its group is made, so a crash in
between leaves a record the reconcile removes; what is reported is read back from the kernel's
files, /proc and NVML, not echoed from the request.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mecbench.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MecbenchError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Violations,
)
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent.cgroups import CgroupLimits, Cgroups, cpus_allowed, format_cpu_list, parse_cpu_list
from node_agent.gpus import GpuAllocator, GpuInventory, gpu_message
from node_agent.podplacement import read_pod
from node_agent.settings import NodeAgentSettings
from node_agent.state import LeaseRecord, PlacementRecord, StateStore, new_id
from node_agent.validation import check_lease, check_owner

log = get_logger("mecbench.node_agent.placement")

# Below this a server cannot even start; a smaller limit is a mistake, not a measurement.
MIN_MEMORY_BYTES = 4 * 2**20
LEASE_KIND = "placement"


def _lease_message(lease: LeaseRecord | None) -> node_agent_pb2.Lease:
    message = node_agent_pb2.Lease()
    if lease is not None:
        message.lease_id, message.owner = lease.lease_id, lease.owner
        message.expires_at.FromNanoseconds(int(lease.expires_at * 1e9))
    return message


def gpu_env(uuids: list[str]) -> dict[str, str]:
    """What the served process is given to see exactly these GPUs: UUIDs, never indices (NVML's
    and CUDA's enumeration orders differ)."""
    if not uuids:
        return {}
    visible = ",".join(uuids)
    return {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible}


class PlacementManager:
    def __init__(
        self,
        store: StateStore,
        settings: NodeAgentSettings,
        gpus: GpuAllocator,
        inventory: GpuInventory,
        cgroups: Cgroups | None,
        cgroups_reason: str,
        memory_total: Callable[[], int],
        proc_root: Path = Path("/proc"),
    ) -> None:
        self.store = store
        self.settings = settings
        self.gpus = gpus
        self.inventory = inventory
        self.cgroups = cgroups
        self.cgroups_reason = cgroups_reason
        self.memory_total = memory_total
        self.proc_root = proc_root
        self._lock = threading.RLock()

    # --- requests ------------------------------------------------------------------------------

    def place(self, request: node_agent_pb2.PlaceProcessRequest) -> node_agent_pb2.Placement:
        violations = Violations()
        check_owner(request.owner, "owner", violations)
        lease_s = check_lease(request.lease_duration, "lease_duration", self.settings, violations)
        if not request.validate_only and request.pid <= 0:
            violations.add("pid", "required: the host PID of the process to place")
        resources = request.resources
        if not math.isfinite(resources.cpu_cores) or resources.cpu_cores < 0:
            violations.add("resources.cpu_cores", "must be a finite number of cores, 0 (no limit) or more")
        elif 0 < resources.cpu_cores < 0.01:
            violations.add("resources.cpu_cores", "must be at least 0.01 (the kernel's smallest CFS quota)")
        if resources.memory_bytes and resources.memory_bytes < MIN_MEMORY_BYTES:
            violations.add("resources.memory_bytes", f"must be 0 (no limit) or at least {MIN_MEMORY_BYTES} bytes")
        if len(set(resources.cpus)) != len(resources.cpus):
            violations.add("resources.cpus", "lists a core twice")
        if resources.cpus and resources.exclusive_cpus:
            violations.add("resources", "pin to named cpus or to a number of exclusive_cpus, not both")
        gpu_ways = [
            n
            for n, given in (
                ("count", request.gpus.count),
                ("uuids", request.gpus.uuids),
                ("indices", request.gpus.indices),
            )
            if given
        ]
        if len(gpu_ways) > 1:
            violations.add("gpus", f"ask by one of count, uuids or indices, not {' and '.join(gpu_ways)}")
        violations.raise_if_any()

        wants_gpus = bool(gpu_ways)
        with self._lock:
            cpus, exclusive = self._check_node(request, wants_gpus)
            limits = CgroupLimits(resources.cpu_cores, cpus, int(resources.memory_bytes))
            if request.validate_only:
                # It could be placed now; nothing is applied, so nothing is reported as applied.
                return node_agent_pb2.Placement(pid=request.pid, resources=resources, gpus=request.gpus)
            self._check_placeable(request.pid)
            for record in self._live_records():
                if record.pid == request.pid:
                    raise AlreadyExists(f"process {request.pid} is already placed ({record.placement_id})")
            return self._apply(request, limits, exclusive, lease_s, wants_gpus)

    def _check_placeable(self, pid: int) -> None:
        try:
            raw = (self.proc_root / str(pid) / "cmdline").read_bytes()
        except OSError:
            raise NotFound(f"no process {pid} on this node") from None
        command = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        if pid == 1 or pid == os.getpid():
            raise PermissionDenied(f"process {pid} is never placed")
        if not any(fnmatch.fnmatchcase(command, pattern) for pattern in self.settings.placeable_processes):
            raise PermissionDenied(
                f"process {pid} ({command[:200]!r}) is not one this agent's operator lets requests place "
                "(MECBENCH_NODE_AGENT_PLACEABLE_PROCESSES)"
            )

    def _check_node(
        self, request: node_agent_pb2.PlaceProcessRequest, wants_gpus: bool
    ) -> tuple[tuple[int, ...], bool]:
        """(the cores to pin to, whether they are reserved); FAILED_PRECONDITION naming every way
        this node cannot meet the request."""
        resources = request.resources
        problems: list[str] = []
        probe = CgroupLimits(
            resources.cpu_cores,
            tuple(resources.cpus) or ((0,) if resources.exclusive_cpus else ()),
            int(resources.memory_bytes),
        )
        if self.cgroups is None:
            if probe.controllers():
                problems.append(f"no cgroups to confine it with: {self.cgroups_reason}")
            online: list[int] = sorted(os.sched_getaffinity(0))
        else:
            problems += self.cgroups.missing(probe)
            online = self.cgroups.online_cpus()
        cores = format_cpu_list(online)
        if resources.cpu_cores > len(online):
            problems.append(f"asks for {resources.cpu_cores:g} CPU cores; this node has {len(online)} (cores {cores})")
        absent = [c for c in resources.cpus if c not in online]
        if absent:
            problems.append(f"core {format_cpu_list(absent)} does not exist here (cores {cores})")
        if resources.cpus and resources.cpu_cores > len(resources.cpus):
            problems.append(f"asks for {resources.cpu_cores:g} CPU cores on {len(resources.cpus)} pinned cores")
        memory_total = self.memory_total()
        if resources.memory_bytes and memory_total and resources.memory_bytes > memory_total:
            problems.append(f"asks for {resources.memory_bytes} bytes of memory; this node has {memory_total}")
        chosen: tuple[int, ...] = tuple(sorted(resources.cpus))
        reserved: dict[int, str] = {}
        used: set[int] = set()
        for record in self._live_records():
            cores_held = parse_cpu_list(record.cpus)
            used.update(cores_held)
            if record.exclusive:
                reserved.update({c: f"{record.placement_id} ({record.owner})" for c in cores_held})
        taken = [f"core {c} is reserved by placement {reserved[c]}" for c in chosen if c in reserved]
        problems += taken
        if resources.exclusive_cpus:
            free = [c for c in online if c not in used]
            if resources.exclusive_cpus > len(free):
                problems.append(
                    f"asks for {resources.exclusive_cpus} exclusive cores; {len(free)} of {len(online)} are free "
                    f"({format_cpu_list(free) or 'none'})"
                )
            else:
                chosen = tuple(free[: resources.exclusive_cpus])
            if resources.cpu_cores > resources.exclusive_cpus:
                problems.append(
                    f"asks for {resources.cpu_cores:g} CPU cores on {resources.exclusive_cpus} exclusive cores"
                )
        if wants_gpus:
            try:
                self.gpus.check(request.gpus)
            except (NotFound, InvalidArgument, ResourceExhausted) as exc:
                reason = self.inventory.unavailable_reason
                problems.append(f"GPUs: {exc}" + (f" ({reason})" if reason else ""))
        if problems:
            raise FailedPrecondition("cannot place as asked: " + "; ".join(problems))
        return chosen, bool(resources.exclusive_cpus)

    def _apply(
        self,
        request: node_agent_pb2.PlaceProcessRequest,
        limits: CgroupLimits,
        exclusive: bool,
        lease_s: float,
        wants_gpus: bool,
    ) -> node_agent_pb2.Placement:
        lease = self.store.create_lease(request.owner, LEASE_KIND, lease_s)
        return_to = self.cgroups.groups_of(request.pid) if self.cgroups is not None else {}
        record = PlacementRecord(
            placement_id=new_id("placement"),
            lease_id=lease.lease_id,
            owner=request.owner,
            state="placing",
            pid=request.pid,
            cpus=format_cpu_list(limits.cpus),
            exclusive=exclusive,
            return_to=json.dumps(return_to),
            request=request.SerializeToString(),
            created_at=time.time(),
        )
        self.store.add_placement(record)
        try:
            if wants_gpus:
                self.gpus.allocate_under(lease, request.gpus)
            if self.cgroups is not None:
                self.cgroups.create(record.placement_id, limits)
                self.cgroups.add_process(record.placement_id, request.pid)
                applied = self.cgroups.read(record.placement_id)
                if request.pid not in applied.pids:
                    raise FailedPrecondition(f"process {request.pid} is not in its group after the move (it exited?)")
            self.store.mark_placed(record.placement_id)
        except OSError as exc:
            self._remove(record)
            raise FailedPrecondition(f"the kernel refused the placement: {exc}") from None
        except BaseException:
            self._remove(record)
            raise
        log.info(
            "process_placed",
            placement_id=record.placement_id,
            pid=request.pid,
            owner=request.owner,
            cpu_cores=limits.cpu_cores,
            cpus=record.cpus,
            memory_bytes=limits.memory_bytes,
        )
        return self.message(record)

    def pod(self, request: node_agent_pb2.GetPodPlacementRequest) -> node_agent_pb2.GetPodPlacementResponse:
        applied, usage = read_pod(
            request.pod.uid, self.cgroups, self.cgroups_reason, self.inventory, self.proc_root,
            request.pod.namespace, request.pod.name, self.settings.pod_resources_socket,
        )
        return node_agent_pb2.GetPodPlacementResponse(applied=applied, usage=usage)

    def get(self, placement_id: str) -> node_agent_pb2.Placement:
        if not placement_id:
            raise InvalidArgument("required", field="placement_id")
        for record in self.store.placements():
            if record.placement_id == placement_id:
                return self.message(record)
        raise NotFound(f"no placement {placement_id} (released, or its lease lapsed)")

    def release(self, request: node_agent_pb2.ReleasePlacementRequest) -> list[str]:
        selector = request.WhichOneof("selector")
        if selector is None or not getattr(request, selector):
            raise InvalidArgument("set placement_id or owner", field="selector")
        released = []
        with self._lock:
            for record in self.store.placements():
                if getattr(record, selector) == getattr(request, selector):
                    self._remove(record)
                    released.append(record.placement_id)
        return released

    # --- leases --------------------------------------------------------------------------------

    def remove_lease(self, lease: LeaseRecord) -> list[str]:
        removed = []
        with self._lock:
            for record in self.store.placements():
                if record.lease_id == lease.lease_id:
                    self._remove(record)
                    removed.append(record.placement_id)
            self.store.delete_lease(lease.lease_id)
        if removed:
            log.info("placement_lease_lapsed", lease_id=lease.lease_id, owner=lease.owner, removed=removed)
        return removed

    def reconcile(self) -> list[str]:
        """At start: release recorded placements whose lease is not live; touch nothing else (the
        groups of other agents' placements are theirs)."""
        now = time.time()
        removed = []
        with self._lock:
            for record in self.store.placements():
                lease = self.store.get_lease(record.lease_id)
                if lease is None or not lease.live(now):
                    self._remove(record)
                    removed.append(record.placement_id)
        if removed:
            log.info("placements_reconciled", removed=removed)
        return removed

    def _live_records(self) -> list[PlacementRecord]:
        live = []
        for record in self.store.placements():
            lease = self.store.get_lease(record.lease_id)
            if lease is not None and lease.live():
                live.append(record)
            else:  # lapsed, not yet reaped: its cores and GPUs are free now
                self._remove(record)
        return live

    def _remove(self, record: PlacementRecord) -> None:
        if self.cgroups is not None:
            try:
                self.cgroups.remove(record.placement_id, json.loads(record.return_to or "{}"))
            except OSError as exc:
                # Kept on record: the next reap tries again rather than forgetting a live group.
                log.error("placement_not_removed", placement_id=record.placement_id, error=str(exc))
                raise MecbenchError(f"placement {record.placement_id} could not be removed: {exc}") from None
        self.store.release_gpus(record.lease_id)
        self.store.delete_placement(record.placement_id)
        if not any(p.lease_id == record.lease_id for p in self.store.placements()):
            self.store.delete_lease(record.lease_id)
        log.info("placement_released", placement_id=record.placement_id, pid=record.pid, owner=record.owner)

    # --- reading back --------------------------------------------------------------------------

    def message(self, record: PlacementRecord) -> node_agent_pb2.Placement:
        request = node_agent_pb2.PlaceProcessRequest.FromString(record.request)
        placement = node_agent_pb2.Placement(
            placement_id=record.placement_id,
            pid=record.pid,
            resources=request.resources,
            gpus=request.gpus,
            lease=_lease_message(self.store.get_lease(record.lease_id)),
        )
        applied, usage = placement.applied, placement.usage
        if self.cgroups is not None:
            group = self.cgroups.read(record.placement_id)
            applied.cgroup_version = group.version
            applied.cgroups.update(group.paths)
            applied.cpu_quota_us, applied.cpu_period_us = group.cpu_quota_us, group.cpu_period_us
            applied.cpu_cores = group.cpu_cores
            applied.cpu_shares = group.cpu_shares
            applied.cpus.extend(group.cpus)
            applied.memory_limit_bytes = group.memory_limit_bytes
            applied.swap_limit_bytes = group.swap_limit_bytes
            applied.pids.extend(group.pids)
            for pid in group.pids:
                allowed = cpus_allowed(pid, self.proc_root)
                if allowed:
                    applied.cpus_allowed[pid] = allowed
            counted = self.cgroups.usage(record.placement_id)
            usage.cpu_usage_ns = counted.cpu_usage_ns
            usage.cpu_periods = counted.cpu_periods
            usage.cpu_throttled_periods = counted.cpu_throttled_periods
            usage.cpu_throttled_ns = counted.cpu_throttled_ns
            usage.memory_current_bytes = counted.memory_current_bytes
            usage.memory_peak_bytes = counted.memory_peak_bytes
            usage.oom_kills = counted.oom_kills
        held = [a for a in self.store.gpu_allocations() if a.lease_id == record.lease_id]
        if held:
            uuids = {a.gpu_uuid for a in held}
            devices = [d for d in self.inventory.devices() if d.uuid in uuids]
            applied.gpus.extend(gpu_message(d, record.lease_id) for d in devices)
            indices = {d.index for d in devices}
            usage.gpus.extend(
                common_pb2.GpuSample(
                    index=r.index,
                    utilization_percent=r.utilization_percent,
                    memory_used_bytes=r.memory_used_bytes,
                    power_watts=r.power_watts,
                )
                for r in self.inventory.readings()
                if r.index in indices
            )
            placement.env.update(gpu_env([a.gpu_uuid for a in held]))
        return placement
