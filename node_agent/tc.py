"""Traffic-control messages through pyroute2 (never the `tc` binary), and the kernel's readback.

Handles. Everything MECBench installs carries a handle whose major number lies in 0x6d65-0x6d6f
("me"): the root qdisc is 6d65:, an htb root's default class 6d65:1 and a netem leaf under it
6d66:. The ingress qdisc's handle is fixed by the kernel (ffff:), so ours is recognised by our
u32 filter at priority 0x6d65 redirecting to our ifb device. A root qdisc whose handle major is
0 is the kernel's default (pfifo_fast, noqueue, mq, fq_codel, noop on a down link): it may be
replaced. Any other root belongs to someone else and is never replaced.

Qdisc choice, per root (an interface's egress, or the ifb device carrying its ingress):
  * rate only -> tbf, while the rate fits tbf's 32-bit bytes/s field (about 34.36 Gbit/s);
    above that -> htb, whose class takes the 64-bit rate (TCA_HTB_RATE64);
  * netem parameters only -> netem as the root;
  * netem parameters and a rate -> htb root 6d65: with default class 6d65:1 at the rate
    (ceil = rate) and netem 6d66: as the class's leaf. netem's own rate field is not used: it is
    32-bit in pyroute2, and it models per-packet serialisation rather than the token bucket the
    rate-only case uses, so the two cases would not limit the same way.

netem translation. pyroute2's netem helper takes delay and jitter in microseconds (converted to
psched ticks), corruption as `prob_corrupt`, truncates probabilities where tc rounds them, and
cannot send a delay-distribution table. MECBench therefore fills pyroute2's netem message class
itself, value for value what iproute2's tc sends (checked against a capture of tc 6.1): the
tc_netem_qopt struct, TCA_NETEM_CORR, TCA_NETEM_REORDER (gap 1; reordering needs a delay),
TCA_NETEM_CORRUPT, and TCA_NETEM_DELAY_DIST with a table generated as iproute2 generates its
.dist files (`distributions.py`).
Jitter without a rate reorders packets (netem releases each at its own drawn time); that is netem's
behaviour and is reported, not hidden.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWQDISC
from pyroute2.netlink.rtnl.tcmsg import common as tc_common
from pyroute2.netlink.rtnl.tcmsg import sched_netem, tcmsg

from node_agent import loss
from node_agent.distributions import distribution_table

MAJOR_FIRST = 0x6D65
MAJOR_LAST = 0x6D6F
ROOT_HANDLE = 0x6D650000
DEFAULT_CLASS = 0x6D650001
LEAF_HANDLE = 0x6D660000
FILTER_PRIO = 0x6D65
FILTER_CLASSID = 0x6D650001
INGRESS_HANDLE = 0xFFFF0000
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
CLSACT_PARENT = 0xFFFFFFF2  # clsact's egress hook; its ingress hook shares ingress's parent
ETH_P_ALL = 0x0003

TBF_MAX_RATE_BYTES = 2**32 - 1
# Queue of a rate limiter, as time at the rate (tbf's `latency`): enough for TCP to fill the
# bucket, short enough not to add bufferbloat the profile did not ask for.
RATE_QUEUE_S = 0.05
# Burst: at least what the rate delivers in 4 ms (tc's rate/HZ rule for HZ=250), and at least
# two full frames so one packet of any size can always pass.
BURST_TIME_S = 0.004
ETHERNET_HEADER = 14
U32_MAX = 2**32 - 1


def psched_ticks_per_us() -> float:
    """Kernel packet-scheduler ticks per microsecond (from /proc/net/psched, via pyroute2)."""
    return float(tc_common.tick_in_usec)


def handle_text(handle: int) -> str:
    """A handle as tc prints it: "6d65:" for a qdisc, "6d65:1" for a class."""
    major, minor = handle >> 16, handle & 0xFFFF
    return f"{major:x}:{minor:x}" if minor else f"{major:x}:"


def parent_text(parent: int) -> str:
    if parent == TC_H_ROOT:
        return "root"
    return f"{parent >> 16:x}:{parent & 0xFFFF:x}"


def is_ours(handle: int) -> bool:
    return MAJOR_FIRST <= (handle >> 16) <= MAJOR_LAST


def is_kernel_default(handle: int) -> bool:
    return (handle >> 16) == 0


# --- what to install ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NetemParams:
    """netem settings in the units MECBench validated (ns, percent)."""

    delay_ns: int = 0
    jitter_ns: int = 0
    distribution: str = ""  # "" = uniform (no table); else "normal", "pareto", "paretonormal"
    delay_correlation: float = 0.0
    loss: float = 0.0
    loss_correlation: float = 0.0
    reorder: float = 0.0
    reorder_correlation: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    limit: int = 1000


@dataclass(frozen=True)
class RootPlan:
    """What one root (an egress, or the ifb of an ingress) gets. `bpf_loss_percent`: random drop
    by a bpf classifier on a clsact egress hook, where the kernel has no netem (see loss.py)."""

    rate_bytes: int = 0
    burst_bytes: int = 0
    netem: NetemParams | None = None
    bpf_loss_percent: float = 0.0

    @property
    def root_kind(self) -> str:
        if self.netem is not None and self.rate_bytes:
            return "htb"
        if self.netem is not None:
            return "netem"
        if not self.rate_bytes:
            return ""  # loss alone, by the bpf classifier: no root qdisc
        return "tbf" if self.rate_bytes <= TBF_MAX_RATE_BYTES else "htb"

    @property
    def kinds(self) -> list[str]:
        kinds = [self.root_kind] if self.root_kind else []
        if self.netem is not None and self.rate_bytes:
            kinds.append("netem")
        if self.bpf_loss_percent:
            kinds += ["clsact", "bpf"]
        return kinds


def default_burst(rate_bytes: int, mtu: int) -> int:
    return max(math.ceil(rate_bytes * BURST_TIME_S), 2 * (mtu + ETHERNET_HEADER))


def netem_limit(params_limit: int, rate_bytes: int, delay_ns: int, jitter_ns: int, mtu: int) -> int:
    """netem's queue (packets) holds everything in flight during the delay: at a known rate,
    size it for twice the bandwidth-delay product so the delay does not turn into loss."""
    if params_limit:
        return params_limit
    if not rate_bytes:
        return 1000
    in_flight = rate_bytes * (delay_ns + jitter_ns) / 1e9 / (mtu + ETHERNET_HEADER)
    return max(1000, math.ceil(2 * in_flight))


# --- netem messages ----------------------------------------------------------------------------


class netem_options(nla):  # type: ignore[misc]  # noqa: N801 - pyroute2's naming of nla classes
    """netem's TCA_OPTIONS with every attribute mapped, the distribution table among them
    (pyroute2's own map encodes TCA_NETEM_DELAY_DIST as nothing).

    Not a subclass of pyroute2's `sched_netem.options`, whose compiled map a subclass would
    inherit (see mecbench_tcmsg)."""

    nla_map = (
        ("TCA_NETEM_UNSPEC", "none"),
        ("TCA_NETEM_CORR", "netem_corr"),
        ("TCA_NETEM_DELAY_DIST", "cdata"),
        ("TCA_NETEM_REORDER", "netem_reorder"),
        ("TCA_NETEM_CORRUPT", "netem_corrupt"),
        ("TCA_NETEM_LOSS", "none"),
        ("TCA_NETEM_RATE", "netem_rate"),
        ("TCA_NETEM_ECN", "uint32"),
        ("TCA_NETEM_RATE64", "uint64"),
        ("TCA_NETEM_PAD", "none"),
        ("TCA_NETEM_LATENCY64", "int64"),
        ("TCA_NETEM_JITTER64", "int64"),
    )
    fields = sched_netem.options.fields
    netem_corr = sched_netem.options.netem_corr
    netem_reorder = sched_netem.options.netem_reorder
    netem_corrupt = sched_netem.options.netem_corrupt
    netem_rate = sched_netem.options.netem_rate


class mecbench_tcmsg(tcmsg):  # type: ignore[misc]  # noqa: N801
    """tcmsg whose netem options are `netem_options`."""

    # pyroute2 marks a message class's attribute map compiled in a name-mangled class attribute
    # (nlmsg_base.__compiled_nla). Once IPRoute has decoded any tc message, tcmsg carries it, this
    # subclass inherits it, and its map (with our get_options) would never be compiled: netem
    # options would silently be encoded with pyroute2's map, which drops the distribution table.
    _nlmsg_base__compiled_nla = False

    # pyroute2 calls get_options as a static method with the message first.
    @staticmethod
    def get_options(self: Any, *argv: Any, **kwarg: Any) -> Any:  # noqa: PLW0211
        if self.get_attr("TCA_KIND") == "netem":
            return netem_options
        return tcmsg.get_options(self, *argv, **kwarg)


def probability(percent: float) -> int:
    """A percentage as netem's 32-bit probability, rounded as tc rounds it (pyroute2 truncates)."""
    return min(U32_MAX, round(percent / 100 * U32_MAX))


def netem_attributes(params: NetemParams) -> dict[str, Any]:
    """TCA_OPTIONS of a netem qdisc, attribute for attribute what iproute2's tc sends: the
    tc_netem_qopt struct (delay and jitter in psched ticks, probabilities as fractions of
    2^32-1), then TCA_NETEM_CORR, TCA_NETEM_REORDER, TCA_NETEM_CORRUPT and TCA_NETEM_DELAY_DIST
    when they apply. The table is the one distribution this agent generates (pyroute2 has none)."""
    ticks_per_us = psched_ticks_per_us()
    options: dict[str, Any] = {
        "delay": int(params.delay_ns / 1000 * ticks_per_us),
        "limit": params.limit,
        "loss": probability(params.loss),
        # netem reorders every `gap`-th packet when reorder is set; tc sets gap 1 then.
        "gap": 1 if params.reorder else 0,
        "duplicate": probability(params.duplicate),
        "jitter": int(params.jitter_ns / 1000 * ticks_per_us),
        "attrs": [],
    }
    if params.delay_correlation or params.loss_correlation:
        corr = {
            "delay_corr": probability(params.delay_correlation),
            "loss_corr": probability(params.loss_correlation),
            "dup_corr": 0,
        }
        options["attrs"].append(["TCA_NETEM_CORR", corr])
    if params.reorder:
        reorder = {"prob_reorder": probability(params.reorder), "corr_reorder": probability(params.reorder_correlation)}
        options["attrs"].append(["TCA_NETEM_REORDER", reorder])
    if params.corrupt:
        options["attrs"].append(["TCA_NETEM_CORRUPT", {"prob_corrupt": probability(params.corrupt), "corr_corrupt": 0}])
    if params.distribution:
        table = distribution_table(params.distribution)
        options["attrs"].append(["TCA_NETEM_DELAY_DIST", struct.pack(f"={len(table)}h", *table)])
    return options


def netem_message(index: int, handle: int, parent: int, params: NetemParams) -> mecbench_tcmsg:
    msg = mecbench_tcmsg()
    msg["family"] = 0
    msg["index"] = index
    msg["handle"] = handle
    msg["parent"] = parent
    msg["info"] = 0
    msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", netem_attributes(params)]]
    return msg


# --- installing and removing -------------------------------------------------------------------

CREATE_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL


def send_request(ipr: Any, msg: Any, msg_type: int, msg_flags: int) -> tuple[Any, ...]:
    """Send a message pyroute2's `tc()` cannot build; errors raise NetlinkError as `tc()` does."""
    try:
        ipr.status["nlm_generator"]
    except KeyError:
        # pyroute2 0.9.7's sync IPRoute leaves this unset and its nlm_request reads it.
        ipr.asyncore.status["nlm_generator"] = False
    return tuple(ipr.nlm_request(msg, msg_type=msg_type, msg_flags=msg_flags))


def add_netem(ipr: Any, index: int, handle: int, parent: int, params: NetemParams) -> None:
    send_request(ipr, netem_message(index, handle, parent, params), RTM_NEWQDISC, CREATE_FLAGS)


def install_root(ipr: Any, index: int, plan: RootPlan, mtu: int) -> None:
    """Install `plan` as the root of interface `index` (whose root is the kernel's default)."""
    if plan.bpf_loss_percent:
        loss.install(ipr, index, plan.bpf_loss_percent)
    kind = plan.root_kind
    if not kind:
        return
    if kind == "netem":
        assert plan.netem is not None
        add_netem(ipr, index, ROOT_HANDLE, TC_H_ROOT, plan.netem)
        return
    if kind == "tbf":
        ipr.tc("add", "tbf", index, ROOT_HANDLE, **tbf_options(plan))
        return
    ipr.tc("add", "htb", index, ROOT_HANDLE, default=DEFAULT_CLASS & 0xFFFF)
    quantum = min(200_000, max(mtu + ETHERNET_HEADER, plan.rate_bytes // 10))
    ipr.tc(
        "add-class",
        "htb",
        index,
        DEFAULT_CLASS,
        parent=ROOT_HANDLE,
        rate=plan.rate_bytes,
        ceil=plan.rate_bytes,
        burst=plan.burst_bytes,
        cburst=plan.burst_bytes,
        quantum=quantum,
    )
    if plan.netem is not None:
        add_netem(ipr, index, LEAF_HANDLE, DEFAULT_CLASS, plan.netem)


# tc's `change`: RTM_NEWQDISC without NLM_F_CREATE, so the kernel changes the qdisc in place
# (keeping its queue) and refuses when there is none to change.
CHANGE_FLAGS = NLM_F_REQUEST | NLM_F_ACK


def change_netem(ipr: Any, index: int, handle: int, parent: int, params: NetemParams) -> None:
    send_request(ipr, netem_message(index, handle, parent, params), RTM_NEWQDISC, CHANGE_FLAGS)


def tbf_options(plan: RootPlan) -> dict[str, int]:
    return {
        "rate": plan.rate_bytes,
        "burst": plan.burst_bytes,
        "limit": int(plan.rate_bytes * RATE_QUEUE_S) + plan.burst_bytes,
    }


def change_root(ipr: Any, index: int, plan: RootPlan, mtu: int) -> None:
    """Change the installed root of `index` (of the same kinds as `plan`) to `plan`'s figures in
    place: tbf's parameters (its queue's limit follows, queued packets stay), the htb class's
    rate, netem's options; a bpf drop's probability by replacing its filter (no qdisc changes)."""
    if plan.bpf_loss_percent:
        loss.change(ipr, index, plan.bpf_loss_percent)
    kind = plan.root_kind
    if not kind:
        return
    if kind == "netem":
        assert plan.netem is not None
        change_netem(ipr, index, ROOT_HANDLE, TC_H_ROOT, plan.netem)
        return
    if kind == "tbf":
        ipr.tc("change", "tbf", index, ROOT_HANDLE, **tbf_options(plan))
        return
    quantum = min(200_000, max(mtu + ETHERNET_HEADER, plan.rate_bytes // 10))
    ipr.tc(
        "change-class",
        "htb",
        index,
        DEFAULT_CLASS,
        parent=ROOT_HANDLE,
        rate=plan.rate_bytes,
        ceil=plan.rate_bytes,
        burst=plan.burst_bytes,
        cburst=plan.burst_bytes,
        quantum=quantum,
    )
    if plan.netem is not None:
        change_netem(ipr, index, LEAF_HANDLE, DEFAULT_CLASS, plan.netem)


def delete_root(ipr: Any, index: int) -> bool:
    """Delete the root qdisc of `index` if it is ours (and our bpf drop, if any); the kernel puts
    its default back."""
    loss.delete(ipr, index)
    root = find_root(ipr, index)
    if root is None or not is_ours(root["handle"]):
        return False
    try:
        ipr.tc("del", index=index, handle=root["handle"], parent=TC_H_ROOT)
    except NetlinkError as exc:
        if exc.code not in (2, 22):  # ENOENT/EINVAL: already gone
            raise
        return False
    return True


def install_ingress_redirect(ipr: Any, index: int, ifb_index: int) -> None:
    """ingress qdisc ffff: on `index` with a match-all u32 filter redirecting to the ifb."""
    ipr.tc("add", "ingress", index, INGRESS_HANDLE)
    install_ingress_redirect_filter(ipr, index, ifb_index)


def install_ingress_redirect_filter(ipr: Any, index: int, ifb_index: int) -> None:
    ipr.tc(
        "add-filter",
        "u32",
        index,
        parent=INGRESS_HANDLE,
        prio=FILTER_PRIO,
        protocol=ETH_P_ALL,
        target=FILTER_CLASSID,
        keys=["0x0/0x0+0"],
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb_index},
    )


def ingress_redirect_target(ipr: Any, index: int) -> int | None:
    """ifindex our u32 filter on the ingress qdisc redirects to, or None if it is not there."""
    try:
        filters = list(ipr.get_filters(index=index, parent=INGRESS_HANDLE))
    except NetlinkError:
        return None
    for flt in filters:
        if (flt["info"] >> 16) != FILTER_PRIO or flt.get_attr("TCA_KIND") != "u32":
            continue
        options = flt.get_attr("TCA_OPTIONS")
        actions = options.get_attr("TCA_U32_ACT") if options is not None else None
        if actions is None:
            continue
        for _name, action in actions["attrs"]:
            if action.get_attr("TCA_ACT_KIND") != "mirred":
                continue
            parms = action.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
            return int(parms["ifindex"])
    return None


def delete_ingress_redirect(ipr: Any, index: int) -> bool:
    """Remove our filter; remove the ingress qdisc too when no other filter is left on it."""
    if ingress_redirect_target(ipr, index) is None:
        return False
    try:
        # pyroute2 builds u32 options even for a delete, so it needs target and keys; the kernel
        # deletes by parent, prio and protocol (the whole prio, which only our filter uses).
        ipr.tc(
            "del-filter", "u32", index, parent=INGRESS_HANDLE, prio=FILTER_PRIO, protocol=ETH_P_ALL,
            target=FILTER_CLASSID, keys=["0x0/0x0+0"],
        )
    except NetlinkError as exc:
        if exc.code != 2:
            raise
    remaining = [f for f in ipr.get_filters(index=index, parent=INGRESS_HANDLE) if (f["info"] >> 16) != FILTER_PRIO]
    if not remaining:
        try:
            ipr.tc("del", "ingress", index, INGRESS_HANDLE)
        except NetlinkError as exc:
            if exc.code not in (2, 22):
                raise
    return True


# --- reading back ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QdiscCounters:
    """A qdisc's own statistics (TCA_STATS2: basic and queue), cumulative since it was installed."""

    bytes: int = 0
    packets: int = 0
    drops: int = 0
    overlimits: int = 0
    requeues: int = 0
    backlog_bytes: int = 0
    backlog_packets: int = 0


def decode_counters(msg: Any) -> QdiscCounters:
    """The counters of a qdisc message; the legacy TCA_STATS struct where TCA_STATS2 is absent."""
    stats2 = msg.get_attr("TCA_STATS2")
    if stats2 is not None:
        basic = stats2.get_attr("TCA_STATS_BASIC") or {}
        queue = stats2.get_attr("TCA_STATS_QUEUE") or {}
        return QdiscCounters(
            bytes=int(basic.get("bytes", 0)),
            packets=int(basic.get("packets", 0)),
            drops=int(queue.get("drops", 0)),
            overlimits=int(queue.get("overlimits", 0)),
            requeues=int(queue.get("requeues", 0)),
            backlog_bytes=int(queue.get("backlog", 0)),
            backlog_packets=int(queue.get("qlen", 0)),
        )
    stats = msg.get_attr("TCA_STATS")
    if stats is None:
        return QdiscCounters()
    return QdiscCounters(
        bytes=int(stats["bytes"]), packets=int(stats["packets"]), drops=int(stats["drop"]),
        overlimits=int(stats["overlimits"]), backlog_bytes=int(stats["backlog"]), backlog_packets=int(stats["qlen"]),
    )


@dataclass
class QdiscReading:
    """A qdisc as the kernel reports it, parameters decoded into MECBench's units."""

    kind: str
    handle: int
    parent: int
    params: dict[str, str] = field(default_factory=dict)
    counters: QdiscCounters = field(default_factory=QdiscCounters)


def _percent(fraction: int) -> str:
    return f"{round(fraction / U32_MAX * 100, 4):g}"


def _us(ticks: int) -> str:
    return f"{round(ticks / psched_ticks_per_us()):d}"


def _decode_netem(options: Any) -> dict[str, str]:
    params = {
        "delay_us": _us(options["delay"]),
        "jitter_us": _us(options["jitter"]),
        "limit_packets": str(options["limit"]),
        "loss_percent": _percent(options["loss"]),
        "duplicate_percent": _percent(options["duplicate"]),
        "gap": str(options["gap"]),
    }
    corr = options.get_attr("TCA_NETEM_CORR")
    if corr is not None:
        params["delay_correlation_percent"] = _percent(corr["delay_corr"])
        params["loss_correlation_percent"] = _percent(corr["loss_corr"])
    reorder = options.get_attr("TCA_NETEM_REORDER")
    if reorder is not None:
        params["reorder_percent"] = _percent(reorder["prob_reorder"])
        params["reorder_correlation_percent"] = _percent(reorder["corr_reorder"])
    corrupt = options.get_attr("TCA_NETEM_CORRUPT")
    if corrupt is not None:
        params["corrupt_percent"] = _percent(corrupt["prob_corrupt"])
    rate = options.get_attr("TCA_NETEM_RATE")
    if rate is not None and rate["rate"]:
        params["rate_bps"] = str(rate["rate"] * 8)
    return params


def _decode_tbf(options: Any) -> dict[str, str]:
    parms = options.get_attr("TCA_TBF_PARMS")
    if parms is None:
        return {}
    rate = int(parms["rate"])
    burst = round(parms["buffer"] / psched_ticks_per_us() * rate / 1e6) if rate else 0
    return {"rate_bps": str(rate * 8), "burst_bytes": str(burst), "limit_bytes": str(parms["limit"])}


def _decode_htb_class(options: Any) -> dict[str, str]:
    parms = options.get_attr("TCA_HTB_PARMS")
    if parms is None:
        return {}
    rate = options.get_attr("TCA_HTB_RATE64") or parms["rate"]
    ceil = options.get_attr("TCA_HTB_CEIL64") or parms["ceil"]
    burst = round(parms["buffer"] / psched_ticks_per_us() * rate / 1e6) if rate else 0
    return {"rate_bps": str(int(rate) * 8), "ceil_bps": str(int(ceil) * 8), "burst_bytes": str(burst)}


def decode_qdisc(msg: Any, classes: dict[int, Any]) -> QdiscReading:
    kind = msg.get_attr("TCA_KIND") or ""
    reading = QdiscReading(kind=kind, handle=int(msg["handle"]), parent=int(msg["parent"]))
    try:
        reading.counters = decode_counters(msg)
    except (KeyError, TypeError, AttributeError, ValueError):
        reading.params["counters_error"] = "counters could not be decoded"
    options = msg.get_attr("TCA_OPTIONS")
    try:
        if kind == "netem" and options is not None:
            reading.params = _decode_netem(options)
        elif kind == "tbf" and options is not None:
            reading.params = _decode_tbf(options)
        elif kind == "htb":
            init = options.get_attr("TCA_HTB_INIT") if options is not None else None
            if init is not None:
                default = (reading.handle & 0xFFFF0000) | int(init["defcls"])
                reading.params["default_class"] = handle_text(default)
                cls = classes.get(default)
                if cls is not None and cls.get_attr("TCA_OPTIONS") is not None:
                    reading.params.update(_decode_htb_class(cls.get_attr("TCA_OPTIONS")))
    except (KeyError, TypeError, AttributeError):  # a kernel attribute pyroute2 decodes differently
        reading.params["decode_error"] = "parameters could not be decoded"
    return reading


def read_qdiscs(ipr: Any, index: int) -> list[QdiscReading]:
    """Every qdisc on interface `index`, as the kernel reports it."""
    messages = [m for m in ipr.get_qdiscs(index) if int(m["index"]) == index]
    classes: dict[int, Any] = {}
    if any(m.get_attr("TCA_KIND") == "htb" for m in messages):
        classes = {int(c["handle"]): c for c in ipr.get_classes(index) if c.get_attr("TCA_KIND") == "htb"}
    return [decode_qdisc(m, classes) for m in messages]


def find_root(ipr: Any, index: int) -> dict[str, Any] | None:
    for msg in ipr.get_qdiscs(index):
        if int(msg["index"]) == index and int(msg["parent"]) == TC_H_ROOT:
            return {"kind": msg.get_attr("TCA_KIND"), "handle": int(msg["handle"])}
    return None


def find_ingress(ipr: Any, index: int) -> dict[str, Any] | None:
    """The qdisc in the ingress slot (ingress or clsact), if any."""
    for msg in ipr.get_qdiscs(index):
        if int(msg["index"]) == index and int(msg["parent"]) == TC_H_INGRESS:
            return {"kind": msg.get_attr("TCA_KIND"), "handle": int(msg["handle"])}
    return None
