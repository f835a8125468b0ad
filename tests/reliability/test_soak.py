"""Short runs back to back through one controller (bench/soak.py, trimmed for CI): every run is
accounted for, and the controller process's open files, threads, child processes and memory
stay within stated bounds. The numbers are printed; `python -m bench.soak` runs 1000."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import soak
from tests.numbers import report

pytestmark = pytest.mark.slow

RUNS = 100
# Growth allowed from after the warm-up to after the last run: a leak of one per run would pass
# none of these, nor memory growing by 0.2 MiB a run. (200 runs grew RSS by 3.8 MiB here.)
MAX_NEW_FILES = 8
MAX_NEW_THREADS = 8
MAX_RSS_GROWTH_MIB = 20.0


def test_back_to_back_runs_leak_nothing(tmp_path: Path) -> None:
    result = soak(RUNS, tmp_path)
    report("soak", f"{result.runs} runs, {result.succeeded} succeeded, {result.listed} listed")
    report("soak", f"before: {result.before}")
    report("soak", f"after:  {result.after}")
    assert result.succeeded == RUNS and result.listed == RUNS
    assert result.after.open_files - result.before.open_files <= MAX_NEW_FILES
    assert result.after.threads - result.before.threads <= MAX_NEW_THREADS
    assert result.after.children == result.before.children
    assert result.after.rss_mib - result.before.rss_mib <= MAX_RSS_GROWTH_MIB
