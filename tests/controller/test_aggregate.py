"""Several clients' results combined: throughput adds up, percentiles come from the pooled
latencies (never averaged), MultiStream counts queries."""

from __future__ import annotations

import io

import numpy as np
import pytest

from controller.aggregate import aggregate_results, latencies_for_scenario, latency_stats, read_sample_latencies
from mecbench.v1 import common_pb2


def rows(latencies_ns: list[int], samples_per_query: int = 1) -> np.ndarray:
    return np.array([(i // samples_per_query, v) for i, v in enumerate(latencies_ns)], dtype=np.int64)


def result(qps: float, valid: bool = True) -> common_pb2.TestResult:
    return common_pb2.TestResult(scenario=common_pb2.SCENARIO_SERVER, valid=valid, samples_per_second=qps)


def test_percentiles_are_pooled_not_averaged() -> None:
    fast = rows([1_000] * 90)  # a client that always sees 1 us
    slow = rows([9_000] * 10)  # and one that sees 9 us on fewer samples
    merged = aggregate_results([result(90), result(10)], [fast, slow])
    assert merged.samples_per_second == 100
    # 100 samples pooled: index 90 (p90) is the first slow one; the mean of the two clients'
    # p90s would have said 5 us.
    assert merged.latency.p50.ToNanoseconds() == 1_000
    assert merged.latency.p90.ToNanoseconds() == 9_000
    assert merged.latency.mean.ToNanoseconds() == (90 * 1_000 + 10 * 9_000) // 100
    assert merged.latency.min.ToNanoseconds() == 1_000 and merged.latency.max.ToNanoseconds() == 9_000


def test_loadgens_index_rule_is_used() -> None:
    stats = latency_stats(np.arange(1, 1001, dtype=np.int64))  # 1..1000 ns
    assert stats.p50.ToNanoseconds() == 501  # sorted[floor(1000 * 0.5)]
    assert stats.p99.ToNanoseconds() == 991
    assert stats.p999.ToNanoseconds() == 1000


def test_multistream_counts_each_query_once_at_its_slowest_sample() -> None:
    samples = rows([1, 5, 2, 8, 3, 3], samples_per_query=2)
    queries = latencies_for_scenario(samples, common_pb2.SCENARIO_MULTI_STREAM)
    assert sorted(queries.tolist()) == [3, 5, 8]
    assert latencies_for_scenario(samples, common_pb2.SCENARIO_SERVER).tolist() == [1, 5, 2, 8, 3, 3]


def test_without_every_clients_latencies_no_latency_is_made_up() -> None:
    merged = aggregate_results([result(10), result(20, valid=False)], [rows([5, 6]), None])
    assert not merged.HasField("latency")
    assert merged.samples_per_second == 30 and not merged.valid


def test_one_client_is_reported_as_loadgen_reported_it() -> None:
    single = result(42)
    single.latency.p50.FromNanoseconds(123)
    assert aggregate_results([single], [rows([1, 2, 3])]) == single


def test_unreadable_latencies_are_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="query sequence"):
        read_sample_latencies(buffer.getvalue())
