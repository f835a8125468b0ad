"""SUT placement as a sweep axis: an experiment over three CPU quotas run from the CLI against a
real controller, each quota a point of its own in the results, the CLI table and the report's
throughput/latency-vs-resources figure (decoded, not blank)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controller.experiments import Point, expand, placement_slug, sut_for, validate_experiment
from mecbench.core.errors import InvalidArgument
from mecbench.experiment_file import parse_experiment
from mecbench.report import VS_RESOURCES
from mecbench.v1 import common_pb2, controller_pb2
from tests.cli.conftest import mecbench
from tests.conftest import requires_root
from tests.controller.conftest import Stack, start_stack, stop_stack
from tests.controller.test_placement import V1_MOUNTS, burn_model  # noqa: F401 - the model fixture
from tests.report.test_report import assert_png_has_content

SPEC = """
experiment_id: {experiment_id}
skip_calibration: true
sut:
  onnxruntime:
    model_path: {model}
    sample_shape: [16]
    data_type: DATA_TYPE_FLOAT32
    intra_op_threads: 1
    max_concurrency: 2
    max_batch_size: 8
  resources: {{memory_bytes: 2147483648}}
dataset:
  synthetic: {{sample_count: 64, shape: [16], data_type: DATA_TYPE_FLOAT32}}
settings:
  scenario: SCENARIO_OFFLINE
  # Above what two cores serve here (about 2900 samples/s), so even that point runs its minimum second.
  offline_expected_qps: 4000
  min_duration: 1s
  min_query_count: 100
sweep:
  cpu_cores: [0.5, 1, 2]
"""


def test_cpu_cores_shorthand_expands_into_placed_points() -> None:
    spec = parse_experiment(SPEC.format(experiment_id="expand", model="/m.onnx"))
    points, violations = expand(spec)
    assert not violations
    assert [p.selector for p in points] == [
        "offline-c1-unshaped-cpu0.5",
        "offline-c1-unshaped-cpu1",
        "offline-c1-unshaped-cpu2",
    ]
    config = sut_for(spec, points[0])
    # The point's cores over the SUT's own resources, which it keeps otherwise.
    assert config.resources.cpu_cores == 0.5 and config.resources.memory_bytes == 2**31
    assert spec.sut.resources.cpu_cores == 0
    pinned = common_pb2.ResourceLimits(cpus=[0, 1], memory_bytes=2**28)
    assert placement_slug(pinned) == "pin0_1-mem256m"
    config = sut_for(spec, Point(common_pb2.SCENARIO_OFFLINE, 1, common_pb2.NetworkProfile(), 0.0, pinned))
    assert list(config.resources.cpus) == [0, 1] and config.resources.memory_bytes == 2**28


def test_bad_placement_axes_are_refused_naming_the_fields() -> None:
    spec = parse_experiment(SPEC.format(experiment_id="bad", model="/m.onnx"))
    spec.sweep.cpu_cores.append(-1)
    spec.sweep.placements.add(cpu_cores=1)
    with pytest.raises(InvalidArgument) as caught:
        validate_experiment(spec)
    fields = {v.field for v in caught.value.violations}
    assert {"spec.sweep.cpu_cores", "spec.sweep.cpu_cores[3]"} <= fields


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("controller"))
    yield running
    stop_stack(running)


@requires_root
@pytest.mark.skipif(not {"cpu", "cpuacct", "memory"} <= set(V1_MOUNTS), reason="needs the cgroup v1 hierarchies")
def test_a_sweep_over_three_cpu_placements_runs_from_the_cli_and_the_report_draws_it(
    stack: Stack,
    burn_model: Path,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    spec = tmp_path / "placements.yaml"
    spec.write_text(SPEC.format(experiment_id="placements", model=burn_model))
    at = ("--controller", stack.server.address)
    done = mecbench("run", str(spec), "--wait", *at, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for cores in ("0.5", "1", "2"):
        assert f"offline-c1-unshaped-cpu{cores}" in done.stdout

    listed = mecbench("results", "list", "--experiment", "placements", "--json", *at)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted(r["selector"] for r in rows) == sorted(f"offline-c1-unshaped-cpu{c}" for c in ("0.5", "1", "2"))
    text = mecbench("results", "list", "--experiment", "placements", *at)
    assert "offline-c1-unshaped-cpu0.5" in text.stdout and "offline-c1-unshaped-cpu2" in text.stdout

    # Each point ran on a SUT confined as it said: the cgroup's quota, read back, per point.
    runs = [stack.app.runs.get_run(run_id) for run_id in stack.app.experiments.get("placements").run_ids]
    applied = sorted(run.results[0].placement.applied.cpu_cores for run in runs)
    assert applied == pytest.approx([0.5, 1.0, 2.0])
    speeds = {run.results[0].placement.applied.cpu_cores: run.results[0].aggregate.samples_per_second for run in runs}
    assert speeds[0.5] < speeds[1.0], speeds

    reported = mecbench("report", "placements", "--out", str(tmp_path / "report"), "--json", *at)
    assert reported.returncode == 0, reported.stderr
    figures = [Path(f) for f in json.loads(reported.stdout)["figures"]]
    figure = tmp_path / "report" / VS_RESOURCES
    assert figure in figures
    assert_png_has_content(figure)
    page = (tmp_path / "report" / "report.html").read_text()
    assert VS_RESOURCES in page and "<th>SUT CPU cores</th>" in page and "<td>0.5</td>" in page


@requires_root
@pytest.mark.skipif(not {"cpu", "cpuacct", "memory"} <= set(V1_MOUNTS), reason="needs the cgroup v1 hierarchies")
def test_an_experiment_with_an_impossible_placement_is_refused_before_it_starts(
    stack: Stack,
    burn_model: Path,  # noqa: F811 - the fixture imported above
) -> None:
    spec = parse_experiment(SPEC.format(experiment_id="impossible", model=burn_model))
    spec.sweep.cpu_cores.append(64)
    before = {a.name for a in stack.app.pool.backend.agents()}
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=spec))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "asks for 64 CPU cores; this node has" in (caught.value.details() or "")
    assert all(e.experiment_id != "impossible" for e in stack.app.experiments.list())
    assert {a.name for a in stack.app.pool.backend.agents()} - before <= {"node-agent"}
