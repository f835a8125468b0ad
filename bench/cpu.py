"""CPU time of a process tree, read from /proc: what each part of a run costs, robust to the
machine's noise in a way that latencies and ceilings are not (a process's CPU time is its own,
however many others compete for the cores)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_ROLES = ("loadgen_agent.worker", "loadgen-agent", "sut-agent", "node-agent")


@dataclass(frozen=True)
class Process:
    pid: int
    role: str
    cpu_s: float


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def _role(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    return next((role for role in _ROLES if role in command), "other")


def process_tree(root: int) -> dict[int, Process]:
    """Every live descendant of `root` (not `root` itself), with its role and CPU time so far."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))
                cpu[int(entry)] = stat[1]
    tree: dict[int, Process] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        tree[pid] = Process(pid, _role(pid), cpu.get(pid, 0.0))
        stack.extend(children.get(pid, []))
    return tree


def cpu_by_role(before: dict[int, Process], after: dict[int, Process]) -> dict[str, float]:
    """CPU seconds each role spent between two readings of the same tree (processes that started
    in between count from zero; those that ended are not counted)."""
    spent: dict[str, float] = {}
    for pid, process in after.items():
        start = before[pid].cpu_s if pid in before else 0.0
        spent[process.role] = spent.get(process.role, 0.0) + process.cpu_s - start
    return spent
