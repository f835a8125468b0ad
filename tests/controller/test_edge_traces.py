"""Traces of time-varying links: CSV and Mahimahi packet-delivery traces read into schedules, the
shipped traces valid as the node agent checks them, and bad traces refused naming each cell."""

from __future__ import annotations

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from mecbench.core import durations
from mecbench.core.errors import InvalidArgument, Violations
from mecbench.experiment_file import parse_experiment
from mecbench.profiles import PROFILES, TRACES, resolve_profile, schedule_from_csv, schedule_from_mahimahi
from mecbench.schema import experiment_json_schema
from mecbench.v1 import common_pb2
from node_agent.schedule import check_schedule


def steps(schedule: common_pb2.LinkSchedule) -> list[tuple[float, int, float, float]]:
    return [(durations.to_seconds(s.at), s.netem.rate_bps, durations.to_seconds(s.netem.delay), s.netem.loss_percent)
            for s in schedule.steps]


def test_a_csv_trace_reads_in_tcs_units() -> None:
    schedule = schedule_from_csv(
        "# a handover\ntime,rate,delay,loss\n0,100mbit,4ms,\n2.5s,12.5mbit,10ms,0.5\n3500ms,100mbit,4ms,\n",
        source="handover.csv",
    )
    assert schedule.source == "handover.csv"
    assert steps(schedule) == [(0.0, 100_000_000, 0.004, 0.0), (2.5, 12_500_000, 0.01, 0.5),
                               (3.5, 100_000_000, 0.004, 0.0)]


def test_a_bad_csv_trace_names_every_bad_cell() -> None:
    with pytest.raises(InvalidArgument) as bad:
        schedule_from_csv("time,rate,delay\n0,fast,1ms\nsoon,5mbit,\n1,5mbit,yesterday\n")
    assert {v.field for v in bad.value.violations} == {
        "trace.line[2].rate", "trace.line[3].time", "trace.line[4].delay",
    }
    with pytest.raises(InvalidArgument) as header:
        schedule_from_csv("time,rate,colour\n0,1mbit,red\n")
    assert [v.field for v in header.value.violations] == ["trace.header"]


def test_a_mahimahi_trace_becomes_rate_steps_that_loop() -> None:
    # 100 ms bins: 10 opportunities (1.2 Mbit/s), then 1 (0.12 Mbit/s), then none, then 10 again.
    lines = [str(t) for t in range(0, 100, 10)] + ["150"] + [str(t) for t in range(300, 400, 10)] + ["400"]
    schedule = schedule_from_mahimahi("\n".join(lines) + "\n", bin_ms=100, source="cell.trace")
    assert durations.to_seconds(schedule.period) == 0.4
    assert [(at, rate) for at, rate, _, _ in steps(schedule)] == [
        (0.0, 1_200_000), (0.1, 120_000), (0.2, 16_000), (0.3, 1_320_000),
    ]
    with pytest.raises(InvalidArgument):
        schedule_from_mahimahi("10\n5\n")


@pytest.mark.parametrize("name", sorted(TRACES))
def test_every_shipped_trace_is_a_schedule_the_node_agent_accepts(name: str) -> None:
    profile = resolve_profile(common_pb2.NetworkProfile(name=name))
    assert profile.HasField("schedule") and PROFILES[name] == profile
    assert profile.netem == profile.schedule.steps[0].netem  # installed as its first step
    violations = Violations()
    checked = check_schedule(profile.schedule, "schedule", violations)
    assert not violations.items and len(checked) >= 2
    assert all(step.netem is None and step.rate_bytes > 0 for step in checked)  # rate-only: runs without netem


def test_a_profile_with_only_a_schedule_starts_at_its_first_step() -> None:
    schedule = schedule_from_csv("time,rate\n0,5mbit\n1,50mbit\n")
    profile = resolve_profile(common_pb2.NetworkProfile(name="mine", schedule=schedule))
    assert profile.netem.rate_bps == 5_000_000
    with pytest.raises(InvalidArgument):
        resolve_profile(common_pb2.NetworkProfile(name="empty", schedule=common_pb2.LinkSchedule()))


SPEC_WITH_TRACES = """
experiment_id: traces-in-a-file
sut: {synthetic: {mean: 0.001s}}
settings: {scenario: SCENARIO_SINGLE_STREAM}
sweep:
  client_mixes:
    - name: cellular
      groups:
        - {name: walking, clients: 2, network: {name: walk, schedule: {mahimahi: "0\\n0\\n50\\n100\\n150\\n", bin_ms: 100}}}
        - {name: parked, clients: 1, network: {name: slow-fade}}
"""

SPEC_WITH_CSV = """
experiment_id: csv-trace
sut: {synthetic: {mean: 0.001s}}
settings: {scenario: SCENARIO_SINGLE_STREAM}
sweep:
  network_profiles:
    - name: my-handover
      schedule:
        source: handover.csv
        csv: |
          time,rate,delay
          0,100mbit,
          2s,12.5mbit,
"""


def test_a_spec_file_may_give_a_profile_its_trace_inline() -> None:
    spec = parse_experiment(SPEC_WITH_CSV)
    (profile,) = spec.sweep.network_profiles
    assert profile.schedule.source == "handover.csv"
    assert steps(profile.schedule) == [(0.0, 100_000_000, 0.0, 0.0), (2.0, 12_500_000, 0.0, 0.0)]
    mixed = parse_experiment(SPEC_WITH_TRACES)
    walking = mixed.sweep.client_mixes[0].groups[0].network.schedule
    assert [rate for _, rate, _, _ in steps(walking)] == [360_000, 240_000]  # 3 and 2 packets a 100 ms
    validator = jsonschema.Draft202012Validator(experiment_json_schema())
    for text in (SPEC_WITH_CSV, SPEC_WITH_TRACES):
        assert not list(validator.iter_errors(yaml.safe_load(text)))
    with pytest.raises(InvalidArgument) as bad:
        parse_experiment(SPEC_WITH_CSV.replace("12.5mbit", "lots"))
    assert [v.field for v in bad.value.violations] == ["spec.sweep.network_profiles[0].schedule.csv.line[3].rate"]
