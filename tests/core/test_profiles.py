"""Shipped network profiles and the original MECBench's string NetEm config."""

from __future__ import annotations

import pytest

from mecbench.core import durations
from mecbench.core.errors import InvalidArgument
from mecbench.profiles import PROFILES, netem_from_strings, parse_rate, parse_time, resolve_profile
from mecbench.v1 import common_pb2


def test_original_mecbench_profiles_keep_their_figures() -> None:
    assert PROFILES["4g"].netem.rate_bps == 12_500_000
    assert durations.to_ns(PROFILES["4g"].netem.delay) == 10_000_000
    assert PROFILES["5g"].netem.rate_bps == 10_000_000_000
    assert durations.to_ns(PROFILES["5g"].netem.delay) == 1_000_000
    assert PROFILES["4g"].direction == common_pb2.DIRECTION_EGRESS


def test_a_named_profile_resolves_and_keeps_the_callers_side() -> None:
    resolved = resolve_profile(common_pb2.NetworkProfile(name="wifi", side=common_pb2.SHAPING_SIDE_BOTH))
    assert resolved.netem.rate_bps == 100_000_000 and resolved.side == common_pb2.SHAPING_SIDE_BOTH
    custom = common_pb2.NetworkProfile(name="mine", netem=common_pb2.NetemConfig(rate_bps=5))
    assert resolve_profile(custom) == custom
    with pytest.raises(InvalidArgument, match="no network profile named 'nope'") as info:
        resolve_profile(common_pb2.NetworkProfile(name="nope"), "spec.network")
    assert info.value.violations[0].field == "spec.network.name"


@pytest.mark.parametrize(("text", "bps"), [("100mbit", 100_000_000), ("12.5Mbit", 12_500_000), ("1gbit", 10**9),
                                           ("64kbit", 64_000), ("1mbps", 8_000_000), ("500", 500)])
def test_rates_read_as_tc_reads_them(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize(("text", "ns"), [("20ms", 20_000_000), ("1.5s", 1_500_000_000), ("250us", 250_000),
                                          ("7", 7_000_000)])
def test_times_read_as_tc_reads_them(text: str, ns: int) -> None:
    assert durations.to_ns(parse_time(text)) == ns


def test_string_config_translates_to_typed_netem() -> None:
    netem = netem_from_strings({"bandwidth": "100mbit", "delay": "20ms", "jitter": "5ms", "loss_rate": "0.5",
                                "reorder": "25"})
    assert netem.rate_bps == 100_000_000
    assert durations.to_ns(netem.delay) == 20_000_000 and durations.to_ns(netem.jitter) == 5_000_000
    assert netem.loss_percent == 0.5 and netem.reorder_percent == 25


def test_string_config_reports_every_bad_value_at_once() -> None:
    with pytest.raises(InvalidArgument) as info:
        netem_from_strings({"bandwidth": "fast", "delay": "-3ms", "loss_rate": "120", "colour": "red"})
    fields = {v.field for v in info.value.violations}
    assert fields == {"netem.bandwidth", "netem.delay", "netem.loss_rate", "netem.colour"}


def test_reorder_without_delay_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="needs a delay"):
        netem_from_strings({"reorder": "10"})
