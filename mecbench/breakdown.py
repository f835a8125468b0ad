"""Where the time went: a repeat's mean latency split into network and client, server queueing
and server compute.

LoadGen measures each sample from issue to completion at the client; the SUT agent times each
sample's wait in its queue and its compute (ResponseBatch.queue_us/compute_us, summed up in the
repeat's SutStats). Means add up, so the mean latency splits exactly into the server's mean queue
wait, its mean compute, and the rest: the network both ways plus the client's own overhead
(LoadGen, the data plane, serialisation). Percentiles do not add up, so only means are split.

Per client group: the server does not know which group a sample came from, so its queue and
compute means are the SUT's over all clients; a group's network-and-client share is its own mean
latency less those. Different links show as different network shares over the same server times.
"""

from __future__ import annotations

from typing import Any

from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2


def _mean_ms(stats: common_pb2.LatencyStats) -> float | None:
    return durations.to_ns(stats.mean) / 1e6 if stats.HasField("mean") else None


def split(latency_mean_ms: float, queue_ms: float, compute_ms: float) -> dict[str, float]:
    return {
        "latency_mean_ms": latency_mean_ms,
        "network_and_client_ms": max(0.0, latency_mean_ms - queue_ms - compute_ms),
        "server_queue_ms": queue_ms,
        "server_compute_ms": compute_ms,
    }


def latency_breakdown(repeat: controller_pb2.RepeatResult) -> dict[str, Any] | None:
    """The repeat's split, pooled and per client group; None without LoadGen's mean latency or
    the SUT's timings (a server that reports none, e.g. some external ones)."""
    latency = _mean_ms(repeat.aggregate.latency)
    queue = _mean_ms(repeat.sut_stats.queue_wait)
    compute = _mean_ms(repeat.sut_stats.compute)
    if latency is None or compute is None or not repeat.sut_stats.samples_completed:
        return None
    queue = queue or 0.0
    found: dict[str, Any] = {
        "method": "means: LoadGen's latency less the SUT agent's queue wait and compute",
        "pooled": split(latency, queue, compute),
    }
    groups = {}
    for group in repeat.groups:
        mean = _mean_ms(group.result.latency)
        if mean is not None:
            groups[group.name] = {"network_profile": group.network_profile, **split(mean, queue, compute)}
    if groups:
        found["groups"] = groups
    return found
