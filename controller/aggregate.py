"""The results of several concurrent LoadGen clients, combined into one.

Throughput adds up. Latency percentiles do not average: the p99 of two clients is the p99 of all
their samples together. Each client keeps the latency of every sample as LoadGen measures it,
from the scheduled time (sample_latencies.npy: loadgen_agent/sample_clock.py, or LoadGen's trace
for Offline), so the latencies are pooled and the percentiles taken from the pool by LoadGen's own
rule: the value at index floor(n * p) of the sorted latencies. For one client this reproduces
LoadGen's summary (its mean exactly, percentiles within microseconds). MultiStream's percentiles
are over queries, so there each query counts once, with the latency of its slowest sample.
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt

from mecbench.core.latencies import Latencies, query_latencies
from mecbench.v1 import common_pb2

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p97", 0.97), ("p99", 0.99), ("p999", 0.999))

# One row per request of the direct LLM client (store.layout.TOKEN_LATENCIES_NAME): issued ns,
# time to first token ns (-1: none), end-to-end ns, output tokens, failed (0/1).
TokenRows = npt.NDArray[np.int64]


def read_token_latencies(data: bytes) -> TokenRows:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2 or array.shape[1] != 5:
        raise ValueError(f"expected rows of (issued, ttft, e2e, tokens, failed), got shape {array.shape}")
    rows: TokenRows = array.astype(np.int64, copy=False)
    return rows


def token_latency_samples(rows: TokenRows) -> tuple[Latencies, Latencies]:
    """(TTFT of each request that completed with a first token, TPOT of each of those with more
    than one token), as LoadGen defines TPOT: (latency - TTFT) / (tokens - 1)."""
    ok = rows[(rows[:, 4] == 0) & (rows[:, 1] >= 0)]
    ttft: Latencies = ok[:, 1]
    several = ok[ok[:, 3] > 1]
    tpot: Latencies = (several[:, 2] - several[:, 1]) // (several[:, 3] - 1)
    return ttft, tpot


def read_sample_latencies(data: bytes) -> Latencies:
    """(query sequence, latency ns) rows, as the LoadGen agent writes them."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"expected rows of (query sequence, latency ns), got shape {array.shape}")
    rows: Latencies = array.astype(np.int64, copy=False)
    return rows


def latencies_for_scenario(rows: Latencies, scenario: int) -> Latencies:
    """The latencies LoadGen's percentiles are over: per sample, or per query for MultiStream."""
    if scenario != common_pb2.SCENARIO_MULTI_STREAM:
        return rows[:, 1]
    return query_latencies(rows)


def latency_stats(latencies: Latencies) -> common_pb2.LatencyStats:
    stats = common_pb2.LatencyStats()
    if len(latencies) == 0:
        return stats
    ordered = np.sort(latencies)
    count = len(ordered)
    stats.min.FromNanoseconds(int(ordered[0]))
    stats.max.FromNanoseconds(int(ordered[-1]))
    # LoadGen's mean is an integer division of the sum.
    stats.mean.FromNanoseconds(int(ordered.sum()) // count)
    for name, fraction in PERCENTILES:
        getattr(stats, name).FromNanoseconds(int(ordered[min(count - 1, int(count * fraction))]))
    return stats


# The direct LLM client's figures that add up over clients (counts, and rates over the clients'
# overlapping windows); the percentiles do not, and the pooled TTFT/TPOT are `ttft`/`tpot`.
_SUMMED_LLM_METRICS = ("requests_ok", "requests_failed", "output_tokens", "input_tokens", "goodput_requests")
# A load ramp's stages (stage<i>_...): requests sent and failed, concurrency asked and achieved.
_SUMMED_STAGE_SUFFIXES = ("_sent", "_failed", "_target_concurrency", "_concurrency_mean")


def merge_llm_metrics(clients: list[dict[str, float]]) -> dict[str, float]:
    """Several clients' `llm_metrics` as one: counts and per-second rates summed, goodput's share
    and the mean output length over all requests; percentiles left out (an average of
    percentiles is no percentile: the aggregate's `ttft`/`tpot` pool every request instead)."""
    merged: dict[str, float] = {}
    for name in {key for metrics in clients for key in metrics}:
        values = [metrics.get(name, 0.0) for metrics in clients]
        if (
            name in _SUMMED_LLM_METRICS
            or (name.endswith("_per_s") and "_per_request" not in name)
            or name.endswith(_SUMMED_STAGE_SUFFIXES)
        ):
            merged[name] = sum(values)
    requests = merged.get("requests_ok", 0.0) + merged.get("requests_failed", 0.0)
    if requests and "goodput_requests" in merged:
        merged["goodput_fraction"] = merged["goodput_requests"] / requests
    if merged.get("requests_ok") and "output_tokens" in merged:
        merged["output_tokens_mean"] = merged["output_tokens"] / merged["requests_ok"]
    return merged


def aggregate_results(
    results: list[common_pb2.TestResult],
    latencies: list[Latencies | None] | None = None,
    token_rows: list[TokenRows | None] | None = None,
) -> common_pb2.TestResult:
    """One client: its result, as LoadGen reported it. Several: summed throughput and tokens/s,
    valid only if every client is, the longest test duration and issue slack, and latency, TTFT
    and TPOT percentiles over the pooled per-sample figures of all clients. Without every
    client's per-sample figures the aggregate carries none of that metric rather than a made-up
    one."""
    if not results:
        return common_pb2.TestResult()
    if len(results) == 1:
        return results[0]
    scenario = results[0].scenario
    aggregate = common_pb2.TestResult(
        scenario=scenario,
        mode=results[0].mode,
        valid=all(r.valid for r in results),
        samples_per_second=sum(r.samples_per_second for r in results),
        scheduled_samples_per_second=sum(r.scheduled_samples_per_second for r in results),
        completed_samples_per_second=sum(r.completed_samples_per_second for r in results),
        query_count=sum(r.query_count for r in results),
        sample_count=sum(r.sample_count for r in results),
        target_qps=sum(r.target_qps for r in results),
        min_duration_met=all(r.min_duration_met for r in results),
        min_queries_met=all(r.min_queries_met for r in results),
        early_stopping_met=all(r.early_stopping_met for r in results),
        performance_constraints_met=all(r.performance_constraints_met for r in results),
        error_count=sum(r.error_count for r in results),
        warning_count=sum(r.warning_count for r in results),
        tokens_per_second=sum(r.tokens_per_second for r in results),
        failed_samples=sum(r.failed_samples for r in results),
    )
    aggregate.test_duration.CopyFrom(max((r.test_duration for r in results), key=lambda d: d.ToNanoseconds()))
    aggregate.issue_slack.CopyFrom(max((r.issue_slack for r in results), key=lambda d: d.ToNanoseconds()))
    if all(r.llm_metrics for r in results):
        aggregate.llm_metrics.update(merge_llm_metrics([dict(r.llm_metrics) for r in results]))
    for result in results:
        for kind, count in result.failed_samples_by_kind.items():
            aggregate.failed_samples_by_kind[kind] = aggregate.failed_samples_by_kind.get(kind, 0) + count
    for index, result in enumerate(results):
        aggregate.invalid_reasons.extend(f"client {index}: {reason}" for reason in result.invalid_reasons)
    if latencies and len(latencies) == len(results) and all(rows is not None for rows in latencies):
        pooled = np.concatenate([latencies_for_scenario(rows, scenario) for rows in latencies if rows is not None])
        aggregate.latency.CopyFrom(latency_stats(pooled))
    if token_rows and len(token_rows) == len(results) and all(rows is not None for rows in token_rows):
        samples = [token_latency_samples(rows) for rows in token_rows if rows is not None]
        ttft = np.concatenate([ttft for ttft, _ in samples])
        tpot = np.concatenate([tpot for _, tpot in samples])
        if len(ttft):
            aggregate.ttft.CopyFrom(latency_stats(ttft))
        if len(tpot):
            aggregate.tpot.CopyFrom(latency_stats(tpot))
    return aggregate


def mark_failures(result: common_pb2.TestResult, sample_errors: int, first_error: str, sut_failure: str) -> None:
    """A result whose samples failed at the SUT measured failures, not inference: LoadGen counts
    them as completed, so it is marked INVALID here, saying why."""
    if sample_errors and not result.failed_samples:  # else the LoadGen agent said it, by kind
        result.valid = False
        detail = first_error or "no detail"
        result.invalid_reasons.append(f"{sample_errors} samples failed at the SUT (first: {detail})")
    if sut_failure:
        result.valid = False
        result.invalid_reasons.append(f"the SUT failed during the test: {sut_failure}")
