"""Node telemetry: CPU and memory from /proc, interface counters through netlink (in the
interface's own namespace), GPU utilisation, memory and power through the GPU inventory."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2
from node_agent.gpus import GpuInventory
from node_agent.netns import Namespace, NamespaceGone

log = get_logger("mecbench.node_agent.telemetry")


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


def read_cpu_times(proc_root: Path = Path("/proc")) -> CpuTimes:
    """The aggregate `cpu` line of /proc/stat, in clock ticks. iowait counts as idle, as top does."""
    with (proc_root / "stat").open() as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest and guest_nice (fields 8, 9) are already inside user and nice.
    total = sum(fields[:8])
    return CpuTimes(busy=total - idle, total=total)


def read_memory(proc_root: Path = Path("/proc")) -> tuple[int, int]:
    """(used, total) bytes; used = MemTotal - MemAvailable, what `free` calls used."""
    values: dict[str, int] = {}
    with (proc_root / "meminfo").open() as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    total = values.get("MemTotal", 0)
    return total - values.get("MemAvailable", values.get("MemFree", 0)), total


def cpu_percent(before: CpuTimes, after: CpuTimes) -> float:
    """Busy share of all CPUs between two readings, 0-100."""
    total = after.total - before.total
    return 0.0 if total <= 0 else 100.0 * (after.busy - before.busy) / total


def interface_counters(ns: Namespace, names: list[str]) -> Iterator[common_pb2.InterfaceCounters]:
    """Counters of `names` in `ns`, as the kernel's 64-bit link statistics report them. Interfaces
    (or the namespace) that are gone are skipped: a sample never fails for them."""
    try:
        with ns.netlink() as ipr:
            for name in names:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    continue
                stats = ipr.link("get", index=found[0])[0].get_attr("IFLA_STATS64") or {}
                label = f"{ns.label}/{name}" if ns.label else name
                yield common_pb2.InterfaceCounters(
                    name=label,
                    rx_bytes=stats.get("rx_bytes", 0),
                    tx_bytes=stats.get("tx_bytes", 0),
                    rx_packets=stats.get("rx_packets", 0),
                    tx_packets=stats.get("tx_packets", 0),
                    tx_dropped=stats.get("tx_dropped", 0),
                )
    except NamespaceGone:
        return


class NodeSampler:
    """Takes samples; CPU percent is measured over the time since this sampler's previous sample
    (each stream has its own sampler, so concurrent streams do not shorten each other's window)."""

    def __init__(self, node_name: str, gpus: GpuInventory, proc_root: Path = Path("/proc")) -> None:
        self.node_name = node_name
        self.gpus = gpus
        self.proc_root = proc_root
        self._previous = read_cpu_times(proc_root)
        self._lock = threading.Lock()

    def sample(self, interfaces: list[tuple[Namespace, str]]) -> common_pb2.TelemetrySample:
        with self._lock:
            now_times = read_cpu_times(self.proc_root)
            busy = cpu_percent(self._previous, now_times)
            self._previous = now_times
        used, total = read_memory(self.proc_root)
        sample = common_pb2.TelemetrySample(
            node=self.node_name, cpu_percent=busy, memory_used_bytes=used, memory_total_bytes=total
        )
        sample.time.FromNanoseconds(time.time_ns())
        by_namespace: dict[str, tuple[Namespace, list[str]]] = {}
        for ns, name in interfaces:
            by_namespace.setdefault(ns.identity, (ns, []))[1].append(name)
        for ns, names in by_namespace.values():
            sample.interfaces.extend(interface_counters(ns, list(dict.fromkeys(names))))
        for reading in self.gpus.readings():
            sample.gpus.add(
                index=reading.index,
                utilization_percent=reading.utilization_percent,
                memory_used_bytes=reading.memory_used_bytes,
                power_watts=reading.power_watts,
            )
        return sample


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
