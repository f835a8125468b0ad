"""What a Kubernetes pod on this node actually got, read back rather than taken from its spec.

The kubelet, not MECBench, confines a pod: it writes the pod's limits into a pod-level cgroup
(`.../kubepods/<qos>/pod<uid>` with the cgroupfs driver, `...-pod<uid_with_underscores>.slice`
with systemd) that every container of the pod sits under. The pod's processes are found by that
UID in /proc/<pid>/cgroup (the host's /proc at `proc_root`, as pod network namespaces are), the
pod-level group is read like any placement's, and the GPUs are those the kubelet's pod-resources
API says it gave the pod (node_agent.podresources), or, where its socket is not mounted, those
NVML lists the pod's processes on (host PIDs, as NVML reports them).
"""

from __future__ import annotations

from pathlib import Path

from mecbench.core.errors import FailedPrecondition, InvalidArgument, NotFound
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2
from node_agent.cgroups import Cgroups, cpus_allowed, process_groups
from node_agent.gpus import GpuDevice, GpuInventory, gpu_message
from node_agent.podresources import pod_devices
from node_agent.pods import valid_pod_uid

log = get_logger("mecbench.node_agent.podplacement")
# The device plugin's resource name; its device ids are GPU UUIDs.
GPU_RESOURCE = "nvidia.com/gpu"


def _needles(uid: str) -> tuple[str, ...]:
    return f"pod{uid}", f"pod{uid.replace('-', '_')}"


def pod_pids(uid: str, proc_root: Path) -> list[int]:
    needles = _needles(uid)
    found = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cgroup").read_text()
        except OSError:  # ended while we looked
            continue
        if any(needle in text for needle in needles):
            found.append(int(entry.name))
    return sorted(found)


def pod_level(groups: dict[str, str], uid: str) -> dict[str, str]:
    """Each hierarchy's path cut after the pod's own segment: the group the kubelet limits."""
    needles = _needles(uid)
    cut = {}
    for hierarchy, path in groups.items():
        segments = path.split("/")
        for index, segment in enumerate(segments):
            if any(needle in segment for needle in needles):
                cut[hierarchy] = "/".join(segments[: index + 1])
                break
    return cut


def pod_gpus(
    namespace: str, name: str, pids: list[int], inventory: GpuInventory, pod_resources_socket: Path | None
) -> tuple[list[common_pb2.Gpu], list[GpuDevice], str]:
    """The GPUs a pod holds: the devices the kubelet gave it (its pod-resources API, where the
    socket is mounted), else those NVML lists the pod's processes on; (messages, the inventory's
    devices among them, which source answered)."""
    if pod_resources_socket is not None and namespace and name:
        try:
            uuids = pod_devices(pod_resources_socket, namespace, name).get(GPU_RESOURCE, [])
        except (FailedPrecondition, NotFound) as exc:
            log.info("pod_resources_unavailable", pod=f"{namespace}/{name}", reason=str(exc))
        else:
            known = {d.uuid: d for d in inventory.devices()}
            held = [known[u] for u in uuids if u in known]
            messages = [gpu_message(known[u]) if u in known else common_pb2.Gpu(uuid=u) for u in uuids]
            return messages, held, "kubelet-pod-resources"
    held = [d for d in inventory.devices() if set(d.process_ids) & set(pids)]
    return [gpu_message(d) for d in held], held, "nvml-processes"


def read_pod(
    uid: str, cgroups: Cgroups | None, cgroups_reason: str, inventory: GpuInventory, proc_root: Path,
    namespace: str = "", name: str = "", pod_resources_socket: Path | None = None,
) -> tuple[common_pb2.PlacementApplied, common_pb2.PlacementUsage]:
    if not valid_pod_uid(uid):
        raise InvalidArgument("must be a UUID", field="pod.uid")
    if cgroups is None:
        raise FailedPrecondition(f"cannot read a pod's cgroup: {cgroups_reason}")
    pids = pod_pids(uid, proc_root)
    if not pids:
        raise NotFound(f"no process of pod {uid} on this node (is the host's /proc at proc_root?)")
    groups = pod_level(process_groups(pids[0], proc_root), uid)
    group = cgroups.read_groups(groups)
    counted = cgroups.usage_groups(groups)
    applied = common_pb2.PlacementApplied(
        cgroup_version=group.version,
        cgroups=group.paths,
        cpu_quota_us=group.cpu_quota_us,
        cpu_period_us=group.cpu_period_us,
        cpu_cores=group.cpu_cores,
        cpu_shares=group.cpu_shares,
        cpus=list(group.cpus),
        memory_limit_bytes=group.memory_limit_bytes,
        swap_limit_bytes=group.swap_limit_bytes,
        # The pod-level group holds no process itself: its containers' groups below it do.
        pids=pids,
    )
    for pid in pids:
        allowed = cpus_allowed(pid, proc_root)
        if allowed:
            applied.cpus_allowed[pid] = allowed
    messages, held, applied.gpus_source = pod_gpus(namespace, name, pids, inventory, pod_resources_socket)
    applied.gpus.extend(messages)
    usage = common_pb2.PlacementUsage(
        cpu_usage_ns=counted.cpu_usage_ns,
        cpu_periods=counted.cpu_periods,
        cpu_throttled_periods=counted.cpu_throttled_periods,
        cpu_throttled_ns=counted.cpu_throttled_ns,
        memory_current_bytes=counted.memory_current_bytes,
        memory_peak_bytes=counted.memory_peak_bytes,
        oom_kills=counted.oom_kills,
    )
    indices = {d.index for d in held}
    usage.gpus.extend(
        common_pb2.GpuSample(index=r.index, utilization_percent=r.utilization_percent,
                             memory_used_bytes=r.memory_used_bytes, power_watts=r.power_watts)
        for r in inventory.readings()
        if r.index in indices
    )
    return applied, usage
