"""Control groups through their files: the v1 hierarchies (cpu, cpuacct, cpuset, memory) and the v2
unified one. Plain file reads and writes, no daemon in between, so what is read back is what the
kernel holds.

Every group MECBench makes lives under one parent (`mecbench` at each hierarchy's root by
default), named after its placement, so the reconcile can tell its own groups from anyone else's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mecbench.core.logging import get_logger

log = get_logger("mecbench.node_agent.cgroups")

CPU_PERIOD_US = 100_000
# The kernel's lower bound for cfs_quota_us / cpu.max's quota.
MIN_CPU_QUOTA_US = 1_000
# A placement's cores are its share under contention too (a floor as well as a ceiling), as the
# kubelet does for a pod's CPU request: 1024 shares a core, and MECBench's parent group weighs as
# many cores as the node has (kubepods' weight), so other processes cannot starve a SUT of them.
SHARES_PER_CORE = 1024
MIN_SHARES = 2
MAX_SHARES = 262_144


def cpu_shares(cores: float) -> int:
    return min(MAX_SHARES, max(MIN_SHARES, round(cores * SHARES_PER_CORE)))


def shares_to_weight(shares: int) -> int:
    """v1 cpu.shares as v2 cpu.weight (1..10000), by the kubelet's formula."""
    return 1 + ((shares - MIN_SHARES) * 9999) // (MAX_SHARES - MIN_SHARES)


def weight_to_shares(weight: int) -> int:
    return MIN_SHARES + ((weight - 1) * (MAX_SHARES - MIN_SHARES)) // 9999
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory")


@dataclass(frozen=True)
class CgroupLimits:
    """What a group is confined to; zero and empty mean no limit."""

    cpu_cores: float = 0.0
    cpus: tuple[int, ...] = ()
    memory_bytes: int = 0

    def controllers(self) -> list[str]:
        """The controllers these limits need (v1 names; v2 has the same ones)."""
        needed = []
        if self.cpu_cores:
            needed.append("cpu")
        if self.cpus:
            needed.append("cpuset")
        if self.memory_bytes:
            needed.append("memory")
        return needed


@dataclass
class AppliedGroup:
    """A group's limits as its files say, and the processes in it."""

    version: str
    paths: dict[str, str]
    cpu_quota_us: int = 0  # 0 = no limit
    cpu_period_us: int = 0
    cpu_shares: int = 0  # v1 cpu.shares (v2: cpu.weight as shares); 0 = not read
    cpus: tuple[int, ...] = ()
    memory_limit_bytes: int = 0  # 0 = no limit
    swap_limit_bytes: int = 0
    pids: tuple[int, ...] = ()

    @property
    def cpu_cores(self) -> float:
        return self.cpu_quota_us / self.cpu_period_us if self.cpu_quota_us and self.cpu_period_us else 0.0


@dataclass
class GroupUsage:
    cpu_usage_ns: int = 0
    cpu_periods: int = 0
    cpu_throttled_periods: int = 0
    cpu_throttled_ns: int = 0
    memory_current_bytes: int = 0
    memory_peak_bytes: int = 0
    oom_kills: int = 0
    notes: list[str] = field(default_factory=list)


class Cgroups(Protocol):
    """One cgroup version's way of making, filling, reading and removing MECBench's groups."""

    version: str

    def missing(self, limits: CgroupLimits) -> list[str]:
        """What this node lacks for `limits` (controllers, write access), each said in words."""
        ...

    def online_cpus(self) -> list[int]:
        """The cores groups may be pinned to (the parent's cpuset, else the online ones)."""
        ...

    def create(self, name: str, limits: CgroupLimits) -> dict[str, str]: ...

    def add_process(self, name: str, pid: int) -> None: ...

    def read(self, name: str) -> AppliedGroup: ...

    def usage(self, name: str) -> GroupUsage: ...

    def read_groups(self, groups: dict[str, str]) -> AppliedGroup:
        """Any group, named as /proc/<pid>/cgroup names it ({hierarchy: path}): a pod's."""
        ...

    def usage_groups(self, groups: dict[str, str]) -> GroupUsage: ...

    def remove(self, name: str, return_to: dict[str, str]) -> None:
        """Move what is still in the group back to `return_to` (hierarchy -> group path, as
        /proc/<pid>/cgroup names it; the root where it is gone) and delete the group."""
        ...

    def names(self) -> list[str]:
        """Groups under MECBench's parent, in any hierarchy."""
        ...

    def groups_of(self, pid: int) -> dict[str, str]:
        """The groups `pid` is in now, keyed by hierarchy (/proc/<pid>/cgroup)."""
        ...


# --- parsing -----------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """ "0-2,5" -> (0, 1, 2, 5)."""
    cpus: list[int] = []
    for item in text.strip().split(","):
        part = item.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return tuple(sorted(set(cpus)))


def format_cpu_list(cpus: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _read(path: Path) -> str:
    return path.read_text().strip()


def _read_int(path: Path, default: int = 0) -> int:
    try:
        text = _read(path)
    except OSError:
        return default
    if text == "max":
        return default
    try:
        return int(text)
    except ValueError:
        return default


def _keyed(path: Path) -> dict[str, int]:
    """A "key value" per line file (cpu.stat, memory.events, memory.oom_control)."""
    values: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _write(path: Path, value: str) -> None:
    with path.open("w") as handle:
        handle.write(value)


def cgroup_mounts(mounts_file: Path = Path("/proc/self/mounts")) -> tuple[dict[str, Path], Path | None]:
    """(v1 controller -> its hierarchy's mount point, the cgroup2 mount or None)."""
    v1: dict[str, Path] = {}
    unified: Path | None = None
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return v1, None
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mount_point, fstype, options = parts[1], parts[2], parts[3].split(",")
        if fstype == "cgroup2" and unified is None:
            unified = Path(mount_point)
        elif fstype == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options and controller not in v1:
                    v1[controller] = Path(mount_point)
    return v1, unified


def process_groups(pid: int, proc_root: Path = Path("/proc")) -> dict[str, str]:
    """/proc/<pid>/cgroup as {hierarchy: path}; "unified" for the v2 line."""
    groups: dict[str, str] = {}
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return groups
    for line in text.splitlines():
        _id, controllers, path = line.split(":", 2)
        if not controllers:
            groups["unified"] = path
        for controller in controllers.split(","):
            if controller in V1_CONTROLLERS:
                groups[controller] = path
    return groups


def cpus_allowed(pid: int, proc_root: Path = Path("/proc")) -> str:
    """Cpus_allowed_list of /proc/<pid>/status; "" when the process is gone."""
    try:
        for line in (proc_root / str(pid) / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _move_out(procs_file: Path, pids: list[int]) -> None:
    for pid in pids:
        try:
            _write(procs_file, str(pid))
        except OSError as exc:
            if exc.errno != errno.ESRCH:  # gone while it was moved: nothing to move
                log.warning("cgroup_move_failed", pid=pid, target=str(procs_file), error=str(exc))


def _rmdir(path: Path) -> None:
    """Delete a group directory; a group whose last process is still exiting is busy briefly."""
    for _attempt in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    path.rmdir()


def _pids(procs_file: Path) -> list[int]:
    try:
        return [int(line) for line in procs_file.read_text().split()]
    except OSError:
        return []


def _parent_path(parent: str) -> str:
    return parent.strip("/") or "mecbench"


# --- v1 ----------------------------------------------------------------------------------------


class CgroupV1:
    """The v1 hierarchies, each mounted on its own (or co-mounted: cpu,cpuacct). Groups are made
    in every hierarchy that has the controller, so a placement's CPU time and memory are counted
    even where it asked for no limit."""

    version = "v1"

    def __init__(self, mounts: dict[str, Path], parent: str = "mecbench", proc_root: Path = Path("/proc")) -> None:
        self.mounts = {c: Path(p) for c, p in mounts.items() if c in V1_CONTROLLERS}
        self.parent = _parent_path(parent)
        self.proc_root = proc_root

    def _hierarchies(self, limits: CgroupLimits | None = None) -> dict[str, Path]:
        """Hierarchy name -> its mount, one entry per controller this group goes in (cpuset only
        when pinned: a cpuset group needs its cores and memory nodes set before it takes a process)."""
        chosen = {}
        for controller, mount in self.mounts.items():
            if controller == "cpuset" and (limits is None or not limits.cpus):
                continue
            chosen[controller] = mount
        return chosen

    def _dir(self, controller: str, name: str) -> Path:
        return self.mounts[controller] / self.parent / name

    def missing(self, limits: CgroupLimits) -> list[str]:
        problems = [
            f"the cgroup v1 {controller} controller is not mounted (needed for "
            f"{ {'cpu': 'cpu_cores', 'cpuset': 'cpus', 'memory': 'memory_bytes'}[controller] })"
            for controller in limits.controllers()
            if controller not in self.mounts
        ]
        for controller in limits.controllers():
            mount = self.mounts.get(controller)
            if mount is not None and not os.access(mount, os.W_OK):
                problems.append(f"cgroup v1 {controller} at {mount} is not writable (the node agent is not root)")
        return problems

    def online_cpus(self) -> list[int]:
        mount = self.mounts.get("cpuset")
        if mount is not None:
            with contextlib.suppress(OSError, ValueError):
                return list(parse_cpu_list(_read(mount / "cpuset.cpus")))
        return sorted(os.sched_getaffinity(0))

    def _ensure_parent(self, controller: str) -> Path:
        mount = self.mounts[controller]
        parent = mount / self.parent
        parent.mkdir(exist_ok=True)
        if controller == "cpuset":
            # A new cpuset is empty and takes no process until its cores and nodes are set.
            for name in ("cpuset.mems", "cpuset.cpus"):
                if not _read(parent / name):
                    _write(parent / name, _read(mount / name))
        if controller == "cpu":
            _write(parent / "cpu.shares", str(cpu_shares(len(self.online_cpus()))))
        return parent

    def create(self, name: str, limits: CgroupLimits) -> dict[str, str]:
        paths: dict[str, str] = {}
        made: set[Path] = set()
        for controller in self._hierarchies(limits):
            parent = self._ensure_parent(controller)
            group = parent / name
            if group not in made:
                group.mkdir(exist_ok=True)
                made.add(group)
            paths[controller] = str(group)
            if controller == "cpu":
                _write(group / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                quota = max(MIN_CPU_QUOTA_US, round(limits.cpu_cores * CPU_PERIOD_US)) if limits.cpu_cores else -1
                _write(group / "cpu.cfs_quota_us", str(quota))
                if limits.cpu_cores:
                    _write(group / "cpu.shares", str(cpu_shares(limits.cpu_cores)))
            elif controller == "cpuset":
                _write(group / "cpuset.mems", _read(parent / "cpuset.mems"))
                _write(group / "cpuset.cpus", format_cpu_list(limits.cpus))
            elif controller == "memory":
                # What the process already uses moves with it where the kernel still offers that
                # (v1 move_charge, refused by recent kernels: there the group counts what is
                # allocated after the move, which is why a SUT is placed before its server starts).
                with contextlib.suppress(OSError):
                    _write(group / "memory.move_charge_at_immigrate", "3")
                if not limits.memory_bytes:
                    continue
                _write(group / "memory.limit_in_bytes", str(limits.memory_bytes))
                # No swap escape: memory plus swap is capped at the same figure where the kernel
                # accounts swap; swapping is discouraged either way.
                if (group / "memory.memsw.limit_in_bytes").exists():
                    _write(group / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
                with contextlib.suppress(OSError):
                    _write(group / "memory.swappiness", "0")
        return paths

    def add_process(self, name: str, pid: int) -> None:
        # cgroup.procs moves every thread of the process; its later children are born inside.
        for controller in self.mounts:
            group = self._dir(controller, name)
            if group.is_dir():
                _write(group / "cgroup.procs", str(pid))

    def _own(self, name: str) -> dict[str, str]:
        return {controller: f"/{self.parent}/{name}" for controller in self.mounts}

    def _dirs(self, groups: dict[str, str]) -> dict[str, Path]:
        return {c: self.mounts[c] / path.lstrip("/") for c, path in groups.items() if c in self.mounts}

    def read(self, name: str) -> AppliedGroup:
        return self.read_groups(self._own(name))

    def read_groups(self, groups: dict[str, str]) -> AppliedGroup:
        applied = AppliedGroup(version=self.version, paths={})
        pids: set[int] = set()
        for controller, group in self._dirs(groups).items():
            if not group.is_dir():
                continue
            applied.paths[controller] = str(group)
            pids.update(_pids(group / "cgroup.procs"))
            if controller == "cpu":
                quota = _read_int(group / "cpu.cfs_quota_us", -1)
                applied.cpu_quota_us = quota if quota > 0 else 0
                applied.cpu_period_us = _read_int(group / "cpu.cfs_period_us")
                applied.cpu_shares = _read_int(group / "cpu.shares")
            elif controller == "cpuset":
                with contextlib.suppress(OSError, ValueError):
                    applied.cpus = parse_cpu_list(_read(group / "cpuset.cpus"))
            elif controller == "memory":
                limit = _read_int(group / "memory.limit_in_bytes")
                # v1 reports "no limit" as a huge page-rounded number.
                applied.memory_limit_bytes = limit if 0 < limit < 2**62 else 0
                memsw = _read_int(group / "memory.memsw.limit_in_bytes")
                if applied.memory_limit_bytes and 0 < memsw < 2**62:
                    applied.swap_limit_bytes = max(0, memsw - applied.memory_limit_bytes)
                elif applied.memory_limit_bytes:
                    applied.swap_limit_bytes = memsw  # swap not accounted: the kernel sets no cap
        applied.pids = tuple(sorted(pids))
        return applied

    def usage(self, name: str) -> GroupUsage:
        return self.usage_groups(self._own(name))

    def usage_groups(self, groups: dict[str, str]) -> GroupUsage:
        usage = GroupUsage()
        dirs = self._dirs(groups)
        if "cpuacct" in dirs:
            usage.cpu_usage_ns = _read_int(dirs["cpuacct"] / "cpuacct.usage")
        else:
            usage.notes.append("no cpuacct hierarchy: CPU time not counted")
        if "cpu" in dirs:
            stat = _keyed(dirs["cpu"] / "cpu.stat")
            usage.cpu_periods = stat.get("nr_periods", 0)
            usage.cpu_throttled_periods = stat.get("nr_throttled", 0)
            usage.cpu_throttled_ns = stat.get("throttled_time", 0)
        if "memory" in dirs:
            group = dirs["memory"]
            usage.memory_current_bytes = _read_int(group / "memory.usage_in_bytes")
            usage.memory_peak_bytes = _read_int(group / "memory.max_usage_in_bytes")
            usage.oom_kills = _keyed(group / "memory.oom_control").get("oom_kill", 0)
        return usage

    def remove(self, name: str, return_to: dict[str, str]) -> None:
        for controller, mount in self.mounts.items():
            group = self._dir(controller, name)
            if not group.is_dir():
                continue
            target = mount / return_to.get(controller, "/").lstrip("/")
            if not (target / "cgroup.procs").exists():
                target = mount
            for _attempt in range(3):
                pids = _pids(group / "cgroup.procs")
                if not pids:
                    break
                _move_out(target / "cgroup.procs", pids)
            _rmdir(group)

    def names(self) -> list[str]:
        found: set[str] = set()
        for mount in self.mounts.values():
            parent = mount / self.parent
            if parent.is_dir():
                found.update(p.name for p in parent.iterdir() if p.is_dir())
        return sorted(found)

    def groups_of(self, pid: int) -> dict[str, str]:
        return {k: v for k, v in process_groups(pid, self.proc_root).items() if k in self.mounts}


# --- v2 ----------------------------------------------------------------------------------------


class CgroupV2:
    """The unified hierarchy: one directory per group, controllers enabled top-down through
    cgroup.subtree_control. MECBench's parent holds no process itself (v2's rule that only leaves
    hold processes once controllers are enabled below)."""

    version = "v2"

    def __init__(self, root: Path, parent: str = "mecbench", proc_root: Path = Path("/proc")) -> None:
        self.root = Path(root)
        self.parent = _parent_path(parent)
        self.proc_root = proc_root

    def available(self) -> set[str]:
        try:
            return set(_read(self.root / "cgroup.controllers").split())
        except OSError:
            return set()

    def missing(self, limits: CgroupLimits) -> list[str]:
        available = self.available()
        problems = [
            f"the cgroup v2 hierarchy at {self.root} has no {controller} controller "
            f"(it has: {' '.join(sorted(available)) or 'none'})"
            for controller in limits.controllers()
            if controller not in available
        ]
        if limits.controllers() and not os.access(self.root, os.W_OK):
            problems.append(f"cgroup v2 at {self.root} is not writable (the node agent is not root)")
        return problems

    def online_cpus(self) -> list[int]:
        with contextlib.suppress(OSError, ValueError):
            text = _read(self.root / "cpuset.cpus.effective")
            if text:
                return list(parse_cpu_list(text))
        return sorted(os.sched_getaffinity(0))

    def _dir(self, name: str) -> Path:
        return self.root / self.parent / name

    def create(self, name: str, limits: CgroupLimits) -> dict[str, str]:
        available = self.available()
        wanted = [c for c in ("cpu", "cpuset", "memory") if c in available]
        parent = self.root / self.parent
        parent.mkdir(exist_ok=True)
        enable = " ".join(f"+{c}" for c in wanted)
        if enable:
            _write(self.root / "cgroup.subtree_control", enable)
            _write(parent / "cgroup.subtree_control", enable)
        group = parent / name
        group.mkdir(exist_ok=True)
        quota = max(MIN_CPU_QUOTA_US, round(limits.cpu_cores * CPU_PERIOD_US)) if limits.cpu_cores else "max"
        if limits.cpu_cores or "cpu" in wanted:
            _write(group / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if "cpu" in wanted:
            _write(parent / "cpu.weight", str(shares_to_weight(cpu_shares(len(self.online_cpus())))))
            if limits.cpu_cores:
                _write(group / "cpu.weight", str(shares_to_weight(cpu_shares(limits.cpu_cores))))
        if limits.cpus:
            _write(group / "cpuset.cpus", format_cpu_list(limits.cpus))
        if limits.memory_bytes:
            _write(group / "memory.max", str(limits.memory_bytes))
            # No swap escape.
            _write(group / "memory.swap.max", "0")
        return {"unified": str(group)}

    def add_process(self, name: str, pid: int) -> None:
        _write(self._dir(name) / "cgroup.procs", str(pid))

    def read(self, name: str) -> AppliedGroup:
        return self.read_groups({"unified": f"/{self.parent}/{name}"})

    def read_groups(self, groups: dict[str, str]) -> AppliedGroup:
        if "unified" not in groups:
            return AppliedGroup(version=self.version, paths={})
        group = self.root / groups["unified"].lstrip("/")
        applied = AppliedGroup(version=self.version, paths={"unified": str(group)} if group.is_dir() else {})
        if not group.is_dir():
            return applied
        applied.pids = tuple(sorted(_pids(group / "cgroup.procs")))
        with contextlib.suppress(OSError):
            quota, _, period = _read(group / "cpu.max").partition(" ")
            applied.cpu_quota_us = int(quota) if quota != "max" else 0
            applied.cpu_period_us = int(period or CPU_PERIOD_US)
        weight = _read_int(group / "cpu.weight")
        applied.cpu_shares = weight_to_shares(weight) if weight else 0
        with contextlib.suppress(OSError, ValueError):
            applied.cpus = parse_cpu_list(_read(group / "cpuset.cpus"))
        applied.memory_limit_bytes = _read_int(group / "memory.max")
        applied.swap_limit_bytes = _read_int(group / "memory.swap.max")
        return applied

    def usage(self, name: str) -> GroupUsage:
        return self.usage_groups({"unified": f"/{self.parent}/{name}"})

    def usage_groups(self, groups: dict[str, str]) -> GroupUsage:
        if "unified" not in groups:
            return GroupUsage(notes=["the process is in no cgroup v2 group"])
        group = self.root / groups["unified"].lstrip("/")
        stat = _keyed(group / "cpu.stat")
        usage = GroupUsage(
            cpu_usage_ns=stat.get("usage_usec", 0) * 1000,
            cpu_periods=stat.get("nr_periods", 0),
            cpu_throttled_periods=stat.get("nr_throttled", 0),
            cpu_throttled_ns=stat.get("throttled_usec", 0) * 1000,
            memory_current_bytes=_read_int(group / "memory.current"),
            memory_peak_bytes=_read_int(group / "memory.peak"),
            oom_kills=_keyed(group / "memory.events").get("oom_kill", 0),
        )
        if not (group / "memory.peak").exists():
            usage.notes.append("memory.peak not offered by this kernel (5.19+): peak not measured")
        return usage

    def remove(self, name: str, return_to: dict[str, str]) -> None:
        group = self._dir(name)
        if not group.is_dir():
            return
        target = self.root / return_to.get("unified", "/").lstrip("/")
        if not (target / "cgroup.procs").exists():
            target = self.root
        for _attempt in range(3):
            pids = _pids(group / "cgroup.procs")
            if not pids:
                break
            _move_out(target / "cgroup.procs", pids)
        _rmdir(group)

    def names(self) -> list[str]:
        parent = self.root / self.parent
        return sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []

    def groups_of(self, pid: int) -> dict[str, str]:
        return {k: v for k, v in process_groups(pid, self.proc_root).items() if k == "unified"}


def detect(
    version: str = "auto", parent: str = "mecbench", mounts_file: Path = Path("/proc/self/mounts")
) -> tuple[Cgroups | None, str]:
    """The cgroup driver for this node and "", or None and why there is none.

    "auto" takes v1 where the v1 cpu or memory hierarchy is mounted (a hybrid node binds those
    controllers to v1, leaving its cgroup2 mount without them), else v2 where the unified
    hierarchy offers cpu or memory."""
    v1_mounts, unified = cgroup_mounts(mounts_file)
    if version in ("auto", "v1") and ("cpu" in v1_mounts or "memory" in v1_mounts):
        return CgroupV1(v1_mounts, parent), ""
    if version in ("auto", "v2") and unified is not None:
        v2 = CgroupV2(unified, parent)
        if v2.available() & {"cpu", "memory"}:
            return v2, ""
        if version == "v2":
            return None, f"the cgroup2 mount at {unified} offers neither cpu nor memory"
    if version not in ("auto", "v1", "v2"):
        return None, f"unknown cgroup version setting {version!r} (auto, v1, v2)"
    return None, "no cgroup hierarchy with the cpu or memory controller is mounted"
