"""LoadGen's log files -> TestResult, and the files themselves as FileChunk messages.

Written against files LoadGen 6.0 produced (fixtures in tests/loadgen_agent/fixtures). What comes
from where:

- mlperf_log_summary.txt: validity and the "X satisfied : NO" reasons, the headline figure,
  latencies, token latencies, the test parameters; every `key : value` line lands in
  `summary_fields` as printed (the first occurrence of a key wins).
- mlperf_log_detail.txt (`:::MLLOG {json}` lines): query count, test duration (power_begin to
  power_end), errors and warnings (`metadata.is_error` / `is_warning`), and the scenario and mode
  when the summary has none (AccuracyOnly summaries are empty).

The headline (`samples_per_second`) per scenario: Server "Completed samples per second"; Offline
"Samples per second"; SingleStream "QPS w/o loadgen overhead" (else 1e9 / the 90th-percentile
latency); MultiStream samples_per_query * 1e9 / the 99th-percentile per-query latency (LoadGen
prints no QPS for it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

from mecbench.core import durations
from mecbench.v1 import common_pb2
from store.layout import ACCURACY_LOG_NAME

SUMMARY_FILE = "mlperf_log_summary.txt"
DETAIL_FILE = "mlperf_log_detail.txt"
ACCURACY_FILE = ACCURACY_LOG_NAME
TRACE_FILE = "mlperf_log_trace.json"
# Streamed first, in this order; any other file of the directory follows by name.
LOG_FILE_ORDER = (SUMMARY_FILE, DETAIL_FILE, ACCURACY_FILE, TRACE_FILE)
DEFAULT_CHUNK_BYTES = 1024 * 1024

_SCENARIOS: dict[str, common_pb2.Scenario.ValueType] = {
    "SingleStream": common_pb2.SCENARIO_SINGLE_STREAM,
    "MultiStream": common_pb2.SCENARIO_MULTI_STREAM,
    "Server": common_pb2.SCENARIO_SERVER,
    "Offline": common_pb2.SCENARIO_OFFLINE,
}
_MODES: dict[str, common_pb2.TestMode.ValueType] = {
    "PerformanceOnly": common_pb2.TEST_MODE_PERFORMANCE_ONLY,
    "AccuracyOnly": common_pb2.TEST_MODE_ACCURACY_ONLY,
    "SubmissionRun": common_pb2.TEST_MODE_SUBMISSION_RUN,
    "FindPeakPerformance": common_pb2.TEST_MODE_FIND_PEAK_PERFORMANCE,
}
_KEY_VALUE = re.compile(r"^\s*(?:\*\s*)?(?P<key>[^:]*?[^:\s])\s*:\s*(?P<value>.*?)\s*$")
_HEADLINE_PERCENTILE = re.compile(r"^(?P<pct>\d+(?:\.\d+)?)th percentile latency \(ns\)$")
# A sample's begin event in LoadGen's Chrome trace: `complete_ns` is LoadGen's own latency of
# the sample, from the query's scheduled time to QuerySamplesComplete.
_TRACE_SAMPLE = re.compile(rb'^\{"name":"Sample","cat":"[^"]*","ph":"b".*"query_seq":(\d+),.*"complete_ns":(\d+)\}')
_COUNT_LINE = re.compile(r"^(?P<count>No|\d+) (?P<kind>warning|error)s? encountered")
_PERCENTILES = (
    ("p50", "50.00"),
    ("p90", "90.00"),
    ("p95", "95.00"),
    ("p97", "97.00"),
    ("p99", "99.00"),
    ("p999", "99.90"),
)


def parse_summary_fields(text: str) -> dict[str, str]:
    """Every `key : value` line of a summary (bullets included), first occurrence of a key kept."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("===="):
            continue
        match = _KEY_VALUE.match(line)
        if match and match.group("value"):
            fields.setdefault(match.group("key"), match.group("value"))
    return fields


def _number(fields: dict[str, str], key: str) -> float | None:
    raw = fields.get(key)
    if raw is None:
        return None
    try:
        return float(raw.split()[0])
    except (ValueError, IndexError):
        return None


def _latency_stats(
    fields: dict[str, str], min_key: str, max_key: str, mean_key: str, pct_key: str
) -> common_pb2.LatencyStats:
    """`pct_key` is a format with `{}` for the percentile as LoadGen prints it ("50.00")."""
    stats = common_pb2.LatencyStats()
    for attr, key in (("min", min_key), ("max", max_key), ("mean", mean_key)):
        value = _number(fields, key)
        if value is not None:
            getattr(stats, attr).CopyFrom(durations.from_ns(value))
    for attr, printed in _PERCENTILES:
        value = _number(fields, pct_key.format(printed))
        if value is not None:
            getattr(stats, attr).CopyFrom(durations.from_ns(value))
    return stats


@dataclass
class DetailLog:
    """What mlperf_log_detail.txt adds to the summary."""

    values: dict[str, object] = field(default_factory=dict)
    error_count: int = 0
    warning_count: int = 0
    messages: list[str] = field(default_factory=list)

    def get_int(self, key: str) -> int | None:
        value = self.values.get(key)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def duration_ns(self) -> int | None:
        begin, end = self.values.get("power_begin"), self.values.get("power_end")
        if not isinstance(begin, str) or not isinstance(end, str):
            return None
        try:
            fmt = "%m-%d-%Y %H:%M:%S.%f"
            delta = datetime.strptime(end, fmt) - datetime.strptime(begin, fmt)
        except ValueError:
            return None
        return max(0, round(delta.total_seconds() * 1e9))


def parse_detail(text: str) -> DetailLog:
    detail = DetailLog()
    for line in text.splitlines():
        if not line.startswith(":::MLLOG"):
            continue
        try:
            entry = json.loads(line[len(":::MLLOG") :])
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        key = entry.get("key")
        if isinstance(key, str) and key != "loaded_qsl_set":
            detail.values.setdefault(key, entry.get("value"))
        metadata = entry.get("metadata")
        if isinstance(metadata, dict):
            if metadata.get("is_error"):
                detail.error_count += 1
                detail.messages.append(f"error: {entry.get('value')}")
            elif metadata.get("is_warning"):
                detail.warning_count += 1
                detail.messages.append(f"warning: {entry.get('value')}")
    return detail


def _headline(scenario: common_pb2.Scenario.ValueType, fields: dict[str, str], samples_per_query: float) -> float:
    if scenario == common_pb2.SCENARIO_SERVER:
        return _number(fields, "Completed samples per second") or 0.0
    if scenario == common_pb2.SCENARIO_OFFLINE:
        return _number(fields, "Samples per second") or 0.0
    if scenario == common_pb2.SCENARIO_SINGLE_STREAM:
        qps = _number(fields, "QPS w/o loadgen overhead")
        if qps is not None:
            return qps
    latency = next(
        (_number(fields, key) for key in fields if _HEADLINE_PERCENTILE.match(key)),
        None,
    )
    if latency:
        return samples_per_query * 1e9 / latency
    return 0.0


def summary_bullets(summary_text: str, heading: str = "Recommendations:") -> list[str]:
    """The bullets of one block of the summary (`Recommendations:`, `Early Stopping Result:`),
    each joined onto one line."""
    advice: list[str] = []
    inside = False
    for line in summary_text.splitlines():
        stripped = line.strip()
        if stripped == heading:
            inside = True
        elif inside and stripped.startswith("* "):
            advice.append(stripped[2:].strip())
        elif inside and stripped and advice and not stripped.endswith(":") and not stripped.startswith("="):
            advice[-1] += " " + stripped
        elif inside:
            break
    return advice


def parse_result(
    summary_text: str,
    detail_text: str = "",
    scenario: common_pb2.Scenario.ValueType = common_pb2.SCENARIO_UNSPECIFIED,
    mode: common_pb2.TestMode.ValueType = common_pb2.TEST_MODE_UNSPECIFIED,
) -> common_pb2.TestResult:
    """A TestResult from the text of the summary and detail logs.

    `scenario` and `mode` are used when neither log names them.
    """
    fields = parse_summary_fields(summary_text)
    detail = parse_detail(detail_text)
    result = common_pb2.TestResult()
    result.summary_fields.update(fields)

    scenario_name = fields.get("Scenario") or str(detail.values.get("effective_scenario", ""))
    result.scenario = _SCENARIOS.get(scenario_name, scenario)
    mode_name = fields.get("Mode") or str(detail.values.get("effective_test_mode", ""))
    result.mode = _MODES.get(mode_name, mode)

    result.valid = fields.get("Result is") == "VALID"
    satisfied = {key: value for key, value in fields.items() if key.endswith(" satisfied")}
    result.invalid_reasons.extend(f"{key} : {value}" for key, value in satisfied.items() if value.upper() != "YES")
    if fields.get("Result is") == "INVALID" and not result.invalid_reasons:
        result.invalid_reasons.append("Result is : INVALID")
    if not result.valid:
        # LoadGen's own words on what to change (early stopping's query count, the duration).
        result.invalid_reasons.extend(f"LoadGen: {advice}" for advice in summary_bullets(summary_text))
        if satisfied.get("Early stopping satisfied", "YES").upper() != "YES":
            result.invalid_reasons.extend(
                f"LoadGen early stopping: {line}" for line in summary_bullets(summary_text, "Early Stopping Result:")
            )
    result.min_duration_met = satisfied.get("Min duration satisfied", "").upper() == "YES"
    result.min_queries_met = satisfied.get("Min queries satisfied", "").upper() == "YES"
    result.early_stopping_met = satisfied.get("Early stopping satisfied", "").upper() == "YES"
    # Only Server has a latency constraint; the other scenarios have none to miss.
    constraints = satisfied.get("Performance constraints satisfied")
    result.performance_constraints_met = constraints.upper() == "YES" if constraints else "Result is" in fields

    samples_per_query = _number(fields, "samples_per_query") or float(
        detail.get_int("effective_samples_per_query") or 1
    )
    result.samples_per_second = _headline(result.scenario, fields, samples_per_query)
    result.scheduled_samples_per_second = _number(fields, "Scheduled samples per second") or 0.0
    completed = _number(fields, "Completed samples per second")
    result.completed_samples_per_second = completed if completed is not None else result.samples_per_second
    if result.scenario == common_pb2.SCENARIO_SERVER:
        result.target_qps = _number(fields, "target_qps") or 0.0

    result.latency.CopyFrom(
        _latency_stats(
            fields, "Min latency (ns)", "Max latency (ns)", "Mean latency (ns)", "{} percentile latency (ns)"
        )
    )
    if "Min First Token latency (ns)" in fields:
        result.ttft.CopyFrom(
            _latency_stats(
                fields,
                "Min First Token latency (ns)",
                "Max First Token latency (ns)",
                "Mean First Token latency (ns)",
                "{} percentile first token latency (ns)",
            )
        )
    if "Min Time per Output Token (ns)" in fields:
        result.tpot.CopyFrom(
            _latency_stats(
                fields,
                "Min Time per Output Token (ns)",
                "Max Time per Output Token (ns)",
                "Mean Time per Output Token (ns)",
                "{} percentile time to output token (ns)",
            )
        )
    tokens = _number(fields, "Completed tokens per second")
    if tokens is None:
        tokens = _number(fields, "Tokens per second")
    result.tokens_per_second = tokens or 0.0

    query_count = detail.get_int("result_query_count")
    if query_count is not None:
        result.query_count = query_count
        result.sample_count = round(query_count * samples_per_query)
    duration_ns = detail.duration_ns()
    if duration_ns is not None:
        result.test_duration.CopyFrom(durations.from_ns(duration_ns))

    if detail_text:
        result.error_count = detail.error_count
        result.warning_count = detail.warning_count
    else:
        for line in summary_text.splitlines():
            match = _COUNT_LINE.match(line.strip())
            if match:
                count = 0 if match.group("count") == "No" else int(match.group("count"))
                if match.group("kind") == "error":
                    result.error_count = count
                else:
                    result.warning_count = count
    return result


def parse_result_dir(
    directory: Path,
    scenario: common_pb2.Scenario.ValueType = common_pb2.SCENARIO_UNSPECIFIED,
    mode: common_pb2.TestMode.ValueType = common_pb2.TEST_MODE_UNSPECIFIED,
) -> common_pb2.TestResult:
    """Parse the LoadGen logs LoadGen wrote into `directory` (missing files read as empty)."""

    def read(name: str) -> str:
        path = directory / name
        return path.read_text(errors="replace") if path.is_file() else ""

    return parse_result(read(SUMMARY_FILE), read(DETAIL_FILE), scenario, mode)


def log_files(directory: Path) -> list[Path]:
    """The non-empty files of a LoadGen output directory, the well-known ones first."""
    files = [p for p in directory.iterdir() if p.is_file() and p.stat().st_size > 0]
    rank = {name: i for i, name in enumerate(LOG_FILE_ORDER)}
    return sorted(files, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def iter_file_chunks(directory: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[common_pb2.FileChunk]:
    """Every log file of `directory` as FileChunk messages of at most `chunk_bytes`; the last chunk of
    each file has `last` set."""
    for path in log_files(directory):
        with path.open("rb") as handle:
            data = handle.read(chunk_bytes)
            while True:
                following = handle.read(chunk_bytes)
                yield common_pb2.FileChunk(name=path.name, data=data, last=not following)
                if not following:
                    break
                data = following


def extract_sample_latencies(trace_path: Path, destination: Path) -> int:
    """Write the (query sequence, latency ns) of every sample of LoadGen's trace to `destination`
    as an int64 .npy array, and remove the trace (its size grows with the test; the latencies
    are what is kept). Returns the number of samples."""
    rows: list[tuple[int, int]] = []
    with trace_path.open("rb") as trace:
        for line in trace:
            match = _TRACE_SAMPLE.match(line)
            if match:
                rows.append((int(match[1]), int(match[2])))
    array = np.array(rows, dtype=np.int64).reshape(-1, 2)
    with destination.open("wb") as handle:
        np.save(handle, array)
    trace_path.unlink()
    return len(rows)


# Latencies and token figures above this are overflowed or garbage, not measurements (a week).
_MAX_SANE_NS = 7 * 24 * 3600 * 10**9
_LATENCY_FIELDS: tuple[Literal["latency", "ttft", "tpot"], ...] = ("latency", "ttft", "tpot")


def check_values(result: common_pb2.TestResult) -> list[str]:
    """Every summary value out of any possible range, named with its value: a negative or
    overflowed latency (LoadGen's INT64_MIN for a sample without a first token), a negative or
    non-finite throughput. Such values are a measurement bug; the caller marks the result."""
    problems: list[str] = []
    for name in _LATENCY_FIELDS:
        if not result.HasField(name):
            continue
        stats = getattr(result, name)
        for attr in ("min", "max", "mean", *(p for p, _ in _PERCENTILES)):
            if not stats.HasField(attr):
                continue
            ns = durations.to_ns(getattr(stats, attr))
            if ns < 0 or ns > _MAX_SANE_NS:
                problems.append(f"{name}.{attr} = {ns} ns")
    throughputs = ("samples_per_second", "completed_samples_per_second", "scheduled_samples_per_second")
    for attr in (*throughputs, "tokens_per_second"):
        value = getattr(result, attr)
        if not np.isfinite(value) or value < 0:
            problems.append(f"{attr} = {value}")
    return problems


def apply_integrity(result: common_pb2.TestResult, failed_by_kind: dict[str, int], messages: list[str]) -> None:
    """Failed samples and out-of-range values into the result; either makes it INVALID, saying
    why (LoadGen counts a failed sample as completed, so its own verdict cannot tell)."""
    failed = sum(failed_by_kind.values())
    if failed:
        result.failed_samples = failed
        result.failed_samples_by_kind.update(failed_by_kind)
        result.sample_errors.extend(messages)
        result.valid = False
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(failed_by_kind.items()))
        first = messages[0] if messages else "no detail"
        result.invalid_reasons.append(f"{failed} samples failed at the SUT ({kinds}; first: {first})")
    problems = check_values(result)
    if problems:
        result.value_errors.extend(problems)
        result.valid = False
        result.invalid_reasons.append("summary values out of range (a measurement bug): " + "; ".join(problems))
