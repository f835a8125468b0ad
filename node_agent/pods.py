"""Resolving a Kubernetes pod on this node to its sandbox's network namespace.

The resolver is a narrow interface so the strategy can change without touching shaping:
`ProcCgroupPodResolver` finds a process of the pod by the pod UID that the kubelet writes into
every container's cgroup path (`.../kubepods/burstable/pod<uid>/...`, or `pod<uid_with_underscores>`
under the systemd driver) and returns that process's `/proc/<pid>/ns/net`; every container of a
pod shares the sandbox's namespace. It needs the agent to see the host's processes (the host's
/proc mounted at `proc_root`, or hostPID). `RuntimeBundlePodResolver` (node_agent/podnetns.py)
reads the container runtime's sandbox records instead; strategy `auto` tries /proc, then those.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from mecbench.core.errors import FailedPrecondition, InvalidArgument, NotFound, Violations

_UID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def valid_pod_uid(uid: str) -> bool:
    return bool(_UID_RE.match(uid))


def check_pod_reference(namespace: str, name: str, uid: str, field: str, violations: Violations) -> None:
    """Syntax of a pod reference; the UID is what the node can resolve, so it is required."""
    if namespace and not _DNS_LABEL_RE.match(namespace):
        violations.add(f"{field}.namespace", "must be a Kubernetes namespace name (DNS label)")
    if name and not _DNS_SUBDOMAIN_RE.match(name):
        violations.add(f"{field}.name", "must be a Kubernetes pod name (DNS subdomain)")
    if not uid:
        violations.add(f"{field}.uid", "required: the node agent finds a pod's namespace by its UID")
    elif not _UID_RE.match(uid):
        violations.add(f"{field}.uid", "must be a UUID")


class PodNetnsResolver(Protocol):
    def resolve(self, namespace: str, name: str, uid: str) -> str:
        """Path of the pod's network namespace on this node; NotFound if the pod is not here."""
        ...


class DisabledPodResolver:
    def resolve(self, namespace: str, name: str, uid: str) -> str:
        raise FailedPrecondition("this node agent resolves no pods (pod_resolver = disabled)")


class ProcCgroupPodResolver:
    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.proc_root = proc_root

    def resolve(self, namespace: str, name: str, uid: str) -> str:
        if not _UID_RE.match(uid):
            raise InvalidArgument("must be a UUID", field="target.pod.uid")
        needles = (f"pod{uid}", f"pod{uid.replace('-', '_')}")
        candidates: list[int] = []
        for entry in self.proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cgroup = (entry / "cgroup").read_text()
            except OSError:  # the process ended while we looked
                continue
            if any(needle in cgroup for needle in needles):
                candidates.append(int(entry.name))
        # The host's own network namespace (init's): a process of the pod's cgroup in it is not
        # the pod's sandbox but, e.g., CRI-O's conmon (conmon_cgroup = "pod"): never the answer.
        host = netns_identity(self.proc_root / "1" / "ns" / "net")
        denied: list[int] = []
        for pid in sorted(candidates):
            path = self.proc_root / str(pid) / "ns" / "net"
            try:
                identity = netns_identity(path, strict=True)
            except PermissionError:
                # A ptrace-read check refused: an AppArmor (containerd's profile on Ubuntu, k3s)
                # or SELinux policy, or a missing CAP_SYS_PTRACE. Another resolver may still know.
                denied.append(pid)
                continue
            if identity is None or identity == host:
                continue
            return str(path)
        shown = f"{namespace}/{name}" if namespace or name else uid
        if denied:
            raise FailedPrecondition(
                f"pod {shown} (uid {uid}) has processes on this node ({', '.join(map(str, denied[:5]))}) whose "
                f"network namespace this agent may not open (EACCES on {self.proc_root}/<pid>/ns/net: an "
                "AppArmor or SELinux profile, or no CAP_SYS_PTRACE; docs/kubernetes.md)"
            )
        raise NotFound(f"pod {shown} (uid {uid}) has no process on this node")


def netns_identity(path: Path, strict: bool = False) -> tuple[int, int] | None:
    """(device, inode) of a network namespace file, which identify the namespace; None when it
    is not there (or, unless `strict`, may not be looked at)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except PermissionError:
        if strict:
            raise
        return None
    except OSError:
        return None
    return (info.st_dev, info.st_ino)
