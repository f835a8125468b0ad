"""GPUs: the inventory through NVML, and exclusive allocation under leases.

A node without an NVIDIA driver is a normal node with no GPUs: the inventory is empty and says
why, never an error. Allocations are recorded in the same state database as shaping, so a
restarted agent keeps them and the reaper frees them when their lease lapses.

NVML reports host PIDs and host indices. In Kubernetes the device plugin, not this agent, decides
which GPU a pod gets; there the allocation here is bookkeeping for the local backend, and the pod's
real device is the device plugin's choice, which the node agent reads back from the kubelet's
pod-resources API (node_agent.podresources).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mecbench.core.errors import InvalidArgument, NotFound, ResourceExhausted, Violations
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2
from node_agent.state import GpuAllocationRecord, LeaseRecord, StateStore

log = get_logger("mecbench.node_agent.gpus")


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    mig_devices: tuple[str, ...] = ()
    process_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GpuReading:
    index: int
    utilization_percent: float
    memory_used_bytes: int
    power_watts: float


class GpuInventory(Protocol):
    """What the node's GPUs are and how busy they are."""

    @property
    def unavailable_reason(self) -> str:
        """Why there are no GPUs ("" when the driver answered)."""
        ...

    def devices(self) -> list[GpuDevice]: ...

    def readings(self) -> list[GpuReading]: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlInventory:
    """The inventory through NVML (`nvidia-ml-py`). Initialised once; without a driver it is empty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - LibraryNotFound, DriverNotLoaded...: all mean "no GPUs here"
            self._reason = f"NVML unavailable: {exc}"
            log.info("gpus_unavailable", reason=self._reason)

    @property
    def unavailable_reason(self) -> str:
        return self._reason

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                self._nvml.nvmlShutdown()
                self._nvml = None

    def devices(self) -> list[GpuDevice]:
        nvml = self._nvml
        if nvml is None:
            return []
        found = []
        with self._lock:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                found.append(
                    GpuDevice(
                        index=index,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        memory_total_bytes=int(memory.total),
                        memory_used_bytes=int(memory.used),
                        mig_devices=tuple(self._mig_devices(handle)),
                        process_ids=tuple(self._process_ids(handle)),
                    )
                )
        return found

    def _mig_devices(self, handle: Any) -> list[str]:
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return []  # not a MIG-capable GPU
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return []
        uuids = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:
                continue  # an empty slot
            uuids.append(_text(nvml.nvmlDeviceGetUUID(mig)))
        return uuids

    def _process_ids(self, handle: Any) -> list[int]:
        nvml = self._nvml
        pids: set[int] = set()
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                pids.update(int(p.pid) for p in query(handle))
            except nvml.NVMLError:
                continue
        return sorted(pids)

    def readings(self) -> list[GpuReading]:
        nvml = self._nvml
        if nvml is None:
            return []
        readings = []
        with self._lock:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nvml.NVMLError:
                    utilization = 0.0
                try:
                    power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
                except nvml.NVMLError:
                    power = 0.0
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                readings.append(GpuReading(index, utilization, int(memory.used), power))
        return readings


@dataclass
class StaticInventory:
    """A fixed inventory: for nodes whose GPUs are declared rather than discovered, and for
    tests on machines without a GPU (this one), where it stands in for NVML."""

    gpus: list[GpuDevice] = field(default_factory=list)
    unavailable_reason: str = ""

    def devices(self) -> list[GpuDevice]:
        return list(self.gpus)

    def readings(self) -> list[GpuReading]:
        return [GpuReading(g.index, 0.0, g.memory_used_bytes, 0.0) for g in self.gpus]


def declared_inventory(declared: Sequence[str]) -> StaticInventory:
    """The inventory an operator declared ("<uuid>" or "<uuid>=<name>" each), saying so."""
    devices = []
    for index, entry in enumerate(declared):
        uuid, _, name = entry.partition("=")
        devices.append(GpuDevice(index, uuid.strip(), name.strip() or "declared GPU", 0, 0))
    return StaticInventory(
        devices, "declared by the operator (MECBENCH_NODE_AGENT_DECLARED_GPUS), not discovered through NVML"
    )


@dataclass(frozen=True)
class Allocation:
    lease: LeaseRecord
    gpus: list[GpuDevice]
    env: dict[str, str]
    resources: dict[str, str]


def gpu_message(device: GpuDevice, allocated_to: str = "") -> common_pb2.Gpu:
    return common_pb2.Gpu(
        index=device.index,
        uuid=device.uuid,
        name=device.name,
        memory_total_bytes=device.memory_total_bytes,
        memory_used_bytes=device.memory_used_bytes,
        mig_devices=list(device.mig_devices),
        process_ids=list(device.process_ids),
        allocated_to=allocated_to,
    )


class GpuAllocator:
    """Exclusive GPU assignment by count, UUID or index, each allocation held by a lease."""

    def __init__(self, store: StateStore, inventory: GpuInventory) -> None:
        self.store = store
        self.inventory = inventory
        self._lock = threading.Lock()

    def listed(self) -> list[common_pb2.Gpu]:
        held = {a.gpu_uuid: a.lease_id for a in self.store.gpu_allocations()}
        return [gpu_message(d, held.get(d.uuid, "")) for d in self.inventory.devices()]

    def allocate(self, request: common_pb2.GpuRequest, owner: str, lease_s: float) -> Allocation:
        return self._allocate(request, owner, lambda: self.store.create_lease(owner, "gpus", lease_s))

    def allocate_under(self, lease: LeaseRecord, request: common_pb2.GpuRequest) -> Allocation:
        """Allocate under a lease that holds more than GPUs (a placement): released with it."""
        return self._allocate(request, lease.owner, lambda: lease)

    def check(self, request: common_pb2.GpuRequest) -> list[GpuDevice]:
        """The GPUs `request` would get now, allocating nothing; the same errors as allocate."""
        self._check_request(request, "check")
        devices = self.inventory.devices()
        with self._lock:
            held = {a.gpu_uuid: a for a in self.store.gpu_allocations() if self._live(a)}
            return self._choose(request, devices, held)

    def _check_request(self, request: common_pb2.GpuRequest, owner: str) -> None:
        violations = Violations()
        ways = [name for name, given in (("count", request.count), ("uuids", request.uuids),
                                         ("indices", request.indices)) if given]
        if not ways:
            violations.add("request", "ask for a count, uuids or indices")
        elif len(ways) > 1:
            violations.add("request", f"ask by one of count, uuids or indices, not {' and '.join(ways)}")
        if len(set(request.uuids)) != len(request.uuids):
            violations.add("request.uuids", "lists a GPU twice")
        if len(set(request.indices)) != len(request.indices):
            violations.add("request.indices", "lists a GPU twice")
        if not owner:
            violations.add("owner", "required: who holds the GPUs")
        violations.raise_if_any()

    def _allocate(
        self, request: common_pb2.GpuRequest, owner: str, make_lease: Callable[[], LeaseRecord]
    ) -> Allocation:
        self._check_request(request, owner)
        devices = self.inventory.devices()
        with self._lock:
            held = {}
            for allocation in self.store.gpu_allocations():
                if self._live(allocation):
                    held[allocation.gpu_uuid] = allocation
                else:  # lapsed and not yet reaped: free it now rather than refuse
                    self.store.release_gpus(allocation.lease_id)
            chosen = self._choose(request, devices, held)
            lease = make_lease()
            self.store.allocate_gpus([GpuAllocationRecord(d.uuid, d.index, lease.lease_id, owner) for d in chosen])
        log.info("gpus_allocated", lease_id=lease.lease_id, owner=owner, uuids=[d.uuid for d in chosen])
        visible = ",".join(d.uuid for d in chosen)
        return Allocation(
            lease=lease,
            gpus=chosen,
            # UUIDs, not indices: indices differ between NVML and CUDA's enumeration order.
            env={"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible},
            resources={"nvidia.com/gpu": str(len(chosen))},
        )

    def _live(self, allocation: GpuAllocationRecord) -> bool:
        lease = self.store.get_lease(allocation.lease_id)
        return lease is not None and lease.live()

    @staticmethod
    def _choose(
        request: common_pb2.GpuRequest, devices: Sequence[GpuDevice], held: dict[str, GpuAllocationRecord]
    ) -> list[GpuDevice]:
        def holder(device: GpuDevice) -> str:
            allocation = held[device.uuid]
            return f"GPU {device.index} ({device.uuid}) is held by {allocation.owner} (lease {allocation.lease_id})"

        if request.count:
            free = [d for d in devices if d.uuid not in held]
            if len(free) < request.count:
                busy = "; ".join(holder(d) for d in devices if d.uuid in held) or "none held"
                raise ResourceExhausted(
                    f"asked for {request.count} GPUs; this node has {len(devices)}, {len(free)} free ({busy})"
                )
            return free[: request.count]
        if request.uuids:
            by_uuid = {d.uuid: d for d in devices}
            unknown = [u for u in request.uuids if u not in by_uuid]
            if unknown:
                raise NotFound(f"no GPU with UUID {', '.join(unknown)} on this node")
            chosen = [by_uuid[u] for u in request.uuids]
        else:
            by_index = {d.index: d for d in devices}
            unknown_indices = [str(i) for i in request.indices if i not in by_index]
            if unknown_indices:
                raise InvalidArgument(
                    f"no GPU with index {', '.join(unknown_indices)}; this node has {len(devices)}",
                    field="request.indices",
                )
            chosen = [by_index[i] for i in request.indices]
        busy_chosen = [holder(d) for d in chosen if d.uuid in held]
        if busy_chosen:
            raise ResourceExhausted("; ".join(busy_chosen))
        return chosen

    def release(self, lease_id: str) -> list[int]:
        if not lease_id:
            raise InvalidArgument("required", field="lease_id")
        with self._lock:
            released = self.store.release_gpus(lease_id)
            self.store.delete_lease(lease_id)
        if released:
            log.info("gpus_released", lease_id=lease_id, indices=[r.gpu_index for r in released])
        return [r.gpu_index for r in released]
