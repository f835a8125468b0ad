"""Checks every request field and unit, reporting all violations at once, before anything is touched.

The result is a plain description (`ShapingSpec`) the shaping logic works from; the protobuf
messages stop here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration

from mecbench.core import durations
from mecbench.core.errors import Violations
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent.netns import valid_netns_name, valid_netns_path
from node_agent.pods import check_pod_reference
from node_agent.settings import NodeAgentSettings
from node_agent.tc import NetemParams

INTERFACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
MAX_DELAY_NS = 60 * 1_000_000_000  # MECBench's bound; netem's 32-bit tick field holds ~274 s
MIN_RATE_BPS = 1_000
MAX_RATE_BPS = 1_000_000_000_000
MAX_OWNER_LEN = 256

_DISTRIBUTIONS = {
    common_pb2.JITTER_DISTRIBUTION_UNSPECIFIED: "",
    common_pb2.JITTER_DISTRIBUTION_UNIFORM: "",
    common_pb2.JITTER_DISTRIBUTION_NORMAL: "normal",
    common_pb2.JITTER_DISTRIBUTION_PARETO: "pareto",
    common_pb2.JITTER_DISTRIBUTION_PARETO_NORMAL: "paretonormal",
}
_DIRECTIONS = {
    common_pb2.DIRECTION_UNSPECIFIED: (True, False),  # egress, as tc does by default
    common_pb2.DIRECTION_EGRESS: (True, False),
    common_pb2.DIRECTION_INGRESS: (False, True),
    common_pb2.DIRECTION_BOTH: (True, True),
}


@dataclass(frozen=True)
class TargetSpec:
    interface: str
    netns_kind: str  # "host", "name", "path" or "pod"
    netns_ref: str  # the name, the path, or "namespace/name" of the pod
    pod_uid: str = ""

    def describe(self) -> str:
        where = {"host": "the host namespace", "pod": f"pod {self.netns_ref}"}.get(
            self.netns_kind, f"netns {self.netns_ref}"
        )
        return f"{self.interface} in {where}"


@dataclass(frozen=True)
class ShapingSpec:
    target: TargetSpec
    egress: bool
    ingress: bool
    rate_bytes: int
    burst_bytes: int  # 0 = derived from the rate and the interface's MTU
    netem: NetemParams | None
    owner: str
    lease_s: float
    replace: bool


def check_duration(d: Duration, field: str, violations: Violations, max_ns: int | None = None) -> int:
    """Nanoseconds of a duration, or a violation (negative, malformed or too long)."""
    if durations.is_negative(d):
        violations.add(field, "must not be negative")
        return 0
    if d.nanos >= 1_000_000_000:
        violations.add(field, "nanos must be below 1e9")
        return 0
    ns = durations.to_ns(d)
    if max_ns is not None and ns > max_ns:
        violations.add(field, f"must be at most {max_ns / 1e9:g}s")
        return 0
    return ns


def check_percent(value: float, field: str, violations: Violations) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        violations.add(field, f"must be a percentage in 0..100, got {value:g}")
        return 0.0
    return value


def check_interface(name: str, field: str, violations: Violations) -> None:
    if not name:
        violations.add(field, "required")
    elif not INTERFACE_RE.match(name) or name in {".", ".."}:
        violations.add(field, "must be an interface name: 1-15 of letters, digits and _ . : -")


def check_target(target: node_agent_pb2.ShapingTarget, field: str, violations: Violations) -> TargetSpec:
    check_interface(target.interface, f"{field}.interface", violations)
    which = target.WhichOneof("netns")
    if which == "netns_name":
        if not valid_netns_name(target.netns_name):
            violations.add(f"{field}.netns_name", "must be a namespace name: letters, digits and _ . - (no slashes)")
        return TargetSpec(target.interface, "name", target.netns_name)
    if which == "netns_path":
        if not valid_netns_path(target.netns_path):
            violations.add(
                f"{field}.netns_path",
                "must be /proc/<pid>/ns/net, /proc/<pid>/task/<tid>/ns/net, /run/netns/<name> "
                "or /run/docker/netns/<id>",
            )
        return TargetSpec(target.interface, "path", target.netns_path)
    if which == "pod":
        pod = target.pod
        check_pod_reference(pod.namespace, pod.name, pod.uid, f"{field}.pod", violations)
        return TargetSpec(target.interface, "pod", f"{pod.namespace}/{pod.name}", pod.uid)
    return TargetSpec(target.interface, "host", "")


def check_lease(d: Duration, field: str, settings: NodeAgentSettings, violations: Violations) -> float:
    ns = check_duration(d, field, violations, max_ns=int(settings.max_lease_s * 1e9))
    return ns / 1e9 if ns else settings.default_lease_s


def check_owner(owner: str, field: str, violations: Violations) -> None:
    if not owner:
        violations.add(field, "required: who holds the lease (a run id)")
    elif len(owner) > MAX_OWNER_LEN or not owner.isprintable():
        violations.add(field, f"must be printable and at most {MAX_OWNER_LEN} characters")


def check_netem(
    config: common_pb2.NetemConfig, field: str, violations: Violations
) -> tuple[int, int, NetemParams | None]:
    """(rate in bytes/s, burst in bytes, netem parameters or None when no netem is needed)."""
    rate_bps = config.rate_bps
    if rate_bps and not MIN_RATE_BPS <= rate_bps <= MAX_RATE_BPS:
        violations.add(f"{field}.rate_bps", f"must be 0 (no limit) or {MIN_RATE_BPS}..{MAX_RATE_BPS} bit/s")
    delay_ns = check_duration(config.delay, f"{field}.delay", violations, MAX_DELAY_NS)
    jitter_ns = check_duration(config.jitter, f"{field}.jitter", violations, MAX_DELAY_NS)
    percents = {
        name: check_percent(getattr(config, name), f"{field}.{name}", violations)
        for name in (
            "delay_correlation_percent",
            "loss_percent",
            "loss_correlation_percent",
            "reorder_percent",
            "reorder_correlation_percent",
            "duplicate_percent",
            "corrupt_percent",
        )
    }
    distribution = _DISTRIBUTIONS.get(config.jitter_distribution)
    if distribution is None:
        violations.add(f"{field}.jitter_distribution", f"unknown distribution {config.jitter_distribution}")
        distribution = ""
    if distribution and not (jitter_ns and delay_ns):
        violations.add(f"{field}.jitter_distribution", "a delay distribution needs both a delay and a jitter")
    if percents["delay_correlation_percent"] and not (jitter_ns and delay_ns):
        violations.add(f"{field}.delay_correlation_percent", "needs both a delay and a jitter")
    if percents["loss_correlation_percent"] and not percents["loss_percent"]:
        violations.add(f"{field}.loss_correlation_percent", "needs loss_percent")
    if percents["reorder_correlation_percent"] and not percents["reorder_percent"]:
        violations.add(f"{field}.reorder_correlation_percent", "needs reorder_percent")
    if percents["reorder_percent"] and not delay_ns:
        violations.add(f"{field}.reorder_percent", "reordering needs a delay (netem sends the reordered packets early)")
    if jitter_ns and not delay_ns:
        violations.add(f"{field}.jitter", "jitter needs a delay to vary around")
    needs_netem = bool(delay_ns or jitter_ns or any(percents.values()))
    if config.limit_packets and not needs_netem:
        violations.add(f"{field}.limit_packets", "is netem's queue: it needs a netem parameter (delay, loss, ...)")
    if config.burst_bytes and not rate_bps:
        violations.add(f"{field}.burst_bytes", "is the rate limiter's burst: it needs rate_bps")
    if not rate_bps and not needs_netem:
        violations.add(field, "nothing to shape: set rate_bps or a netem parameter (delay, loss, ...)")
    netem = None
    if needs_netem:
        netem = NetemParams(
            delay_ns=delay_ns,
            jitter_ns=jitter_ns,
            distribution=distribution,
            delay_correlation=percents["delay_correlation_percent"],
            loss=percents["loss_percent"],
            loss_correlation=percents["loss_correlation_percent"],
            reorder=percents["reorder_percent"],
            reorder_correlation=percents["reorder_correlation_percent"],
            duplicate=percents["duplicate_percent"],
            corrupt=percents["corrupt_percent"],
            limit=config.limit_packets,
        )
    return rate_bps // 8, config.burst_bytes, netem


def check_apply(request: node_agent_pb2.ApplyShapingRequest, settings: NodeAgentSettings) -> ShapingSpec:
    violations = Violations()
    if not request.HasField("target"):
        violations.add("target", "required")
    target = check_target(request.target, "target", violations)
    directions = _DIRECTIONS.get(request.direction)
    if directions is None:
        violations.add("direction", f"unknown direction {request.direction}")
        directions = (True, False)
    rate_bytes, burst_bytes, netem = check_netem(request.netem, "netem", violations)
    check_owner(request.owner, "owner", violations)
    lease_s = check_lease(request.lease_duration, "lease_duration", settings, violations)
    violations.raise_if_any()
    return ShapingSpec(
        target=target,
        egress=directions[0],
        ingress=directions[1],
        rate_bytes=rate_bytes,
        burst_bytes=burst_bytes,
        netem=netem,
        owner=request.owner,
        lease_s=lease_s,
        replace=request.replace,
    )
