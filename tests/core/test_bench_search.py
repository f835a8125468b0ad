"""The bench's ceiling search: found by search to 5 %, not read off the top of a ladder."""

from __future__ import annotations

import pytest

from bench.harness import search_ceiling


@pytest.mark.parametrize("true_ceiling", [1234.0, 80_000.0, 413_000.0, 1_999_999.0])
def test_the_search_brackets_the_ceiling_within_five_percent(true_ceiling: float) -> None:
    tried: list[float] = []

    def valid(qps: float) -> bool:
        tried.append(qps)
        return qps <= true_ceiling

    found = search_ceiling(valid, 2000.0, 4_000_000.0)
    assert found.valid_qps <= true_ceiling < found.invalid_qps
    assert found.invalid_qps / found.valid_qps <= 1.05
    assert found.probes == len(tried) < 30


def test_a_ceiling_above_the_limit_says_none_was_found() -> None:
    found = search_ceiling(lambda qps: True, 2000.0, 10_000.0)
    assert found.valid_qps == 8000.0 and found.invalid_qps == float("inf")
    assert "none found" in found.text()
