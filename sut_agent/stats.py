"""Server-side timing: counters and log-linear histograms of queue wait, compute and their sum.

The histograms are HDR-like: values in microseconds, exact below 32us, then 16 sub-buckets per
power of two (at most 1/16 = 6.25% relative bucket width), 464 buckets up to 2^32us. Recording
costs a few integer operations per sample (pure Python for small batches, numpy for large ones),
so it runs per completion on the data plane's hot path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from mecbench.core import durations
from mecbench.v1 import common_pb2, sut_agent_pb2
from sut_agent.backends.base import Completion

SUB_BUCKET_BITS = 4
SUB_BUCKETS = 1 << SUB_BUCKET_BITS
MAX_VALUE_US = (1 << 32) - 1
BUCKET_COUNT = (32 - SUB_BUCKET_BITS) * SUB_BUCKETS + SUB_BUCKETS  # 464
# Below this many values a Python loop beats numpy's per-call overhead.
_NUMPY_THRESHOLD = 24
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p97", 0.97), ("p99", 0.99), ("p999", 0.999))


def bucket_index(value_us: int) -> int:
    if value_us < 2 * SUB_BUCKETS:
        return max(value_us, 0)
    value_us = min(value_us, MAX_VALUE_US)
    shift = value_us.bit_length() - 1 - SUB_BUCKET_BITS
    return shift * SUB_BUCKETS + (value_us >> shift)


def bucket_indices(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0, MAX_VALUE_US).astype(np.int64)
    # frexp gives the exact bit length of integers below 2^53.
    _, bit_length = np.frexp(values.astype(np.float64))
    shift = np.maximum(bit_length.astype(np.int64) - 1 - SUB_BUCKET_BITS, 0)
    return np.where(values < 2 * SUB_BUCKETS, values, shift * SUB_BUCKETS + (values >> shift))


def bucket_lower_us(index: int) -> int:
    if index < 2 * SUB_BUCKETS:
        return index
    shift = index // SUB_BUCKETS - 1
    return (SUB_BUCKETS + index % SUB_BUCKETS) << shift


def bucket_upper_us(index: int) -> int:
    """Exclusive upper bound of bucket `index`, in microseconds."""
    return bucket_lower_us(index + 1)


class Histogram:
    """Counts per log-linear bucket plus exact count, sum, min and max."""

    def __init__(self) -> None:
        self.counts = np.zeros(BUCKET_COUNT, dtype=np.int64)
        self.count = 0
        self.total_us = 0
        self.min_us = MAX_VALUE_US
        self.max_us = 0

    def record(self, values: Sequence[int]) -> None:
        n = len(values)
        if not n:
            return
        low, high = min(values), max(values)
        self.count += n
        self.total_us += sum(values)
        self.min_us = min(self.min_us, low)
        self.max_us = max(self.max_us, high)
        if low == high:
            self.counts[bucket_index(low)] += n
        elif n < _NUMPY_THRESHOLD:
            counts = self.counts
            for value in values:
                counts[bucket_index(value)] += 1
        else:
            self.counts += np.bincount(bucket_indices(np.asarray(values)), minlength=BUCKET_COUNT)

    def percentile_us(self, fraction: float) -> int:
        """The highest value of the bucket holding the `fraction` quantile, within [min, max]."""
        if not self.count:
            return 0
        rank = max(1, int(np.ceil(fraction * self.count)))
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        return min(max(bucket_upper_us(index) - 1, self.min_us), self.max_us)

    def latency_stats(self) -> common_pb2.LatencyStats:
        stats = common_pb2.LatencyStats()
        if not self.count:
            return stats
        us = 1000
        stats.min.CopyFrom(durations.from_ns(self.min_us * us))
        stats.max.CopyFrom(durations.from_ns(self.max_us * us))
        stats.mean.CopyFrom(durations.from_ns(self.total_us * us / self.count))
        for name, fraction in PERCENTILES:
            getattr(stats, name).CopyFrom(durations.from_ns(self.percentile_us(fraction) * us))
        return stats


class SutStatsRecorder:
    """Everything GetStats reports, plus the in-flight count, under one lock taken per batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        # Since the agent started, never reset: what /metrics reports as counters (Prometheus
        # reads a drop as a restart of the process).
        self.total_completed = 0
        self.total_failed = 0
        self._reset()

    def _reset(self) -> None:
        self.samples_completed = 0
        self.samples_failed = 0
        self.batches = 0
        self._batched_samples = 0
        self.queue_wait = Histogram()
        self.compute = Histogram()
        self.server = Histogram()
        self.since = time.time_ns()

    def submitted(self, count: int) -> None:
        with self._lock:
            self.in_flight += count

    def record(self, completion: Completion) -> None:
        queue_us = completion.queue_us
        compute_us = completion.compute_us
        count = len(completion.sample_ids)
        failed = 0
        if completion.errors is not None:
            ok = [i for i, error in enumerate(completion.errors) if not error]
            failed = count - len(ok)
            if failed:
                queue_us = [queue_us[i] for i in ok]
                compute_us = [compute_us[i] for i in ok]
        if queue_us and max(queue_us) == 0:
            server_us = compute_us
        else:
            server_us = [q + c for q, c in zip(queue_us, compute_us, strict=True)]
        with self._lock:
            self.in_flight -= count
            self.samples_completed += count - failed
            self.samples_failed += failed
            self.total_completed += count - failed
            self.total_failed += failed
            if completion.batches:
                self.batches += completion.batches
                self._batched_samples += count
            self.queue_wait.record(queue_us)
            self.compute.record(compute_us)
            self.server.record(server_us)

    def snapshot(self, reset: bool = False) -> sut_agent_pb2.SutStats:
        with self._lock:
            stats = sut_agent_pb2.SutStats(
                samples_completed=self.samples_completed,
                samples_failed=self.samples_failed,
                batches=self.batches,
                queue_wait=self.queue_wait.latency_stats(),
                compute=self.compute.latency_stats(),
                mean_batch_size=self._batched_samples / self.batches if self.batches else 0.0,
            )
            since = Timestamp()
            since.FromNanoseconds(self.since)
            stats.since.CopyFrom(since)
            nonzero = np.flatnonzero(self.server.counts)
            if nonzero.size:
                last = int(nonzero[-1])
                stats.bucket_bounds.extend(durations.from_ns(bucket_upper_us(i) * 1000) for i in range(last + 1))
                stats.bucket_counts.extend(self.server.counts[: last + 1].tolist())
            if reset:
                self._reset()
        return stats

    def totals(self) -> tuple[int, int, int]:
        """(in flight, samples completed, samples failed since the agent started)."""
        with self._lock:
            return self.in_flight, self.total_completed, self.total_failed

    def reset(self) -> None:
        with self._lock:
            self._reset()
