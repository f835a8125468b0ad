"""The cgroup v2 path. Where a cgroup2 hierarchy with the cpu and memory controllers can be mounted
privately, placement runs on it for real; on a node whose controllers are bound to v1 (this one)
that is impossible (a controller lives in one hierarchy at a time), so the real test skips saying
so, and the driver's file writes and read-back are checked against a directory laid out like
cgroupfs (files the kernel would create are made by the test)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.cgroups import CgroupLimits, CgroupV2, cgroup_mounts, detect, shares_to_weight
from tests.conftest import is_root


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cpuset.cpus.effective").write_text("0-3\n")
    return root


def test_v2_writes_the_limits_and_reads_them_back(fake_root: Path) -> None:
    v2 = CgroupV2(fake_root, parent="mecbench")
    assert v2.missing(CgroupLimits(cpu_cores=1.5, cpus=(1, 2), memory_bytes=2**30)) == []
    assert v2.online_cpus() == [0, 1, 2, 3]
    paths = v2.create("placement-a", CgroupLimits(cpu_cores=1.5, cpus=(1, 2), memory_bytes=2**30))
    group = fake_root / "mecbench" / "placement-a"
    assert paths == {"unified": str(group)}
    # Controllers enabled top-down: the root's and MECBench's parent's subtree_control.
    assert (fake_root / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory"
    assert (fake_root / "mecbench" / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory"
    assert (group / "cpu.max").read_text() == "150000 100000"
    # Weighted as 1.5 cores (1536 shares) under contention, the parent as the node's 4 cores.
    assert (group / "cpu.weight").read_text() == str(shares_to_weight(1536)) == "59"
    assert (fake_root / "mecbench" / "cpu.weight").read_text() == str(shares_to_weight(4096))
    assert (group / "cpuset.cpus").read_text() == "1,2"
    assert (group / "memory.max").read_text() == str(2**30)
    assert (group / "memory.swap.max").read_text() == "0"  # no swap escape
    v2.add_process("placement-a", 4242)
    assert (group / "cgroup.procs").read_text() == "4242"
    applied = v2.read("placement-a")
    assert (applied.version, applied.cpu_quota_us, applied.cpu_period_us) == ("v2", 150_000, 100_000)
    assert applied.cpu_cores == pytest.approx(1.5)
    assert applied.cpus == (1, 2) and applied.memory_limit_bytes == 2**30 and applied.swap_limit_bytes == 0
    assert abs(applied.cpu_shares - 1536) < 30  # cpu.weight is coarser than shares
    assert applied.pids == (4242,)
    # The kernel's counters, as v2 names them.
    (group / "cpu.stat").write_text(
        "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 40\nnr_throttled 7\nthrottled_usec 900\n"
    )
    (group / "memory.current").write_text("1000\n")
    (group / "memory.peak").write_text("5000\n")
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    usage = v2.usage("placement-a")
    assert (usage.cpu_usage_ns, usage.cpu_periods, usage.cpu_throttled_periods, usage.cpu_throttled_ns) == (
        2_500_000,
        40,
        7,
        900_000,
    )
    assert (usage.memory_current_bytes, usage.memory_peak_bytes, usage.oom_kills) == (1000, 5000, 1)
    assert v2.names() == ["placement-a"]


def test_v2_no_limit_is_max_and_missing_controllers_are_named(fake_root: Path) -> None:
    v2 = CgroupV2(fake_root)
    v2.create("placement-b", CgroupLimits(memory_bytes=2**28))
    group = fake_root / "mecbench" / "placement-b"
    assert (group / "cpu.max").read_text() == "max 100000"
    assert v2.read("placement-b").cpu_quota_us == 0
    (fake_root / "cgroup.controllers").write_text("io pids\n")
    problems = v2.missing(CgroupLimits(cpu_cores=1, memory_bytes=2**28))
    assert len(problems) == 2 and "no cpu controller" in problems[0] and "no memory controller" in problems[1]


def test_detect_prefers_the_hierarchy_that_has_the_controllers(tmp_path: Path, fake_root: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {fake_root} cgroup2 rw,nosuid 0 0\n")
    driver, reason = detect("auto", mounts_file=mounts)
    assert isinstance(driver, CgroupV2) and reason == ""
    mounts.write_text(
        f"cgroup2 {fake_root} cgroup2 rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
    )
    driver, _ = detect("auto", mounts_file=mounts)
    assert driver is not None and driver.version == "v1"
    driver, _ = detect("v2", mounts_file=mounts)
    assert isinstance(driver, CgroupV2)
    mounts.write_text("proc /proc proc rw 0 0\n")
    driver, reason = detect("auto", mounts_file=mounts)
    assert driver is None and "no cgroup hierarchy" in reason


@pytest.fixture
def private_cgroup2() -> Iterator[Path]:
    if not is_root():
        pytest.skip("mounting a cgroup2 hierarchy needs root")
    v1, _unified = cgroup_mounts()
    target = Path(tempfile.mkdtemp(prefix="mecbench-cgroup2-"))
    mounted = subprocess.run(["mount", "-t", "cgroup2", "none", str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        target.rmdir()
        pytest.skip(f"cannot mount a private cgroup2 hierarchy: {mounted.stderr.strip()}")
    try:
        controllers = set((target / "cgroup.controllers").read_text().split())
        if not {"cpu", "memory"} <= controllers:
            bound = sorted({"cpu", "memory"} & set(v1))
            pytest.skip(
                f"a private cgroup2 mount has only {sorted(controllers) or 'no'} controllers: this kernel binds "
                f"{', '.join(bound) or 'cpu and memory'} to cgroup v1, and a controller lives in one hierarchy at a time"
            )
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)
        target.rmdir()


def test_v2_for_real_on_a_private_mount(private_cgroup2: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    v2 = CgroupV2(private_cgroup2, parent="mecbench-test")
    try:
        v2.create("placement-real", CgroupLimits(cpu_cores=0.5, memory_bytes=2**28))
        v2.add_process("placement-real", sleeper.pid)
        applied = v2.read("placement-real")
        assert applied.cpu_quota_us == 50_000 and applied.memory_limit_bytes == 2**28
        assert sleeper.pid in applied.pids
    finally:
        sleeper.kill()
        sleeper.wait()
        v2.remove("placement-real", {})
        (private_cgroup2 / "mecbench-test").rmdir()
