"""The synthetic backend through a real SUT agent: timing model, queueing, batching, stats."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mecbench.core import durations
from mecbench.v1 import sut_agent_pb2
from sut_agent.backends.synthetic import ServiceTimeSampler
from tests.sut_agent.conftest import Agent, synthetic

MS = 1000  # microseconds
# Model times are exact; these bands only absorb integer rounding to microseconds.
TOLERANCE_US = 2


def test_constant_service_time_is_the_compute_time(agent: Agent) -> None:
    agent.start(synthetic(0.002))
    began = time.perf_counter()
    reply = agent.infer([11, 12, 13])
    elapsed = time.perf_counter() - began
    assert sorted(reply.sample_ids) == [11, 12, 13]
    assert all(abs(c - 2 * MS) <= TOLERANCE_US for c in reply.compute_us)
    assert list(reply.queue_us) == [0, 0, 0]  # unlimited servers: nothing waits
    assert not reply.errors and not reply.outputs
    # The samples really took their service time before they were answered.
    assert elapsed >= 0.002
    stats = agent.stats()
    assert stats.samples_completed == 3 and stats.samples_failed == 0
    assert abs(durations.to_ns(stats.compute.p50) - 2_000_000) <= 2_000_000 / 16


def test_one_server_queues_samples_behind_each_other(agent: Agent) -> None:
    agent.start(synthetic(0.002, max_concurrency=1))
    began = time.perf_counter()
    reply = agent.infer([1, 2, 3, 4, 5])
    elapsed = time.perf_counter() - began
    waits = dict(zip(reply.sample_ids, reply.queue_us, strict=True))
    for position, sample_id in enumerate([1, 2, 3, 4, 5]):
        assert abs(waits[sample_id] - position * 2 * MS) <= TOLERANCE_US, waits
    assert all(abs(c - 2 * MS) <= TOLERANCE_US for c in reply.compute_us)
    assert elapsed >= 0.010  # five samples of 2 ms, one at a time
    stats = agent.stats()
    assert stats.batches == 5 and stats.mean_batch_size == pytest.approx(1.0)
    assert durations.to_ns(stats.queue_wait.max) == 8_000_000
    assert durations.to_ns(stats.queue_wait.min) == 0
    assert durations.to_ns(stats.queue_wait.mean) == 4_000_000


def test_two_servers_halve_the_queue(agent: Agent) -> None:
    agent.start(synthetic(0.002, max_concurrency=2))
    reply = agent.infer([1, 2, 3, 4])
    assert sorted(reply.queue_us) == pytest.approx([0, 0, 2 * MS, 2 * MS], abs=TOLERANCE_US)


def test_batching_serves_queued_samples_together(agent: Agent) -> None:
    agent.start(synthetic(0.001, max_concurrency=1, max_batch_size=4, per_sample_time=durations.from_seconds(0.0005)))
    reply = agent.infer(list(range(9)))
    waits = dict(zip(reply.sample_ids, reply.queue_us, strict=True))
    computes = dict(zip(reply.sample_ids, reply.compute_us, strict=True))
    # Batches of 4, 4 and 1; a batch takes 1 ms + 0.5 ms per sample.
    assert [waits[i] for i in range(9)] == pytest.approx([0] * 4 + [3 * MS] * 4 + [6 * MS], abs=TOLERANCE_US)
    assert [computes[i] for i in range(9)] == pytest.approx([3 * MS] * 8 + [1.5 * MS], abs=TOLERANCE_US)
    stats = agent.stats()
    assert stats.batches == 3
    assert stats.mean_batch_size == pytest.approx(3.0)


def test_response_payloads_have_the_configured_size(agent: Agent) -> None:
    agent.start(synthetic(0.0, response_bytes=32))
    reply = agent.infer([5, 6])
    assert [len(o) for o in reply.outputs] == [32, 32]
    agent.start(synthetic(0.0005, response_bytes=7, max_concurrency=1))
    reply = agent.infer([5, 6])
    assert [len(o) for o in reply.outputs] == [7, 7]


def test_random_service_times_are_reported_per_sample(agent: Agent) -> None:
    agent.start(
        synthetic(
            0.0,
            distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_UNIFORM,
            low=durations.from_seconds(0.001),
            high=durations.from_seconds(0.003),
            seed=7,
        )
    )
    reply = agent.infer(list(range(50)))
    assert all(1 * MS <= c <= 3 * MS for c in reply.compute_us)
    assert len(set(reply.compute_us)) > 10


def test_stats_percentiles_and_reset(agent: Agent) -> None:
    agent.start(synthetic(0.0, distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT))
    agent.start(synthetic(0.001, max_concurrency=1))
    agent.infer(list(range(20)))  # queue waits 0, 1, ..., 19 ms
    stats = agent.stats(reset=True)
    assert stats.samples_completed == 20
    p50 = durations.to_ns(stats.queue_wait.p50) / 1e6
    p90 = durations.to_ns(stats.queue_wait.p90) / 1e6
    assert 9 <= p50 <= 9 * 1.07 and 17 <= p90 <= 17 * 1.07
    assert durations.to_ns(stats.queue_wait.p999) == 19_000_000  # capped at the exact maximum
    assert sum(stats.bucket_counts) == 20
    assert len(stats.bucket_bounds) == len(stats.bucket_counts)
    # Server time is queue + compute: 1..20 ms, so no sample falls at or below 1 ms.
    bounds_us = [durations.to_ns(b) // 1000 for b in stats.bucket_bounds]
    assert sum(c for b, c in zip(bounds_us, stats.bucket_counts, strict=True) if b <= 1000) == 0
    after = agent.stats()
    assert after.samples_completed == 0 and not after.bucket_counts
    assert after.since.ToNanoseconds() >= stats.since.ToNanoseconds()


@pytest.mark.parametrize(
    ("distribution", "mean_ms", "stddev_ms"),
    [
        (sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_NORMAL, 2.0, 0.5),
        (sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_LOGNORMAL, 2.0, 1.0),
    ],
)
def test_distributions_have_the_configured_moments(distribution: int, mean_ms: float, stddev_ms: float) -> None:
    config = sut_agent_pb2.SyntheticBackendConfig(
        distribution=distribution,  # type: ignore[arg-type]
        mean=durations.from_seconds(mean_ms / 1000),
        stddev=durations.from_seconds(stddev_ms / 1000),
        seed=3,
    )
    values = np.array(ServiceTimeSampler(config).draw_many(100_000)) / 1e6
    assert values.mean() == pytest.approx(mean_ms, rel=0.02)
    assert values.std() == pytest.approx(stddev_ms, rel=0.03)
    again = ServiceTimeSampler(config).draw_many(100)
    assert again == ServiceTimeSampler(config).draw_many(100)  # the seed makes it repeatable


def test_normal_is_clipped_at_zero() -> None:
    config = sut_agent_pb2.SyntheticBackendConfig(
        distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_NORMAL,
        mean=durations.from_seconds(0.001),
        stddev=durations.from_seconds(0.002),
    )
    values = ServiceTimeSampler(config).draw_many(10_000)
    assert min(values) == 0 and max(values) > 0


def test_uniform_stays_within_bounds() -> None:
    config = sut_agent_pb2.SyntheticBackendConfig(
        distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_UNIFORM,
        low=durations.from_seconds(0.001),
        high=durations.from_seconds(0.002),
    )
    values = ServiceTimeSampler(config).draw_many(10_000)
    assert min(values) >= 1_000_000 and max(values) <= 2_000_000
