"""Random loss without netem: a bpf classifier on a clsact qdisc's egress hook drops each packet
with the asked probability (direct action: TC_ACT_SHOT, else TC_ACT_OK), before the root qdisc.

Used where the kernel lacks netem but has clsact and cls_bpf (a gact action with `random` would do
the same, where act_gact exists; the probe says which kernel has what). The program is seven eBPF
instructions assembled here, loaded with the bpf(2) syscall (no compiler needed):

    r0 = bpf_get_prandom_u32()        ; helper 7
    r0 >>= 1                          ; 31 bits, so the threshold fits a signed 32-bit immediate
    if r0 < THRESHOLD goto drop       ; THRESHOLD = percent / 100 * 2^31
    r0 = 0 ; exit                     ; TC_ACT_OK
    drop: r0 = 2 ; exit               ; TC_ACT_SHOT

The filter carries MECBench's priority (0x6d65) and a name holding the percentage, which is how
the agent recognises it and reads the asked figure back; what it really drops is measured by the
link probe (node_agent/linkprobe.py).
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

CLSACT_HANDLE = 0xFFFF0000
CLSACT_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
FILTER_PRIO = 0x6D65
ETH_P_ALL = 0x0003
SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
NAME_PREFIX = "mecbench-loss-"
_NAME = re.compile(r"^mecbench-loss-([0-9.]+)$")


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def threshold(percent: float) -> int:
    return min(2**31 - 1, round(percent / 100 * 2**31))


def drop_program(percent: float) -> bytes:
    """The eBPF instructions of a random drop with probability `percent`/100."""
    return b"".join([
        _insn(0x85, imm=7),  # call bpf_get_prandom_u32
        _insn(0x77, imm=1),  # r0 >>= 1 (ALU64 RSH K)
        _insn(0xA5, off=2, imm=threshold(percent)),  # if r0 < imm goto +2 (JMP JLT K)
        _insn(0xB7, imm=0),  # r0 = TC_ACT_OK
        _insn(0x95),  # exit
        _insn(0xB7, imm=2),  # r0 = TC_ACT_SHOT
        _insn(0x95),  # exit
    ])


def load_program(percent: float) -> int:
    """Load the drop program; returns its fd (the caller closes it once the filter holds it)."""
    number = SYS_BPF.get(os.uname().machine)
    if number is None:
        raise OSError(f"bpf(2) syscall number unknown on {os.uname().machine}")
    code = drop_program(percent)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack(
        "<IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, ctypes.addressof(insns),
        ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0, b"mecbench_loss",
    )
    attr += b"\0" * (128 - len(attr))
    buffer = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(number, BPF_PROG_LOAD, buffer, len(attr)))
    if fd < 0:
        errno_ = ctypes.get_errno()
        raise OSError(errno_, f"bpf(BPF_PROG_LOAD): {os.strerror(errno_)} {log.value.decode(errors='replace')}")
    return fd


def _attach(ipr: Any, index: int, percent: float) -> None:
    fd = load_program(percent)
    try:
        ipr.tc("add-filter", "bpf", index, parent=CLSACT_EGRESS, prio=FILTER_PRIO, protocol=ETH_P_ALL, fd=fd,
               name=f"{NAME_PREFIX}{percent:g}", direct_action=True)
    finally:
        os.close(fd)


def install(ipr: Any, index: int, percent: float) -> None:
    """clsact on `index` with our drop filter on its egress hook."""
    ipr.tc("add", "clsact", index, CLSACT_HANDLE)
    _attach(ipr, index, percent)


def _ours(ipr: Any, index: int) -> list[Any]:
    try:
        filters = list(ipr.get_filters(index=index, parent=CLSACT_EGRESS))
    except NetlinkError:
        return []
    found = []
    for flt in filters:
        options = flt.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options is not None else None
        if (flt["info"] >> 16) == FILTER_PRIO and flt.get_attr("TCA_KIND") == "bpf" and name and _NAME.match(name):
            found.append(flt)
    return found


def installed_percent(ipr: Any, index: int) -> float | None:
    """The drop probability of our filter on `index` (from its name), or None without one."""
    for flt in _ours(ipr, index):
        match = _NAME.match(flt.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME"))
        if match:
            return float(match[1])
    return None


def _detach(ipr: Any, index: int) -> None:
    try:
        ipr.tc("del-filter", "bpf", index, parent=CLSACT_EGRESS, prio=FILTER_PRIO, protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code != 2:
            raise


def change(ipr: Any, index: int, percent: float) -> None:
    """A new probability: the filter is replaced; the qdiscs (and their queues) are not touched."""
    _detach(ipr, index)
    _attach(ipr, index, percent)


def delete(ipr: Any, index: int) -> bool:
    """Remove our filter, and the clsact with it when nothing else is attached to it."""
    if installed_percent(ipr, index) is None:
        return False
    _detach(ipr, index)
    try:
        others = list(ipr.get_filters(index=index, parent=CLSACT_EGRESS)) + list(
            ipr.get_filters(index=index, parent=CLSACT_INGRESS)
        )
    except NetlinkError:
        others = []
    if not others:
        try:
            ipr.tc("del", "clsact", index, CLSACT_HANDLE)
        except NetlinkError as exc:
            if exc.code not in (2, 22):
                raise
    return True
