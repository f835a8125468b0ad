"""Parsing of LoadGen's logs, against real files LoadGen 6.0 wrote (fixtures/, produced by this agent
against a 2 ms SUT)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from loadgen_agent.results import iter_file_chunks, parse_result, parse_result_dir, parse_summary_fields
from mecbench.v1 import common_pb2

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> common_pb2.TestResult:
    summary = (FIXTURES / f"{name}.summary.txt").read_text()
    detail_path = FIXTURES / f"{name}.detail.txt"
    return parse_result(summary, detail_path.read_text() if detail_path.exists() else "")


def ms(duration: Duration) -> float:
    return duration.ToNanoseconds() / 1e6


def test_server_valid_with_detail() -> None:
    result = load("server")
    assert result.scenario == common_pb2.SCENARIO_SERVER
    assert result.mode == common_pb2.TEST_MODE_PERFORMANCE_ONLY
    assert result.valid and not result.invalid_reasons
    assert result.samples_per_second == pytest.approx(197.63)
    assert result.completed_samples_per_second == pytest.approx(197.63)
    assert result.scheduled_samples_per_second == pytest.approx(197.86)
    assert result.target_qps == 200
    assert result.min_duration_met and result.min_queries_met and result.early_stopping_met
    assert result.performance_constraints_met
    assert ms(result.latency.min) == pytest.approx(2.626717)
    assert 0 < ms(result.latency.min) <= ms(result.latency.p50) <= ms(result.latency.p99) <= ms(result.latency.max)
    assert result.latency.HasField("p999")
    # From the detail log: counts, duration, warnings.
    assert result.query_count == result.sample_count >= 500
    assert 2.0 < result.test_duration.ToNanoseconds() / 1e9 < 4.0
    assert result.warning_count == 1 and result.error_count == 0
    assert result.summary_fields["SUT name"] == "PyFastSUT"
    assert result.summary_fields["target_latency (ns)"] == "100000000"
    assert not result.HasField("ttft")


def test_server_invalid_reasons() -> None:
    result = load("server_invalid")
    assert not result.valid
    # LoadGen's verdict, then its own words on why (the early-stopping block of the summary).
    assert list(result.invalid_reasons) == [
        "Early stopping satisfied : NO",
        "LoadGen early stopping: Run unsuccessful.",
        "LoadGen early stopping: Processed 190 queries.",
        "LoadGen early stopping: Would need to run at least 269 more queries, with the run being successful if "
        "every additional query were under latency.",
    ]
    assert not result.early_stopping_met and result.min_duration_met
    # Without a detail log the counts come from the summary's own lines.
    assert result.warning_count == 1 and result.query_count == 0


def test_offline_headline_and_min_duration_reason() -> None:
    result = load("offline")
    assert result.scenario == common_pb2.SCENARIO_OFFLINE
    assert result.samples_per_second == pytest.approx(190110)
    assert "Min duration satisfied : NO" in result.invalid_reasons
    assert not result.min_duration_met
    assert result.query_count == 1 and result.sample_count == 55000
    assert result.target_qps == 0  # only Server has a target


def test_single_stream_headline_is_qps_without_overhead() -> None:
    result = load("single_stream")
    assert result.valid
    assert result.samples_per_second == pytest.approx(364.43)
    assert result.summary_fields["90.0th percentile latency (ns)"] == "2889270"


def test_multi_stream_headline_from_99th_percentile() -> None:
    result = load("multi_stream")
    assert result.scenario == common_pb2.SCENARIO_MULTI_STREAM and result.valid
    assert result.samples_per_second == pytest.approx(4 * 1e9 / 3248516)


def test_token_latencies() -> None:
    result = load("server_tokens")
    assert result.tokens_per_second == pytest.approx(751.43)
    assert 0 < ms(result.ttft.min) <= ms(result.ttft.p50) <= ms(result.ttft.max)
    assert 0 < ms(result.tpot.min) <= ms(result.tpot.p99) <= ms(result.tpot.max)
    assert result.ttft.HasField("p999") and result.tpot.HasField("p90")
    offline = load("offline_tokens")
    assert offline.tokens_per_second == pytest.approx(270362)


def test_accuracy_run_takes_scenario_and_mode_from_detail() -> None:
    result = load("accuracy")
    assert result.scenario == common_pb2.SCENARIO_SINGLE_STREAM
    assert result.mode == common_pb2.TEST_MODE_ACCURACY_ONLY
    assert not result.valid and result.samples_per_second == 0
    assert result.warning_count == 1


def test_summary_fields_keep_every_line() -> None:
    fields = parse_summary_fields((FIXTURES / "single_stream.summary.txt").read_text())
    assert fields["Scenario"] == "SingleStream"
    assert fields["Early stopping satisfied"] == "Yes"
    assert fields["min_duration (ms)"] == "1000"
    assert fields["QPS w/ loadgen overhead"]
    assert "Early stopping 90.0th percentile estimate" in fields


def test_file_chunks(tmp_path: Path) -> None:
    (tmp_path / "mlperf_log_detail.txt").write_bytes(b"d" * 2500)
    (tmp_path / "mlperf_log_summary.txt").write_bytes((FIXTURES / "server.summary.txt").read_bytes())
    (tmp_path / "mlperf_log_trace.json").write_bytes(b"")  # tracing off: empty, not sent
    (tmp_path / "mlperf_log_accuracy.json").write_bytes(b"[\n]\n")
    chunks = list(iter_file_chunks(tmp_path, chunk_bytes=1000))
    assert [(c.name, len(c.data), c.last) for c in chunks] == [
        ("mlperf_log_summary.txt", 1000, False),
        ("mlperf_log_summary.txt", 652, True),
        ("mlperf_log_detail.txt", 1000, False),
        ("mlperf_log_detail.txt", 1000, False),
        ("mlperf_log_detail.txt", 500, True),
        ("mlperf_log_accuracy.json", 4, True),
    ]
    assert parse_result_dir(tmp_path).samples_per_second == pytest.approx(197.63)
