"""Which traffic-control pieces this kernel has, found once by trying them.

Each piece is installed on the loopback device of a scratch network namespace that nothing names,
so whatever the probe leaves behind disappears with the namespace when the probing thread ends;
nothing on the node is touched. Missing pieces come with the kernel's own answer and the module or
config option that provides them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mecbench.core.logging import get_logger
from node_agent import loss, tc
from node_agent.netns import run_in_scratch_namespace

log = get_logger("mecbench.node_agent.probe")

PROBED_KINDS = ("tbf", "htb", "netem", "ingress", "ifb", "u32", "mirred", "clsact", "bpf")

_PROVIDERS = {
    "tbf": "sch_tbf (CONFIG_NET_SCH_TBF)",
    "htb": "sch_htb (CONFIG_NET_SCH_HTB)",
    "netem": "sch_netem (CONFIG_NET_SCH_NETEM)",
    "ingress": "sch_ingress (CONFIG_NET_SCH_INGRESS)",
    "ifb": "ifb (CONFIG_IFB)",
    "u32": "cls_u32 (CONFIG_NET_CLS_U32)",
    "mirred": "act_mirred (CONFIG_NET_ACT_MIRRED)",
    "clsact": "sch_ingress with clsact (CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_ACT)",
    "bpf": "cls_bpf and the bpf(2) syscall (CONFIG_NET_CLS_BPF, CONFIG_BPF_SYSCALL)",
}

_PROBE_IFB = "mbprobe0"


@dataclass(frozen=True)
class KernelSupport:
    supported: tuple[str, ...]
    reasons: dict[str, str] = field(default_factory=dict)

    def supports(self, kind: str) -> bool:
        return kind in self.supported

    def missing(self, kinds: Iterable[str]) -> list[str]:
        """Reasons for each of `kinds` this kernel lacks."""
        return [f"{kind}: {self.reasons.get(kind, 'not supported')}" for kind in kinds if kind not in self.supported]


def _reason(kind: str, exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        code = exc.code
        text = f"the kernel refused it: {os.strerror(code)} (errno {code})"
        if code in (errno.ENOENT, errno.EOPNOTSUPP):
            text += f"; this kernel lacks {_PROVIDERS[kind]}"
        return text
    return f"probe failed: {exc}"


def _probe_in_scratch() -> KernelSupport:
    supported: list[str] = []
    reasons: dict[str, str] = {}

    def attempt(kind: str, action: Callable[[], Any]) -> bool:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - any failure means the kernel lacks it; the reason is kept
            reasons[kind] = _reason(kind, exc)
            return False
        supported.append(kind)
        return True

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")

        def root_then_delete(plan: tc.RootPlan) -> None:
            tc.install_root(ipr, lo, plan, mtu=1500)
            tc.delete_root(ipr, lo)

        attempt("tbf", lambda: root_then_delete(tc.RootPlan(rate_bytes=125_000, burst_bytes=5_000)))
        # Above tbf's 32-bit rate: htb with TCA_HTB_RATE64 is what MECBench would use.
        attempt("htb", lambda: root_then_delete(tc.RootPlan(rate_bytes=2**33, burst_bytes=64 * 2**20)))
        attempt("netem", lambda: root_then_delete(tc.RootPlan(netem=tc.NetemParams(delay_ns=1_000_000))))
        ingress = attempt("ingress", lambda: ipr.tc("add", "ingress", lo, tc.INGRESS_HANDLE))

        def add_ifb() -> int:
            ipr.link("add", ifname=_PROBE_IFB, kind="ifb")
            return int(ipr.link_lookup(ifname=_PROBE_IFB)[0])

        ifb = attempt("ifb", add_ifb)
        if ingress:
            attempt(
                "u32",
                lambda: ipr.tc(
                    "add-filter", "u32", lo, parent=tc.INGRESS_HANDLE, prio=1, protocol=tc.ETH_P_ALL,
                    target=tc.FILTER_CLASSID, keys=["0x0/0x0+0"],
                ),
            )
            redirect_to = int(ipr.link_lookup(ifname=_PROBE_IFB)[0]) if ifb else lo
            if "u32" in supported:
                attempt("mirred", lambda: tc.install_ingress_redirect_filter(ipr, lo, redirect_to))
            else:
                reasons["mirred"] = "not probed: needs a u32 filter to attach to"
        else:
            reasons["u32"] = "not probed: needs an ingress qdisc to attach to"
            reasons["mirred"] = "not probed: needs an ingress qdisc to attach to"
        # Random loss without netem: a bpf drop on a clsact egress hook (node_agent/loss.py).
        if ingress:
            ipr.tc("del", "ingress", lo, tc.INGRESS_HANDLE)
        if attempt("clsact", lambda: ipr.tc("add", "clsact", lo, loss.CLSACT_HANDLE)):
            ipr.tc("del", "clsact", lo, loss.CLSACT_HANDLE)

            def drop_then_delete() -> None:
                loss.install(ipr, lo, 1.0)
                loss.delete(ipr, lo)

            attempt("bpf", drop_then_delete)
        else:
            reasons["bpf"] = "not probed: needs a clsact qdisc to attach to"
    return KernelSupport(tuple(k for k in PROBED_KINDS if k in supported), reasons)


def probe_kernel() -> KernelSupport:
    """Try each piece in a scratch namespace; without the privileges to do so, nothing is supported."""
    try:
        support = run_in_scratch_namespace(_probe_in_scratch)
    except (OSError, NetlinkError) as exc:
        reason = f"could not probe (a scratch network namespace needs CAP_SYS_ADMIN and CAP_NET_ADMIN): {exc}"
        support = KernelSupport((), {kind: reason for kind in PROBED_KINDS})
    log.info("kernel_probed", supported=list(support.supported), unsupported=support.reasons)
    return support


def assume_nothing() -> KernelSupport:
    reason = "kernel probe disabled (probe_kernel = false)"
    return KernelSupport((), {kind: reason for kind in PROBED_KINDS})
