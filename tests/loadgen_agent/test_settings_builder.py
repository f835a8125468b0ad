"""LoadGenSettings -> mlperf_loadgen.TestSettings, with real LoadGen (no process of its own needed)."""

from __future__ import annotations

import mlperf_loadgen as lg
import pytest

from loadgen_agent.settings_builder import build_test_settings, settings_snapshot, validate_settings
from mecbench.core import durations
from mecbench.core.errors import InvalidArgument
from mecbench.v1 import common_pb2


def server(**fields: object) -> common_pb2.LoadGenSettings:
    base: dict[str, object] = {"scenario": common_pb2.SCENARIO_SERVER, "server_target_qps": 100.0}
    base |= fields
    return common_pb2.LoadGenSettings(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "scenario",
    [
        common_pb2.SCENARIO_SINGLE_STREAM,
        common_pb2.SCENARIO_MULTI_STREAM,
        common_pb2.SCENARIO_SERVER,
        common_pb2.SCENARIO_OFFLINE,
    ],
)
def test_first_and_hundredth_build_are_identical(scenario: common_pb2.Scenario.ValueType) -> None:
    """LoadGen applies its mlperf.conf only on the first FromConfig(conf_type=1) of a process; the
    builder must not depend on that: every build in this process comes out the same, defaults
    included."""
    settings = common_pb2.LoadGenSettings(
        scenario=scenario,
        model="resnet50",
        server_target_qps=50.0,
        user_conf="*.*.min_query_count = 77\n",
        overrides=[common_pb2.SettingOverride(key="max_query_count", value="5000")],
    )
    snapshots = [settings_snapshot(build_test_settings(settings)) for _ in range(100)]
    first, hundredth = snapshots[0], snapshots[-1]
    assert len(first) >= 40  # every attribute of TestSettings, not a few
    assert all(s == first for s in snapshots)
    assert hundredth == first
    # mlperf.conf's values are there on the 100th build too.
    assert hundredth["min_duration_ms"] == "600000"
    assert hundredth["qsl_rng_seed"] != "0"
    assert hundredth["performance_sample_count_override"] == "1024"  # resnet50's entry
    assert hundredth["min_query_count"] == "77" and hundredth["max_query_count"] == "5000"


def test_user_conf_wildcards() -> None:
    ts = build_test_settings(
        server(
            server_target_qps=0.0,
            user_conf=(
                "# comment lines and blank lines are fine\n\n"
                "*.Server.target_qps = 123\n"
                "mecbench.*.min_duration = 777\n"
                "*.*.max_query_count = 55\n"
                "*.Offline.min_query_count = 9999\n"  # another scenario: not applied
                "other-model.Server.max_duration = 1\n"  # another model: not applied
            ),
        )
    )
    assert ts.server_target_qps == 123
    assert ts.min_duration_ms == 777
    assert ts.max_query_count == 55
    assert ts.min_query_count != 9999
    assert ts.max_duration_ms == 0


def test_precedence_mlperf_conf_user_conf_overrides_typed() -> None:
    base = server(model="resnet50")
    assert build_test_settings(base).server_target_latency_ns == 15_000_000  # mlperf.conf
    with_conf = server(model="resnet50", user_conf="resnet50.Server.target_latency = 20\n")
    assert build_test_settings(with_conf).server_target_latency_ns == 20_000_000
    # An override wins even over an exact-match key of user_conf.
    with_conf.overrides.append(common_pb2.SettingOverride(model="*", scenario="*", key="target_latency", value="30"))
    assert build_test_settings(with_conf).server_target_latency_ns == 30_000_000
    with_conf.server_target_latency.CopyFrom(durations.from_seconds(0.040))
    assert build_test_settings(with_conf).server_target_latency_ns == 40_000_000


def test_skip_mlperf_defaults() -> None:
    ts = build_test_settings(server(skip_mlperf_defaults=True))
    assert ts.min_duration_ms == lg.TestSettings().min_duration_ms != 600000
    assert ts.qsl_rng_seed == 0


def test_typed_fields_and_units() -> None:
    ts = build_test_settings(
        server(
            mode=common_pb2.TEST_MODE_ACCURACY_ONLY,
            min_duration=durations.from_seconds(0.0015),  # rounds up to whole milliseconds
            max_duration=durations.from_seconds(5.0),
            server_target_latency=durations.from_seconds(0.025),
            server_target_latency_percentile=97.0,
            server_coalesce_queries=True,
            server_max_async_queries=3,
            performance_sample_count=64,
            schedule_rng_seed=42,
            use_token_latencies=True,
            ttft_latency=durations.from_seconds(0.5),
            accuracy_log_probability=0.25,
        )
    )
    assert ts.scenario == lg.TestScenario.Server and ts.mode == lg.TestMode.AccuracyOnly
    assert ts.min_duration_ms == 2 and ts.max_duration_ms == 5000
    assert ts.server_target_latency_ns == 25_000_000
    assert ts.server_target_latency_percentile == pytest.approx(0.97)
    assert ts.server_coalesce_queries and ts.server_max_async_queries == 3
    assert ts.performance_sample_count_override == 64 and ts.schedule_rng_seed == 42
    assert ts.use_token_latencies and ts.ttft_latency == 500_000_000
    assert ts.accuracy_log_probability == pytest.approx(0.25)
    assert (
        build_test_settings(common_pb2.LoadGenSettings(scenario=common_pb2.SCENARIO_SINGLE_STREAM)).mode
        == lg.TestMode.PerformanceOnly
    )


def test_rejected_user_conf_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_test_settings(server(user_conf="mecbench.Server.target_qps = fast\n"))
    assert [v.field for v in caught.value.violations] == ["settings.user_conf"]


def test_every_violation_at_once() -> None:
    settings = common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_UNSPECIFIED,
        server_target_qps=-1.0,
        min_duration=durations.from_seconds(-1.0),
        server_target_latency_percentile=150.0,
        accuracy_log_probability=2.0,
        model="has space",
        overrides=[common_pb2.SettingOverride(key="", value="1"), common_pb2.SettingOverride(key="a.b", value="x y")],
    )
    fields = {v.field for v in validate_settings(settings)}
    assert fields == {
        "settings.scenario",
        "settings.server_target_qps",
        "settings.min_duration",
        "settings.server_target_latency_percentile",
        "settings.accuracy_log_probability",
        "settings.model",
        "settings.overrides[0].key",
        "settings.overrides[1].key",
        "settings.overrides[1].value",
    }
    server_without_qps = validate_settings(common_pb2.LoadGenSettings(scenario=common_pb2.SCENARIO_SERVER))
    assert [v.field for v in server_without_qps] == ["settings.server_target_qps"]
    # ... unless user_conf or an override supplies it.
    assert not validate_settings(
        common_pb2.LoadGenSettings(scenario=common_pb2.SCENARIO_SERVER, user_conf="*.Server.target_qps = 10\n")
    )
    # LoadGen would wait for ever for issue threads nothing can register, however they are asked for.
    issue_threads = common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SERVER, server_target_qps=10.0, server_num_issue_query_threads=2,
        user_conf="*.Server.server_num_issue_query_threads = 2\n",
    )
    assert [v.field for v in validate_settings(issue_threads)] == [
        "settings.server_num_issue_query_threads", "settings.user_conf"
    ]
    too_many = common_pb2.LoadGenSettings(scenario=common_pb2.SCENARIO_SINGLE_STREAM, performance_sample_count=2000)
    assert [v.field for v in validate_settings(too_many, sample_count=1024)] == ["settings.performance_sample_count"]
    with pytest.raises(InvalidArgument):
        build_test_settings(settings)
