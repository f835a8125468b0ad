"""Time-varying links: a shaping's schedule, applied step by step by changing the installed qdiscs
in place (RTM_NEWQDISC/RTM_NEWTCLASS without NLM_F_CREATE: tc's `change`), never by deleting and
adding them, so queued packets and connections live on through every step.

A schedule is checked whole before anything is installed: times from 0 upwards, and every step
the same kinds of qdisc as the first (a tbf cannot become a netem in place). Once started, a
thread applies each step at its time since the start (a period makes it loop), reads the kernel's
parameters back right after the change and keeps the applied timeline until it is stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from mecbench.core import durations
from mecbench.core.errors import Violations
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent import loss, tc
from node_agent.validation import check_duration, check_netem

log = get_logger("mecbench.node_agent.schedule")

MAX_STEPS = 10_000
MAX_SCHEDULE_NS = 24 * 3600 * 10**9


@dataclass(frozen=True)
class CheckedStep:
    at_s: float
    rate_bytes: int
    burst_bytes: int
    netem: tc.NetemParams | None


def check_schedule(schedule: common_pb2.LinkSchedule, field: str, violations: Violations) -> list[CheckedStep]:
    """Every step's figures as ApplyShaping checks `netem`, times in order from 0."""
    steps: list[CheckedStep] = []
    if len(schedule.steps) > MAX_STEPS:
        violations.add(f"{field}.steps", f"at most {MAX_STEPS} steps")
        return steps
    if not schedule.steps:
        violations.add(f"{field}.steps", "at least one step")
    previous = -1
    for index, step in enumerate(schedule.steps):
        where = f"{field}.steps[{index}]"
        at_ns = check_duration(step.at, f"{where}.at", violations, MAX_SCHEDULE_NS)
        if index == 0 and at_ns != 0:
            violations.add(f"{where}.at", "the first step is at 0")
        elif index and at_ns <= previous:
            violations.add(f"{where}.at", "steps must be in time order, each after the one before")
        previous = at_ns
        rate_bytes, burst_bytes, netem = check_netem(step.netem, f"{where}.netem", violations)
        steps.append(CheckedStep(at_ns / 1e9, rate_bytes, burst_bytes, netem))
    period_ns = check_duration(schedule.period, f"{field}.period", violations, MAX_SCHEDULE_NS)
    if period_ns and steps and period_ns <= previous:
        violations.add(f"{field}.period", "must be after the last step")
    return steps


@dataclass
class ScheduleRun:
    """A started schedule: the thread applying it and what it has applied so far."""

    shaping_id: str
    started_at: float  # unix time
    stop: threading.Event = field(default_factory=threading.Event)
    applied: list[node_agent_pb2.AppliedStep] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def timeline(self) -> list[node_agent_pb2.AppliedStep]:
        with self.lock:
            return list(self.applied)


def step_times(steps: list[tuple[float, Any]], period_s: float) -> Iterator[tuple[int, float, Any]]:
    """(step index, seconds since the start, plan) in order; a period repeats them forever."""
    cycle = 0
    while True:
        for index, (at_s, plan) in enumerate(steps):
            yield index, cycle * period_s + at_s, plan
        if not period_s:
            return
        cycle += 1


def run_schedule(
    run: ScheduleRun,
    plans: list[tuple[float, tc.RootPlan]],
    period_s: float,
    open_netlink: Callable[[], AbstractContextManager[Any]],
    roots: Callable[[Any], list[int]],
    mtu: int,
) -> None:
    """Apply each step at its time (the thread's body). The first step is applied at 0 too: a
    restarted schedule goes back to it. A step that fails is recorded with the kernel's reason
    and the schedule goes on."""
    started = time.monotonic()
    with open_netlink() as ipr:
        for index, at_s, plan in step_times(plans, period_s):
            if run.stop.wait(max(0.0, started + at_s - time.monotonic())):
                return
            applied = node_agent_pb2.AppliedStep(step=index, planned=durations.from_seconds(at_s))
            try:
                indices = roots(ipr)
                for ifindex in indices:
                    tc.change_root(ipr, ifindex, plan, mtu)
                applied.applied.CopyFrom(durations.from_seconds(time.monotonic() - started))
                for ifindex in indices[:1]:
                    dropped = loss.installed_percent(ipr, ifindex)
                    if dropped is not None:
                        applied.params.update({"loss_percent": f"{dropped:g}", "loss_mechanism": "bpf"})
                    for reading in tc.read_qdiscs(ipr, ifindex):
                        if reading.handle == tc.ROOT_HANDLE:
                            applied.params.update(reading.params)
                        elif reading.handle == tc.LEAF_HANDLE:
                            applied.params.update({f"netem.{k}": v for k, v in reading.params.items()})
            except (NetlinkError, OSError) as exc:
                applied.applied.CopyFrom(durations.from_seconds(time.monotonic() - started))
                applied.error = f"the kernel refused the change: {exc}"
                log.warning("schedule_step_failed", shaping_id=run.shaping_id, step=index, error=str(exc))
            with run.lock:
                run.applied.append(applied)
