"""LoadGenSettings (proto) -> mlperf_loadgen.TestSettings, and the checks that come before it.

Precedence, lowest first: LoadGen's built-in mlperf.conf for the model and scenario, then
`user_conf`, then `overrides`, then the typed fields that are set (non-zero).

Why every test builds a fresh TestSettings this way: `TestSettings.FromConfig(path, model,
scenario, conf_type=1)` applies the built-in mlperf.conf only on its *first* call in a process
(a static counter inside LoadGen), so in a persistent session every later test would silently
lose those defaults. Instead:

1. `FromConfig("", model, scenario, 0)` applies the built-in mlperf.conf, every time (no counter);
   skipped when `skip_mlperf_defaults` is set.
2. `user_conf` is written to a file and read with `FromConfig(path, model, scenario, 2)`: the same
   parser, no counter and no "multiple conf files" error. A non-zero return code is an
   InvalidArgument on `settings.user_conf`.
3. `overrides` are written as `model.scenario.key = value` lines to a second file and read the same
   way, after user_conf, so they win even over an exact-match key of user_conf.
4. The non-zero typed fields are set on the object directly (durations in ms/ns, the latency
   percentile from 0..100 to 0..1).

mlperf_loadgen is imported where a TestSettings is built, so the agent process, which only
validates, never loads LoadGen.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mecbench.core import durations
from mecbench.core.errors import FieldViolation, InvalidArgument, Violations
from mecbench.core.issuing import ISSUE_THREADS_RULE
from mecbench.v1 import common_pb2

DEFAULT_MODEL = "mecbench"

SCENARIO_NAMES: dict[common_pb2.Scenario.ValueType, str] = {
    common_pb2.SCENARIO_SINGLE_STREAM: "SingleStream",
    common_pb2.SCENARIO_MULTI_STREAM: "MultiStream",
    common_pb2.SCENARIO_SERVER: "Server",
    common_pb2.SCENARIO_OFFLINE: "Offline",
}
SCENARIOS_BY_NAME: dict[str, common_pb2.Scenario.ValueType] = {name: value for value, name in SCENARIO_NAMES.items()}

# LoadGen's TestMode member for each proto mode; UNSPECIFIED is a performance run.
MODE_NAMES: dict[common_pb2.TestMode.ValueType, str] = {
    common_pb2.TEST_MODE_UNSPECIFIED: "PerformanceOnly",
    common_pb2.TEST_MODE_PERFORMANCE_ONLY: "PerformanceOnly",
    common_pb2.TEST_MODE_ACCURACY_ONLY: "AccuracyOnly",
    common_pb2.TEST_MODE_SUBMISSION_RUN: "SubmissionRun",
    common_pb2.TEST_MODE_FIND_PEAK_PERFORMANCE: "FindPeakPerformance",
}
MODES_BY_NAME: dict[str, common_pb2.TestMode.ValueType] = {
    "PerformanceOnly": common_pb2.TEST_MODE_PERFORMANCE_ONLY,
    "AccuracyOnly": common_pb2.TEST_MODE_ACCURACY_ONLY,
    "SubmissionRun": common_pb2.TEST_MODE_SUBMISSION_RUN,
    "FindPeakPerformance": common_pb2.TEST_MODE_FIND_PEAK_PERFORMANCE,
}

_DURATION_FIELDS = (
    "min_duration",
    "max_duration",
    "server_target_latency",
    "single_stream_expected_latency",
    "multi_stream_expected_latency",
    "ttft_latency",
    "tpot_latency",
)
# A conf line is whitespace-separated tokens: `model.scenario.key = value`.
_TOKEN = re.compile(r"^[^\s=#]+$")
_MODEL = re.compile(r"^[^\s=#]*$")
_MAX_USER_CONF_BYTES = 1024 * 1024


def model_name(settings: common_pb2.LoadGenSettings) -> str:
    return settings.model or DEFAULT_MODEL


def scenario_name(scenario: common_pb2.Scenario.ValueType) -> str:
    return SCENARIO_NAMES[scenario]


def _conf_sets(settings: common_pb2.LoadGenSettings, key: str) -> bool:
    """Whether user_conf or overrides set `key` (for any model/scenario: a cheap textual check)."""
    if any(o.key == key for o in settings.overrides):
        return True
    pattern = re.compile(rf"^\s*\S+\.\S+\.{re.escape(key)}\s+=\s+\S", re.MULTILINE)
    return bool(pattern.search(settings.user_conf))


def validate_settings(
    settings: common_pb2.LoadGenSettings, field: str = "settings", sample_count: int | None = None
) -> list[FieldViolation]:
    """Every problem of `settings` at once, with field paths under `field`.

    `sample_count` is the session's dataset size, when known, to bound performance_sample_count.
    """
    v = Violations()
    if settings.scenario not in SCENARIO_NAMES:
        v.add(f"{field}.scenario", f"must be one of {', '.join(common_pb2.Scenario.Name(s) for s in SCENARIO_NAMES)}")
    if settings.mode not in MODE_NAMES:
        v.add(f"{field}.mode", "unknown test mode")
    elif (
        settings.mode == common_pb2.TEST_MODE_FIND_PEAK_PERFORMANCE and settings.scenario != common_pb2.SCENARIO_SERVER
    ):
        v.add(f"{field}.mode", "TEST_MODE_FIND_PEAK_PERFORMANCE needs SCENARIO_SERVER")
    v.check(bool(_MODEL.match(settings.model)), f"{field}.model", "must not contain whitespace, '=' or '#'")
    for name in _DURATION_FIELDS:
        v.check(not durations.is_negative(getattr(settings, name)), f"{field}.{name}", "must not be negative")
    min_ns, max_ns = durations.to_ns(settings.min_duration), durations.to_ns(settings.max_duration)
    if min_ns > 0 and max_ns > 0:
        v.check(max_ns >= min_ns, f"{field}.max_duration", "must not be shorter than min_duration")
    if settings.min_query_count and settings.max_query_count:
        v.check(
            settings.max_query_count >= settings.min_query_count,
            f"{field}.max_query_count",
            "must not be less than min_query_count",
        )
    for name in ("server_target_qps", "offline_expected_qps"):
        value = getattr(settings, name)
        v.check(math.isfinite(value) and value >= 0, f"{field}.{name}", "must be a finite number >= 0")
    percentile = settings.server_target_latency_percentile
    if percentile != 0:
        v.check(0 < percentile <= 100, f"{field}.server_target_latency_percentile", "must be in (0, 100]")
    probability = settings.accuracy_log_probability
    v.check(0 <= probability <= 1, f"{field}.accuracy_log_probability", "must be in [0, 1]")
    if (
        settings.scenario == common_pb2.SCENARIO_SERVER
        and settings.server_target_qps == 0
        and not _conf_sets(settings, "target_qps")
    ):
        v.add(f"{field}.server_target_qps", "required for SCENARIO_SERVER (or target_qps in user_conf/overrides)")
    # LoadGen would wait for ever for issue threads the Python binding cannot register.
    if settings.server_num_issue_query_threads:
        v.add(f"{field}.server_num_issue_query_threads", ISSUE_THREADS_RULE)
    if _conf_sets(settings, "server_num_issue_query_threads"):
        v.add(f"{field}.user_conf", f"server_num_issue_query_threads: {ISSUE_THREADS_RULE}")
    if sample_count is not None and settings.performance_sample_count > sample_count:
        v.add(
            f"{field}.performance_sample_count",
            f"must not exceed the session's dataset of {sample_count} samples",
        )
    if len(settings.user_conf.encode()) > _MAX_USER_CONF_BYTES:
        v.add(f"{field}.user_conf", f"longer than {_MAX_USER_CONF_BYTES} bytes")
    for i, override in enumerate(settings.overrides):
        path = f"{field}.overrides[{i}]"
        if not override.key:
            v.add(f"{path}.key", "required")
        elif not _TOKEN.match(override.key) or "." in override.key:
            v.add(f"{path}.key", "must be one word without '.', '=', '#' or whitespace")
        if override.model and override.model != "*" and not _TOKEN.match(override.model):
            v.add(f"{path}.model", "must be '*' or a model name without '=', '#' or whitespace")
        if override.scenario and override.scenario != "*" and override.scenario not in SCENARIOS_BY_NAME:
            v.add(f"{path}.scenario", f"must be '*' or one of {', '.join(SCENARIOS_BY_NAME)}")
        if not _TOKEN.match(override.value):
            v.add(f"{path}.value", "must be one word without '=', '#' or whitespace")
    return v.items


def override_lines(overrides: Iterable[common_pb2.SettingOverride]) -> str:
    """user.conf lines for the overrides; an empty model or scenario means any (`*`)."""
    return "".join(f"{o.model or '*'}.{o.scenario or '*'}.{o.key} = {o.value}\n" for o in overrides)


def _apply_conf(ts: Any, text: str, path: Path, model: str, scenario: str, field: str) -> None:
    path.write_text(text)
    rc = ts.FromConfig(str(path), model, scenario, 2)
    if rc != 0:
        raise InvalidArgument(
            f"LoadGen rejected it (code {rc}): every line must read `model.scenario.key = value`", field
        )


def _ceil_ms(ns: int) -> int:
    return -(-ns // 1_000_000)


def build_test_settings(
    settings: common_pb2.LoadGenSettings, conf_dir: Path | None = None, field: str = "settings"
) -> Any:
    """A fresh mlperf_loadgen.TestSettings for `settings`; raises InvalidArgument.

    `conf_dir` receives the temporary conf files (a temporary directory when None).
    """
    violations = validate_settings(settings, field)
    if violations:
        raise InvalidArgument(violations)
    if conf_dir is None:
        with tempfile.TemporaryDirectory(prefix="mecbench-conf-") as tmp:
            return build_test_settings(settings, Path(tmp), field)

    import mlperf_loadgen as lg

    model = model_name(settings)
    scenario = scenario_name(settings.scenario)
    ts = lg.TestSettings()
    if not settings.skip_mlperf_defaults:
        rc = ts.FromConfig("", model, scenario, 0)
        if rc != 0:
            raise InvalidArgument(f"LoadGen could not apply its mlperf.conf (code {rc})", f"{field}.model")
    if settings.user_conf.strip():
        _apply_conf(ts, settings.user_conf, conf_dir / "user.conf", model, scenario, f"{field}.user_conf")
    if settings.overrides:
        _apply_conf(
            ts, override_lines(settings.overrides), conf_dir / "overrides.conf", model, scenario, f"{field}.overrides"
        )

    ts.scenario = getattr(lg.TestScenario, scenario)
    ts.mode = getattr(lg.TestMode, MODE_NAMES[settings.mode])
    if ns := durations.to_ns(settings.min_duration):
        ts.min_duration_ms = _ceil_ms(ns)
    if ns := durations.to_ns(settings.max_duration):
        ts.max_duration_ms = _ceil_ms(ns)
    if settings.min_query_count:
        ts.min_query_count = settings.min_query_count
    if settings.max_query_count:
        ts.max_query_count = settings.max_query_count
    if settings.server_target_qps:
        ts.server_target_qps = settings.server_target_qps
    if ns := durations.to_ns(settings.server_target_latency):
        ts.server_target_latency_ns = ns
    if settings.server_target_latency_percentile:
        ts.server_target_latency_percentile = settings.server_target_latency_percentile / 100.0
    if settings.server_coalesce_queries:
        ts.server_coalesce_queries = True
    if settings.server_num_issue_query_threads:
        ts.server_num_issue_query_threads = settings.server_num_issue_query_threads
    if settings.server_max_async_queries:
        ts.server_max_async_queries = settings.server_max_async_queries
    if settings.offline_expected_qps:
        ts.offline_expected_qps = settings.offline_expected_qps
    if ns := durations.to_ns(settings.single_stream_expected_latency):
        ts.single_stream_expected_latency_ns = ns
    if settings.multi_stream_samples_per_query:
        ts.multi_stream_samples_per_query = settings.multi_stream_samples_per_query
    if ns := durations.to_ns(settings.multi_stream_expected_latency):
        ts.multi_stream_expected_latency_ns = ns
    if settings.performance_sample_count:
        ts.performance_sample_count_override = settings.performance_sample_count
    if settings.qsl_rng_seed:
        ts.qsl_rng_seed = settings.qsl_rng_seed
    if settings.sample_index_rng_seed:
        ts.sample_index_rng_seed = settings.sample_index_rng_seed
    if settings.schedule_rng_seed:
        ts.schedule_rng_seed = settings.schedule_rng_seed
    if settings.use_token_latencies:
        ts.use_token_latencies = True
    if ns := durations.to_ns(settings.ttft_latency):
        ts.ttft_latency = ns
    if ns := durations.to_ns(settings.tpot_latency):
        ts.tpot_latency = ns
    if settings.accuracy_log_probability:
        ts.accuracy_log_probability = settings.accuracy_log_probability
    return ts


def settings_snapshot(ts: Any) -> dict[str, str]:
    """Every public attribute of a TestSettings as text (enums by name), for display and comparison."""
    snapshot: dict[str, str] = {}
    for name in dir(ts):
        if name.startswith("_"):
            continue
        value = getattr(ts, name)
        if callable(value) and not hasattr(value, "name"):
            continue
        snapshot[name] = value.name if hasattr(value, "name") else str(value)
    return snapshot


def describe_test_settings(ts: Any) -> str:
    """`key = value` lines of every TestSettings attribute, sorted."""
    return "".join(f"{key} = {value}\n" for key, value in sorted(settings_snapshot(ts).items()))
