"""Resolving a pod to its network namespace on this node, by the container runtime's records when
the pod's processes are not to be found in /proc.

`ProcCgroupPodResolver` (node_agent/pods.py) finds a process of the pod by the pod UID in its
cgroup path. Where that fails (the agent sees no host /proc, or the sandbox outlives its
processes), the runtime still knows: containerd (and k3s's) keeps each task's OCI bundle under
`<state>/io.containerd.runtime.v2.task/k8s.io/<id>/`, CRI-O under
`/run/containers/storage/overlay-containers/<id>/userdata/`. The bundle's config.json carries
the pod UID in an annotation (`io.kubernetes.cri.sandbox-uid`, CRI-O's `io.kubernetes.pod.uid`)
and the network namespace in `linux.namespaces` (a `/var/run/netns/cni-...` path the CNI set
up); a bundle whose runtime created the namespace itself names none, and its init pid
(`init.pid`, CRI-O's `pidfile`) leads to `/proc/<pid>/ns/net`.

`auto` tries /proc first and the runtime second; the bundle roots are
`MECBENCH_NODE_AGENT_RUNTIME_BUNDLE_ROOTS` (comma-separated), which the DaemonSet mounts read-only
at their host paths (deploy/base/node-agent.yaml). /proc may find the pod and still be refused
its namespace (EACCES: an AppArmor profile denying the ptrace-read): the runtime's records are
then asked, and only if they do not know the pod either is the answer FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mecbench.core.errors import FailedPrecondition, InvalidArgument, NotFound
from mecbench.core.settings import from_env
from node_agent.pods import (
    DisabledPodResolver,
    PodNetnsResolver,
    ProcCgroupPodResolver,
    netns_identity,
    valid_pod_uid,
)

DEFAULT_BUNDLE_ROOTS = (
    Path("/run/containerd/io.containerd.runtime.v2.task/k8s.io"),
    Path("/run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io"),
    Path("/run/containers/storage/overlay-containers"),
)
UID_ANNOTATIONS = ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid")
# A bundle's config.json is a few kilobytes; a bigger one is not what it should be.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


@dataclass
class PodNetnsSettings:
    """Read from the node agent's environment (`MECBENCH_NODE_AGENT_*`)."""

    runtime_bundle_roots: tuple[Path, ...] = DEFAULT_BUNDLE_ROOTS

    @classmethod
    def load(cls, **overrides: object) -> PodNetnsSettings:
        return from_env(cls, "MECBENCH_NODE_AGENT_", None, **overrides)


class RuntimeBundlePodResolver:
    """The pod's network namespace from its sandbox's OCI bundle (see the module docstring)."""

    def __init__(self, roots: tuple[Path, ...] = DEFAULT_BUNDLE_ROOTS, proc_root: Path = Path("/proc")) -> None:
        self.roots = roots
        self.proc_root = proc_root

    def resolve(self, namespace: str, name: str, uid: str) -> str:
        if not valid_pod_uid(uid):
            raise InvalidArgument("must be a UUID", field="target.pod.uid")
        for bundle, spec in self._bundles():
            annotations = spec.get("annotations")
            if not isinstance(annotations, dict) or not any(annotations.get(key) == uid for key in UID_ANNOTATIONS):
                continue
            path = self._namespace_of(bundle, spec)
            if path:
                return path
        shown = f"{namespace}/{name}" if namespace or name else uid
        searched = ", ".join(str(root) for root in self.roots if root.is_dir()) or "no runtime state directory"
        raise NotFound(f"pod {shown} (uid {uid}) has no sandbox in the container runtime's state ({searched})")

    def _bundles(self) -> Iterator[tuple[Path, dict[str, object]]]:
        for root in self.roots:
            try:
                entries = sorted(root.iterdir())
            except OSError:  # this runtime is not on the node (or not mounted into the agent)
                continue
            for entry in entries:
                for config in (entry / "config.json", entry / "userdata" / "config.json"):
                    spec = _read_json(config)
                    if spec is not None:
                        yield config.parent, spec
                        break

    def _namespace_of(self, bundle: Path, spec: dict[str, object]) -> str:
        linux = spec.get("linux")
        namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
        for entry in namespaces if isinstance(namespaces, list) else []:
            if isinstance(entry, dict) and entry.get("type") == "network":
                path = str(entry.get("path") or "")
                if path and netns_identity(Path(path)) is not None:
                    return path
        # The runtime made the namespace when it started the sandbox's init: it is that process's
        # (unless a security profile keeps this agent from opening it: EACCES reads as absent).
        for pid_file in (bundle / "init.pid", bundle / "pidfile"):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            proc_path = self.proc_root / str(pid) / "ns" / "net"
            if pid > 0 and netns_identity(proc_path) is not None:
                return str(proc_path)
        return ""


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ChainedPodResolver:
    """The first resolver that finds the pod; NotFound naming every place looked in otherwise."""

    def __init__(self, resolvers: list[PodNetnsResolver]) -> None:
        self.resolvers = resolvers

    def resolve(self, namespace: str, name: str, uid: str) -> str:
        misses = []
        refused = False
        for resolver in self.resolvers:
            try:
                return resolver.resolve(namespace, name, uid)
            except NotFound as exc:
                misses.append(str(exc))
            except FailedPrecondition as exc:
                # Found but not to be opened (EACCES under AppArmor): the next resolver may get there.
                refused = True
                misses.append(str(exc))
        message = "; ".join(misses) or f"pod uid {uid} not found"
        raise FailedPrecondition(message) if refused else NotFound(message)


def make_resolver(strategy: str, proc_root: Path, settings: PodNetnsSettings | None = None) -> PodNetnsResolver:
    """`runtime`: the runtime's records only; `auto`: /proc, then the runtime's records."""
    settings = settings or PodNetnsSettings.load()
    runtime = RuntimeBundlePodResolver(settings.runtime_bundle_roots, proc_root)
    if strategy == "runtime":
        return runtime
    if strategy == "auto":
        return ChainedPodResolver([ProcCgroupPodResolver(proc_root), runtime])
    raise InvalidArgument(f"unknown pod resolver {strategy!r} (known: proc, runtime, auto, disabled)",
                          field="pod_resolver")


def make_pod_resolver(strategy: str, proc_root: Path) -> PodNetnsResolver:
    """The resolver a node agent's `pod_resolver` setting names."""
    if strategy == "proc":
        return ProcCgroupPodResolver(proc_root)
    if strategy == "disabled":
        return DisabledPodResolver()
    # runtime, auto, or anything else, which make_resolver refuses naming the known ones.
    return make_resolver(strategy, proc_root)
