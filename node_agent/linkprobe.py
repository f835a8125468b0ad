"""A short measurement through a shaped link: what it carries, and its round trip.

Rate. From inside the shaped namespace, UDP datagrams to the link's far end are offered at 1.5x
the requested rate (paced in 2 ms slots, capped at what a Python sender can offer), and the
interface's own transmit counter (IFLA_STATS64 tx_bytes, counted by the device after the qdisc,
link-layer bytes as the token bucket counts them) gives what the link carried over a window that
starts once the bucket's burst and queue are spent. When the link carried (nearly) all that was
offered, it was not saturated: its rate is only known to be at least that much.

Round trip. TCP handshakes to a closed port of the far end (the SYN goes out through the shaping,
the kernel there answers RST at once), median of a few, measured before the rate probe so no queue
adds to them. Nothing needs to listen on the far side: any peer with a TCP stack answers.

Only an egress shaping can be probed from its own side; an ingress one is reported not probed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node_agent.netns import Namespace

PAYLOAD_BYTES = 1400
# UDP + IPv4 + Ethernet headers: what the interface counts for each datagram.
FRAME_OVERHEAD = 8 + 20 + 14
OFFER_FACTOR = 1.5
MAX_OFFER_BPS = 200e6  # what a Python sender offers without starving the node of CPU
SLOT_S = 0.002
DISCARD_PORT = 9
RTT_SAMPLES = 5
RTT_TIMEOUT_S = 2.0
TOLERANCE = 0.10
# The far end's answer to a SYN on a closed port; also what an unreachable net answers.
_ANSWERED = (errno.ECONNREFUSED, 0)


@dataclass
class ProbeOutcome:
    peer_address: str
    measured_rate_bps: float = 0.0
    offered_rate_bps: float = 0.0
    saturated: bool = False
    rtt_s: float | None = None
    rtt_samples: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return (
            f"rate: UDP offered at {OFFER_FACTOR:g}x the asked rate (at most {MAX_OFFER_BPS / 1e6:g} Mbit/s), "
            "interface tx_bytes over the window; rtt: median TCP SYN->RST to a closed port of the peer"
        )


def peer_of(ipr: Any, ifindex: int) -> str:
    """The far end of a point-to-point link: the other host of a /30 or /31, else a neighbour."""
    for message in ipr.get_addr(family=socket.AF_INET, index=ifindex):
        prefix = int(message["prefixlen"])
        address = ipaddress.IPv4Interface(f"{message.get_attr('IFA_ADDRESS')}/{prefix}")
        if prefix in (30, 31):
            hosts = [h for h in address.network.hosts()] if prefix == 30 else list(address.network)
            others = [h for h in hosts if h != address.ip]
            if len(others) == 1:
                return str(others[0])
    for neighbour in ipr.get_neighbours(ifindex=ifindex, family=socket.AF_INET):
        destination = neighbour.get_attr("NDA_DST")
        if destination:
            return str(destination)
    return ""


def _socket_in(ns: Namespace, kind: int) -> socket.socket:
    """A socket created inside `ns` (it stays there), used from this thread."""
    fileno = ns.run(lambda: socket.socket(socket.AF_INET, kind).detach())
    return socket.socket(socket.AF_INET, kind, fileno=fileno)


def _tx_bytes(ipr: Any, ifindex: int) -> int:
    link = ipr.link("get", index=ifindex)[0]
    stats = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
    return int(stats["tx_bytes"])


def measure_rtt(ns: Namespace, peer: str, samples: int = RTT_SAMPLES) -> list[float]:
    """Round trips of TCP handshakes answered by the peer (RST from a closed port)."""
    found = []
    for _ in range(samples):
        sock = _socket_in(ns, socket.SOCK_STREAM)
        try:
            sock.settimeout(RTT_TIMEOUT_S)
            started = time.perf_counter()
            code = sock.connect_ex((peer, DISCARD_PORT))
            took = time.perf_counter() - started
        finally:
            sock.close()
        if code in _ANSWERED:
            found.append(took)
    return found


def measure_rate(
    ns: Namespace, ipr: Any, ifindex: int, peer: str, rate_bps: float, window_s: float,
    clock: Callable[[], float] = time.monotonic, offer_bps: float = 0.0,
) -> tuple[float, float]:
    """(carried, offered) link-layer bit/s over the window, after a warm-up that fills the queue."""
    offer_bps = offer_bps or min(rate_bps * OFFER_FACTOR, MAX_OFFER_BPS)
    frame = PAYLOAD_BYTES + FRAME_OVERHEAD
    # The warm-up spends the bucket's burst and fills its queue (50 ms at the rate) at the offer.
    warmup_s = 0.25
    sock = _socket_in(ns, socket.SOCK_DGRAM)
    payload = b"\x00" * PAYLOAD_BYTES
    try:
        sock.setblocking(False)
        started = clock()
        sent_frames = 0
        window_started = 0.0
        window_frames_at_start = 0
        tx_at_start = 0
        while True:
            now = clock()
            elapsed = now - started
            if not window_started and elapsed >= warmup_s:
                window_started, window_frames_at_start, tx_at_start = now, sent_frames, _tx_bytes(ipr, ifindex)
            if window_started and now - window_started >= window_s:
                break
            due = int(elapsed * offer_bps / 8 / frame) + 1
            while sent_frames < due:
                try:
                    sock.sendto(payload, (peer, DISCARD_PORT))
                except (BlockingIOError, ConnectionRefusedError):
                    break  # a full send buffer, or the far end's ICMP answer: not offered
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # Offered and dropped on the way out (a qdisc or a drop filter said so).
                sent_frames += 1
            time.sleep(SLOT_S)
        took = clock() - window_started
        carried = (_tx_bytes(ipr, ifindex) - tx_at_start) * 8 / took
        offered = (sent_frames - window_frames_at_start) * frame * 8 / took
        return carried, offered
    finally:
        sock.close()


def judge_rate(outcome: ProbeOutcome, requested_bps: float) -> None:
    measured, offered = outcome.measured_rate_bps, outcome.offered_rate_bps
    outcome.saturated = offered > measured * 1.05
    off = (measured - requested_bps) / requested_bps
    figures = f"measured {measured / 1e6:.3f} Mbit/s, asked {requested_bps / 1e6:.3f} Mbit/s ({off * 100:+.1f}%)"
    if outcome.saturated and abs(off) > TOLERANCE:
        outcome.problems.append(f"rate: {figures}")
    elif not outcome.saturated and off > TOLERANCE:
        outcome.problems.append(f"rate: {figures} and the link was not even saturated")
    elif not outcome.saturated:
        outcome.notes.append(
            f"rate: the link carried all the probe offered ({offered / 1e6:.3f} Mbit/s): it is at least that fast, "
            "the probe could not reach the asked rate"
        )


def judge_delay(outcome: ProbeOutcome, requested_s: float) -> None:
    if outcome.rtt_s is None:
        outcome.notes.append("delay: the peer answered no handshake, round trip not measured")
        return
    # The base round trip of a veth is tens of microseconds; a millisecond absorbs any host's.
    slack = TOLERANCE * requested_s + 0.001
    if abs(outcome.rtt_s - requested_s) > slack:
        outcome.problems.append(
            f"delay: round trip {outcome.rtt_s * 1e3:.2f} ms, asked one-way {requested_s * 1e3:.2f} ms on egress "
            f"(tolerance {slack * 1e3:.2f} ms)"
        )


# Loss is measured below the rate (nothing waits or overflows), at most at this offer.
LOSS_OFFER_BPS = 10e6


def measure_loss(ns: Namespace, ipr: Any, ifindex: int, peer: str, rate_bps: float, window_s: float
                 ) -> tuple[float, int]:
    """(percent of offered packets the interface did not transmit, packets offered)."""
    offer = min(LOSS_OFFER_BPS, rate_bps / 2) if rate_bps else LOSS_OFFER_BPS
    carried, offered = measure_rate(ns, ipr, ifindex, peer, rate_bps or offer, window_s, offer_bps=offer)
    packets = int(offered * window_s / 8 / (PAYLOAD_BYTES + FRAME_OVERHEAD))
    return max(0.0, (1 - carried / offered) * 100) if offered else 0.0, packets


def judge_loss(outcome: ProbeOutcome, requested: float, measured: float, packets: int) -> None:
    """Off by more than 10% of the asked loss, and by more than 3 standard deviations of a
    binomial count of `packets` (a short probe cannot tell 1% from 1.1%)."""
    p = requested / 100
    sd = (p * (1 - p) / max(packets, 1)) ** 0.5 * 100
    slack = max(TOLERANCE * requested, 3 * sd)
    if abs(measured - requested) > slack:
        outcome.problems.append(
            f"loss: measured {measured:.2f}% of {packets} packets, asked {requested:g}% (tolerance {slack:.2f} points)"
        )
