"""Shared by the CLI tests: `mecbench ARGS` as a subprocess, tiny experiment specs, a real
controller per test module, and a state directory of the tests' own (so a stack a developer
started with `mecbench up` is never used, nor stopped, by a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.conftest import Stack, start_stack, stop_stack

TINY_SPEC = """
experiment_id: {experiment_id}
sut:
  synthetic: {{distribution: SERVICE_TIME_DISTRIBUTION_CONSTANT, mean: 0.001s}}
dataset:
  synthetic: {{sample_count: 64, shape: [16], data_type: DATA_TYPE_FLOAT32}}
settings:
  min_duration: {min_duration}
  min_query_count: {queries}
  server_target_latency: 0.05s
  single_stream_expected_latency: 0.001s
  skip_mlperf_defaults: true
sweep:
  scenarios: [{scenario}]
  clients: [1, 2]
  server_target_qps: [200]
  repeats: {repeats}
"""


@pytest.fixture(scope="session", autouse=True)
def isolated_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("mecbench-state")
        patch.setenv("MECBENCH_STATE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("cli-controller"))
    yield running
    stop_stack(running)


def mecbench(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`mecbench ARGS` as a user runs it, with no controller named in the environment."""
    env = {k: v for k, v in os.environ.items() if k != "MECBENCH_CONTROLLER"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "mecbench", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def spec_file(
    tmp_path: Path,
    experiment_id: str,
    scenario: str = "SCENARIO_SINGLE_STREAM",
    queries: int = 100,
    *,
    min_duration: str = "0.3s",
    repeats: int = 1,
    skip_calibration: bool = False,
) -> Path:
    path = tmp_path / f"{experiment_id}.yaml"
    text = TINY_SPEC.format(
        experiment_id=experiment_id, scenario=scenario, queries=queries, min_duration=min_duration, repeats=repeats
    )
    path.write_text(text + ("skip_calibration: true\n" if skip_calibration else ""))
    return path
