"""The client's own per-sample latencies (loadgen_agent.sample_clock) against LoadGen's trace, which
they replace: the same samples, the Server schedule to the nanosecond, and latencies within a few
microseconds of LoadGen's own, in every scenario, with the SUT answering on another thread as the
data planes do."""

from __future__ import annotations

import json
import multiprocessing
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadgen_agent.sample_clock import RecordingLoadGen, SampleClock, measures, server_offsets

# 64-bit, as mlperf.conf's seeds are (the engine keeps the low 32 bits).
SEED = 3622009729038561421


def _run_loadgen(scenario: str, coalesce: bool, results: Any) -> None:
    """In a fresh process (LoadGen is a per-process singleton): a test with the trace on, the
    issue callback stamped on a SampleClock and the samples completed by another thread."""
    import mlperf_loadgen as lg

    clock = SampleClock()
    recording = RecordingLoadGen(lg, clock)
    pending: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()

    def issue(ids: list[int], indices: list[int]) -> None:
        clock.issued(ids)
        pending.put(ids)

    def answer() -> None:
        while (ids := pending.get()) is not None:
            recording.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])

    answering = threading.Thread(target=answer)
    answering.start()
    sut = lg.ConstructFastSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(1024, 1024, lambda s: None, lambda s: None)
    settings = lg.TestSettings()
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_duration_ms = 1000
    settings.min_query_count = 1
    settings.schedule_rng_seed = SEED
    if scenario == "server":
        settings.scenario = lg.TestScenario.Server
        settings.server_target_qps = 4000
        settings.server_target_latency_ns = 100_000_000
        settings.server_coalesce_queries = coalesce
    elif scenario == "single":
        settings.scenario = lg.TestScenario.SingleStream
        settings.single_stream_expected_latency_ns = 100_000
    elif scenario == "multi":
        settings.scenario = lg.TestScenario.MultiStream
        settings.multi_stream_expected_latency_ns = 200_000
        settings.multi_stream_samples_per_query = 8
    else:
        settings.scenario = lg.TestScenario.Offline
        settings.offline_expected_qps = 20_000
    clock.begin(settings)
    with tempfile.TemporaryDirectory() as outdir:
        log_settings = lg.LogSettings()
        log_settings.log_output.outdir = outdir
        log_settings.log_output.copy_summary_to_stdout = False
        log_settings.enable_trace = True
        lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
        trace = []
        for line in (Path(outdir) / "mlperf_log_trace.json").read_text().splitlines():
            if line.startswith('{"name":"Sample"') and '"ph":"b"' in line:
                event = json.loads(line.rstrip(","))
                args = event["args"]
                trace.append((args["sample_seq"], args["query_seq"], event["ts"], args["complete_ns"]))
    pending.put(None)
    answering.join()
    results.put((clock.rows().tolist(), trace))


def _measure(scenario: str, coalesce: bool = False) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_run_loadgen, args=(scenario, coalesce, results))
    process.start()
    ours, trace = results.get(timeout=120)
    process.join(30)
    return np.array(ours, dtype=np.int64).reshape(-1, 2), np.array(sorted(trace), dtype=np.float64)


def _assert_close(ours: np.ndarray[Any, Any], theirs: np.ndarray[Any, Any]) -> None:
    """Same number of samples; rank by rank within a few microseconds at the median and within
    5 % (or 200 us) at the percentiles LoadGen reports."""
    assert len(ours) == len(theirs) > 100
    ours_sorted, theirs_sorted = np.sort(ours), np.sort(theirs)
    assert np.median(np.abs(ours_sorted - theirs_sorted)) <= 50_000
    for fraction in (0.5, 0.9, 0.99):
        mine, loadgen = np.quantile(ours_sorted, fraction), np.quantile(theirs_sorted, fraction)
        assert abs(mine - loadgen) <= max(0.05 * loadgen, 200_000), (fraction, mine, loadgen)


@pytest.mark.parametrize("coalesce", [False, True])
def test_server_latencies_follow_loadgens_schedule_sample_by_sample(coalesce: bool) -> None:
    ours, trace = _measure("server", coalesce)
    _, _, scheduled_us, latency_ns = trace.T
    # The schedule is LoadGen's to the nanosecond: the trace's scheduled times, from the first.
    offsets = server_offsets(SEED, 4000, len(trace))
    assert np.abs((scheduled_us - scheduled_us[0]) * 1000 - offsets).max() < 1.0
    # ... and this comparison can fail: another seed's schedule is not LoadGen's.
    wrong = server_offsets(7654321, 4000, len(trace))
    assert np.abs((scheduled_us - scheduled_us[0]) * 1000 - wrong).max() > 1_000_000
    # Sample by sample (ours are in issue order, which is LoadGen's sample order).
    assert np.array_equal(ours[:, 0], np.arange(len(ours)))
    differences = ours[:, 1] - latency_ns
    assert np.median(np.abs(differences)) <= 30_000
    assert np.mean(np.abs(differences) <= 1_000_000) >= 0.99
    _assert_close(ours[:, 1], latency_ns)


@pytest.mark.parametrize("scenario", ["single", "multi"])
def test_other_scenarios_match_loadgens_latencies(scenario: str) -> None:
    ours, trace = _measure(scenario)
    _assert_close(ours[:, 1], trace[:, 3])
    if scenario == "multi":
        # Samples of one query share its sequence, as the trace's query_seq groups them.
        assert len(np.unique(ours[:, 0])) == len(np.unique(trace[:, 1]))


def test_offline_and_several_issue_threads_are_left_to_the_trace() -> None:
    import mlperf_loadgen as lg

    settings = lg.TestSettings()
    for scenario, expected in ((lg.TestScenario.Server, True), (lg.TestScenario.SingleStream, True),
                               (lg.TestScenario.MultiStream, True), (lg.TestScenario.Offline, False)):
        settings.scenario = scenario
        assert measures(settings) is expected
    settings.scenario = lg.TestScenario.Server
    settings.server_num_issue_query_threads = 2
    assert not measures(settings)
