"""The bench's ceiling search: found by search to 5 %, not read off the top of a ladder."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.harness import search_ceiling


@pytest.mark.parametrize("true_ceiling", [1234.0, 80_000.0, 413_000.0, 1_999_999.0])
def test_the_search_brackets_the_ceiling_within_five_percent(true_ceiling: float) -> None:
    tried: list[float] = []

    def valid(qps: float) -> bool:
        tried.append(qps)
        return qps <= true_ceiling

    found = search_ceiling(valid, 2000.0, 4_000_000.0, confirm=False)
    assert found.valid_qps <= true_ceiling < found.invalid_qps
    assert found.invalid_qps / found.valid_qps <= 1.05
    assert found.probes == len(tried) < 30
    confirmed = search_ceiling(valid, 2000.0, 4_000_000.0)
    assert (confirmed.valid_qps, confirmed.invalid_qps) == (found.valid_qps, found.invalid_qps)


def test_a_ceiling_above_the_limit_says_none_was_found() -> None:
    found = search_ceiling(lambda qps: True, 2000.0, 10_000.0)
    assert found.valid_qps == 8000.0 and found.invalid_qps == float("inf")
    assert "none found" in found.text()


def _stalls_once_at(rate: float, true_ceiling: float, tried: list[float]) -> Callable[[float], bool]:
    stalled: set[float] = set()

    def valid(qps: float) -> bool:
        tried.append(qps)
        if qps == rate and qps not in stalled:
            stalled.add(qps)
            return False
        return qps <= true_ceiling

    return valid


def test_one_stall_does_not_end_the_search_and_a_real_ceiling_still_does() -> None:
    """A transient INVALID (a stall of the shared machine) is retried once; a rate that fails
    twice is the ceiling's upper bound. Without the retry the stall at 16,000 ends the doubling."""
    tried: list[float] = []
    found = search_ceiling(_stalls_once_at(16_000.0, 100_000.0, tried), 2000.0, 4_000_000.0)
    assert found.valid_qps <= 100_000.0 < found.invalid_qps <= 1.05 * found.valid_qps
    assert found.probes == len(tried)
    unconfirmed = search_ceiling(_stalls_once_at(16_000.0, 100_000.0, []), 2000.0, 4_000_000.0, confirm=False)
    assert unconfirmed.invalid_qps == 16_000.0
