"""Every `mecbench` command of issue 8 as a user runs it: a subprocess against a real controller
(in-process here, or the one `mecbench up` starts), a real node agent on a real veth pair for
`shape`, checked by what it prints and its exit code."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mecbench.cli.common import pid_alive
from mecbench.cli.runs import ProgressView
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2
from tests.cli.conftest import mecbench, spec_file
from tests.conftest import requires_root, start_service_process
from tests.controller.conftest import Stack
from tests.node_agent.conftest import VethPair, qdisc_kinds, veth_pair  # noqa: F401 - veth_pair is a fixture


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fields_of(text: str) -> dict[str, str]:
    """The `key   value` lines a `show` command prints (keys padded to one width), up to its
    first blank line."""
    block = text.split("\n\n", maxsplit=1)[0].splitlines()
    start = re.match(r"\S+\s{2,}", block[0])
    assert start is not None, block[0]
    return {line[: start.end()].strip(): line[start.end():].strip() for line in block}


def json_of(done: subprocess.CompletedProcess[str]) -> object:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@dataclass
class Finished:
    """A short experiment `mecbench run --wait` ran to the end: two points (1 and 2 clients) of
    two repeats each."""

    experiment_id: str
    output: subprocess.CompletedProcess[str]
    one_client: str
    two_clients: str
    address: str


@pytest.fixture(scope="module")
def finished(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    spec = spec_file(tmp_path_factory.mktemp("spec"), "cli-done", repeats=2, skip_calibration=True)
    done = mecbench("run", str(spec), "--wait", "--controller", stack.server.address)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {run.spec.selector: run.run_id for run in stack.app.runs.list_runs(
        controller_pb2.ListRunsRequest(experiment_id="cli-done")).runs}
    return Finished("cli-done", done, runs["ss-c1-unshaped"], runs["ss-c2-unshaped"], stack.server.address)


# --- up / down ----------------------------------------------------------------------------------


def test_up_serves_runs_list_then_down_stops_it(tmp_path: Path) -> None:
    env = {"MECBENCH_STATE_DIR": str(tmp_path / "state")}
    state_path = tmp_path / "state" / "stack.json"
    started = mecbench("up", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), env=env, timeout=90)
    pid = 0
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        state = json.loads(state_path.read_text())
        pid, address = state["pid"], state["address"]
        assert pid_alive(pid)
        assert f"controller at {address} (pid {pid})" in started.stdout
        # The controller's own node agent, started on the first ask, is listed with its address.
        assert [agent["kind"] for agent in state["agents"]] == ["node-agent"]
        assert state["agents"][0]["address"] in started.stdout
        assert (tmp_path / "data" / "controller.log").is_file()

        again = mecbench("up", "--json", env=env)
        assert again.returncode == 0 and json.loads(again.stdout)["already_up"] is True

        # No --controller: commands use the stack `up` saved.
        listed = mecbench("runs", "list", env=env)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.strip() == "no runs"
        assert json_of(mecbench("runs", "list", "--json", env=env)) == []

        stopped = mecbench("down", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped controller at {address} (pid {pid})" in stopped.stdout
        assert not pid_alive(pid)
        assert not state_path.exists()
        # Nothing listens any more: neither the controller nor the agent it started.
        for gone in (address, state["agents"][0]["address"]):
            host, _, port = gone.rpartition(":")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, int(port)), timeout=5).close()

        nothing = mecbench("down", env=env)
        assert nothing.returncode == 0 and "nothing is up" in nothing.stdout
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# --- run with live progress ------------------------------------------------------------------


def test_run_wait_prints_a_line_per_point_and_an_overall_line(finished: Finished) -> None:
    lines = finished.output.stdout.splitlines()
    # Not a terminal: a line whenever a point changes state or repeat, none redrawn in place.
    assert not any("\x1b[" in line for line in lines)
    for selector in ("ss-c1-unshaped", "ss-c2-unshaped"):
        point = [line for line in lines if line.startswith(selector + " ") and " QPS " in line]
        assert any("RUNNING" in line and "repeat 1/2" in line for line in point), point
        assert any("RUNNING" in line and "repeat 2/2" in line for line in point), point
        assert "SUCCEEDED" in point[-1] and "[####################]" in point[-1] and "QPS" in point[-1]
    overall = [line for line in lines if line.startswith("overall ")]
    assert "1/2 points" in " ".join(overall)
    assert "SUCCEEDED" in overall[-1] and "2/2 points" in overall[-1]
    assert "experiment cli-done: SUCCEEDED" in finished.output.stdout


def test_progress_is_redrawn_in_place_on_a_terminal() -> None:
    stream = io.StringIO()
    view = ProgressView(stream, tty=True)
    experiment = controller_pb2.Experiment(experiment_id="e", state=common_pb2.RUN_STATE_RUNNING, points_total=2)
    run = controller_pb2.Run(run_id="run-1", state=common_pb2.RUN_STATE_RUNNING)
    run.spec.selector = "server-c1"
    run.spec.repeats = 2
    run.spec.settings.min_duration.CopyFrom(durations.from_seconds(10))
    run.progress.repeat = 2
    run.progress.live_qps = 123.4
    run.progress.elapsed.CopyFrom(durations.from_seconds(5))
    experiment.run_ids.append("run-1")
    view.update(experiment, [run])
    view.update(experiment, [run])
    first, second = stream.getvalue().split("\x1b[2F")
    assert second.count("\x1b[2K") == 2  # both lines cleared and drawn again, in place
    point, overall = first.split("\n")[:2]
    # Repeat 2 of 2, half-way through its minimum duration: three quarters of the point.
    assert "server-c1" in point and "repeat 2/2" in point and "123.4 QPS" in point and "5.0s" in point
    assert "[###############.....]" in point
    # Overall: no point done, the first three quarters through, of two.
    assert "0/2 points" in overall and "[########............]" in overall


def test_ctrl_c_cancels_the_experiment_and_exits_130(stack: Stack, tmp_path: Path) -> None:
    spec = spec_file(tmp_path, "cli-interrupted", min_duration="60s", skip_calibration=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "mecbench", "run", str(spec), "--wait", "--controller", stack.server.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if "RUNNING" in line and line.startswith("ss-c1-unshaped"):
                break
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "cancelling experiment cli-interrupted" in stderr
    shown = json_of(mecbench("experiments", "show", "cli-interrupted", "--json", "--controller", stack.server.address))
    assert isinstance(shown, dict) and shown["state"] == "RUN_STATE_CANCELLED"


# --- experiments and runs -----------------------------------------------------------------------


def test_runs_list_show_and_watch_a_finished_run(finished: Finished) -> None:
    at = ("--controller", finished.address)
    listed = mecbench("runs", "list", "--experiment", finished.experiment_id, *at)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["run", "experiment", "selector", "state", "repeats", "created"]
    assert {row.split()[0] for row in rows} == {finished.one_client, finished.two_clients}
    assert all("SUCCEEDED" in row and "2/2" in row for row in rows)
    limited = json_of(mecbench("runs", "list", "--experiment", finished.experiment_id, "--limit", "1", "--json", *at))
    assert isinstance(limited, list) and len(limited) == 1
    none = mecbench("runs", "list", "--experiment", finished.experiment_id, "--state", "failed", *at)
    assert none.returncode == 0 and none.stdout.strip() == "no runs"
    bad_state = mecbench("runs", "list", "--state", "sleeping", *at)
    assert bad_state.returncode == 2 and "--state" in bad_state.stderr

    shown = mecbench("runs", "show", finished.two_clients, *at)
    assert shown.returncode == 0, shown.stderr
    fields = fields_of(shown.stdout)
    assert fields["state"] == "SUCCEEDED" and fields["selector"] == "ss-c2-unshaped"
    assert fields["clients"] == "2" and fields["repeats"] == "2/2 done" and fields["network"] == "unshaped"
    assert fields["scenario"] == "SingleStream" and fields["min duration"] == "0.3s"
    # Every repeat's result, and where its files are.
    assert "ss-c2-unshaped #1" in shown.stdout and "ss-c2-unshaped #2" in shown.stdout
    assert shown.stdout.count(" VALID ") == 2 and "#2: file://" in shown.stdout

    watched = mecbench("runs", "watch", finished.one_client, *at)
    assert watched.returncode == 0, watched.stderr
    assert "SUCCEEDED" in watched.stdout.splitlines()[0] and "ss-c1-unshaped #2" in watched.stdout
    events = [json.loads(line) for line in mecbench("runs", "watch", finished.one_client, "--json", *at).stdout.splitlines()]
    assert events[-1]["run"]["state"] == "RUN_STATE_SUCCEEDED"

    experiments = mecbench("experiments", "list", *at)
    assert experiments.returncode == 0 and "cli-done" in experiments.stdout and "2/2" in experiments.stdout
    followed = mecbench("experiments", "watch", "cli-done", *at)
    assert followed.returncode == 0 and "experiment cli-done: SUCCEEDED" in followed.stdout


def test_watch_then_cancel_a_live_run(stack: Stack, tmp_path: Path) -> None:
    at = ("--controller", stack.server.address)
    spec = spec_file(tmp_path, "cli-cancel", min_duration="60s", skip_calibration=True)
    started = json_of(mecbench("run", str(spec), "--json", *at))
    assert isinstance(started, dict) and started["experiment_id"] == "cli-cancel"
    deadline = time.monotonic() + 30
    while not (run_ids := list(stack.app.experiments.get("cli-cancel").run_ids)):
        assert time.monotonic() < deadline, "the experiment started no run"
        time.sleep(0.05)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "mecbench", "runs", "watch", run_ids[0], *at],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert watcher.stdout is not None
        assert "current state" in watcher.stdout.readline()
        cancelled = mecbench("runs", "cancel", run_ids[0], *at)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == f"run {run_ids[0]}: CANCELLED"
        rest, stderr = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 1, stderr  # it did not succeed
    assert "CANCELLED" in rest.splitlines()[-1] and f"run {run_ids[0]}: CANCELLED" in stderr

    stopped = mecbench("experiments", "cancel", "cli-cancel", *at)
    assert stopped.returncode == 0 and "CANCELLED" in stopped.stdout
    again = mecbench("runs", "cancel", run_ids[0], *at)
    assert again.returncode == 0 and "had already ended: CANCELLED" in again.stdout


# --- results ------------------------------------------------------------------------------------


def test_results_list_show_a_file_and_export_csv(finished: Finished, tmp_path: Path) -> None:
    at = ("--controller", finished.address)
    listed = mecbench("results", "list", "--experiment", finished.experiment_id, *at)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["experiment_id", "selector", "run_id"] and "latency_p99_ms" in header
    assert len(rows) == 4 and all(row.startswith("cli-done") for row in rows)
    filtered = json_of(mecbench("results", "list", "--run", finished.two_clients, "--scenario", "SingleStream",
                                "--json", *at))
    assert isinstance(filtered, list) and [r["repeat"] for r in filtered] == [1, 2]
    assert mecbench("results", "list", "--scenario", "Streaming", *at).returncode == 2

    shown = mecbench("results", "show", finished.one_client, "--repeat", "2", *at)
    assert shown.returncode == 0, shown.stderr
    fields = fields_of(shown.stdout)
    assert fields["run"] == f"{finished.one_client} repeat 2" and fields["result"] == "VALID"
    assert float(fields["samples/s"]) > 0 and fields["latency ms"].startswith("p50 ")
    assert "mlperf_log_summary.txt" in fields["files"].split(", ")

    summary = mecbench("results", "show", finished.one_client, "--file", "mlperf_log_summary.txt", *at)
    assert summary.returncode == 0, summary.stderr
    assert "MLPerf Results Summary" in summary.stdout and "Scenario : SingleStream" in summary.stdout
    # Two clients: each client's copy under a header.
    both = mecbench("results", "show", finished.two_clients, "--file", "mlperf_log_summary.txt", *at)
    assert both.returncode == 0, both.stderr
    assert "==> client-0/mlperf_log_summary.txt <==" in both.stdout
    assert "==> client-1/mlperf_log_summary.txt <==" in both.stdout
    assert both.stdout.count("MLPerf Results Summary") == 2
    missing = mecbench("results", "show", finished.one_client, "--file", "nope.txt", *at)
    assert missing.returncode == 4 and "result.json" in missing.stderr

    target = tmp_path / "results.csv"
    exported = mecbench("results", "export", "--experiment", finished.experiment_id, "--csv", str(target), *at)
    assert exported.returncode == 0, exported.stderr
    assert f"wrote 4 rows to {target}" in exported.stdout
    rows_read = list(csv.DictReader(target.open()))
    assert len(rows_read) == 4
    assert {r["run_id"] for r in rows_read} == {finished.one_client, finished.two_clients}
    assert all(float(r["samples_per_second"]) > 0 and float(r["latency_p99_ms"]) > 0 for r in rows_read)
    assert all(r["valid"] == "true" and r["scenario"] == "SingleStream" for r in rows_read)
    to_stdout = mecbench("results", "export", "--selector", "ss-c2-unshaped", "--experiment", "cli-done", *at)
    assert to_stdout.returncode == 0
    assert [r["selector"] for r in csv.DictReader(io.StringIO(to_stdout.stdout))] == ["ss-c2-unshaped"] * 2


def test_results_compare_runs_and_experiments(finished: Finished) -> None:
    at = ("--controller", finished.address)
    runs = mecbench("results", "compare", finished.one_client, finished.two_clients, *at)
    assert runs.returncode == 0, runs.stderr
    lines = runs.stdout.splitlines()
    assert lines[0].startswith(f"A = run {finished.one_client}   B = run {finished.two_clients}")
    assert lines[1].split()[:4] == ["point", "A", "samples/s", "B"]
    assert lines[2].startswith("ss-c1-unshaped | ss-c2-unshaped") and lines[2].count("x") >= 3

    compared = json_of(mecbench("results", "compare", finished.one_client, finished.two_clients, "--json", *at))
    assert isinstance(compared, dict)
    (point,) = compared["points"]
    ratio = point["ratio"]["samples_per_second"]
    assert ratio == pytest.approx(point["b"]["samples_per_second"] / point["a"]["samples_per_second"])
    assert point["a"]["repeats"] == 2 and point["b"]["repeats"] == 2

    # An experiment against itself: every point matched by selector, every ratio 1.
    same = json_of(mecbench("results", "compare", "cli-done", "cli-done", "--json", *at))
    assert isinstance(same, dict)
    assert [p["point"] for p in same["points"]] == ["ss-c1-unshaped", "ss-c2-unshaped"]
    assert all(v == pytest.approx(1.0) for p in same["points"] for v in p["ratio"].values())

    unknown = mecbench("results", "compare", "cli-done", "no-such-thing", *at)
    assert unknown.returncode == 4 and "no-such-thing: no run or experiment" in unknown.stderr


def test_plot_and_report_write_figures_and_a_page(finished: Finished, tmp_path: Path) -> None:
    at = ("--controller", finished.address)
    plotted = mecbench("plot", finished.experiment_id, "--out", str(tmp_path / "plots"), *at)
    assert plotted.returncode == 0, plotted.stderr
    figures = [Path(line) for line in plotted.stdout.splitlines()]
    assert figures and all(p.suffix == ".png" and p.stat().st_size > 1000 for p in figures)
    assert (tmp_path / "plots" / "qps_vs_clients.png") in figures

    reported = json_of(mecbench("report", finished.experiment_id, "--out", str(tmp_path / "report"), "--json", *at))
    assert isinstance(reported, dict)
    page = Path(reported["report"])
    assert page.name == "report.html" and page.is_file()
    assert reported["figures"] and all(Path(f).name in page.read_text() for f in reported["figures"])

    assert mecbench("plot", "no-such-experiment", "--out", str(tmp_path / "x"), *at).returncode == 4


# --- nodes and shaping --------------------------------------------------------------------------


def test_nodes_lists_the_node_agent_with_gpus_and_qdiscs(stack: Stack) -> None:
    listed = mecbench("nodes", "--controller", stack.server.address)
    assert listed.returncode == 0, listed.stderr
    header, row, *_ = listed.stdout.splitlines()
    assert header.split() == ["node", "address", "kind", "kernel", "CPUs", "memory", "GPUs", "qdiscs"]
    assert "node-agent" in row and "127.0.0.1:" in row
    (node,) = json_of(mecbench("nodes", "--json", "--controller", stack.server.address))  # type: ignore[misc]
    assert node["agent_address"] in row and "supported_qdiscs" in node


@requires_root
def test_shape_apply_list_clear_on_a_real_interface(
    veth_pair: VethPair, tmp_path: Path  # noqa: F811 - the fixture imported above
) -> None:
    agent, address = start_service_process("node-agent", {"MECBENCH_NODE_AGENT_STATE_DIR": str(tmp_path / "na")})
    where = ("--node", address, "--interface", veth_pair.left_if, "--netns", veth_pair.left)
    try:
        applied = mecbench("shape", "apply", *where, "--rate", "10mbit", "--lease-s", "120")
        assert applied.returncode == 0, applied.stderr
        assert f"on {veth_pair.left_if} in {veth_pair.left}, egress: 10 Mbit/s" in applied.stdout
        assert "tbf" in applied.stdout and "rate_bps=10000000" in applied.stdout
        assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["tbf"]

        refused = mecbench("shape", "apply", *where, "--rate", "20mbit")
        assert refused.returncode == 2 and "ALREADY_EXISTS" in refused.stderr
        replaced = json_of(mecbench("shape", "apply", *where, "--profile", "4g", "--delay", "0", "--replace",
                                    "--json"))
        assert isinstance(replaced, dict) and replaced["netem"]["rate_bps"] == "12500000"  # 4g's rate

        listed = json_of(mecbench("shape", "list", "--node", address, "--json"))
        assert isinstance(listed, dict)
        (shaping,) = listed["shapings"]
        assert shaping["shaping_id"] == replaced["shaping_id"]
        assert shaping["qdiscs"][0]["params"]["rate_bps"] == "12500000"
        table = mecbench("shape", "list", "--node", address, "--all")
        assert table.returncode == 0 and replaced["shaping_id"] in table.stdout

        cleared = mecbench("shape", "clear", *where)
        assert cleared.returncode == 0 and cleared.stdout.strip() == f"cleared {replaced['shaping_id']}"
        assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
        again = mecbench("shape", "clear", *where)
        assert again.returncode == 0 and again.stdout.strip() == "nothing to clear"

        by_lease = json_of(mecbench("shape", "apply", *where, "--rate", "5mbit", "--json"))
        assert isinstance(by_lease, dict)
        lease = by_lease["lease"]["lease_id"]
        assert mecbench("shape", "clear", "--node", address, "--lease-id", lease).returncode == 0
        assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
        assert mecbench("shape", "clear", "--node", address, "--lease-id", lease).returncode == 4

        bad = mecbench("shape", "apply", *where, "--rate", "fast", "--loss", "200", "--profile", "moon")
        assert bad.returncode == 2
        for flag in ("--rate", "--loss", "--profile"):
            assert f"  {flag}: " in bad.stderr
        assert mecbench("shape", "apply", *where).returncode == 2  # nothing to apply
        assert qdisc_kinds(veth_pair.left, veth_pair.left_if) == ["noqueue"]
    finally:
        agent.terminate()
        agent.wait(timeout=15)


def test_shape_against_no_node_agent_exits_three() -> None:
    done = mecbench("shape", "list", "--node", f"127.0.0.1:{closed_port()}")
    assert done.returncode == 3 and "UNAVAILABLE" in done.stderr


# --- errors and help ----------------------------------------------------------------------------


def test_unknown_ids_exit_four(stack: Stack) -> None:
    at = ("--controller", stack.server.address)
    for args in (("runs", "show", "run-000000000000"), ("runs", "watch", "run-000000000000"),
                 ("runs", "cancel", "run-000000000000"), ("results", "show", "run-000000000000"),
                 ("experiments", "show", "nope")):
        done = mecbench(*args, *at)
        assert done.returncode == 4, (args, done.stderr)
        assert "NOT_FOUND" in done.stderr


def test_an_unreachable_controller_exits_three_with_a_hint() -> None:
    done = mecbench("runs", "list", "--controller", f"127.0.0.1:{closed_port()}")
    assert done.returncode == 3
    assert "UNAVAILABLE" in done.stderr and "mecbench up" in done.stderr


def test_bad_files_exit_two(stack: Stack, tmp_path: Path) -> None:
    at = ("--controller", stack.server.address)
    missing = mecbench("run", str(tmp_path / "missing.yaml"), *at)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment_id: x\nsweep: [unclosed\n")
    done = mecbench("run", str(broken), *at)
    assert done.returncode == 2 and "INVALID_ARGUMENT" in done.stderr


def test_help_lists_the_exit_codes() -> None:
    done = mecbench("--help")
    assert done.returncode == 0
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130 "):
        assert f"\n  {code}" in done.stdout
    for command in ("up", "down", "run", "runs", "results", "plot", "report", "nodes", "shape", "storage"):
        assert f"\n    {command} " in done.stdout
    assert mecbench("runs", "--help").returncode == 0
    assert mecbench("frobnicate").returncode == 2


@pytest.fixture(autouse=True)
def _no_stack_left(isolated_state_dir: Path) -> Iterator[None]:
    """A test that fails half-way must not leave a background controller running."""
    yield
    state = isolated_state_dir / "stack.json"
    if state.exists():
        pid = json.loads(state.read_text()).get("pid", 0)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        state.unlink()
