"""The `mecbench` command as a user runs it: a subprocess against a real controller (or its own
embedded one), checked by its output and exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from tests.cli.conftest import mecbench, spec_file
from tests.conftest import requires_root
from tests.controller.conftest import Stack

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quick-sweep.yaml"


def test_storage_init_reports_each_bucket(stack: Stack) -> None:
    done = mecbench("storage", "init", "--controller", stack.server.address)
    assert done.returncode == 0, done.stderr
    assert "mecbench-results" in done.stdout and "mecbench-blobs" in done.stdout


def test_blob_and_dataset_upload_then_list(stack: Stack, tmp_path: Path) -> None:
    conf = tmp_path / "user.conf"
    conf.write_text("*.Server.target_qps = 100\n")
    done = mecbench("blob", "upload", str(conf), "--key", "configs/user.conf", "--controller", stack.server.address)
    assert done.returncode == 0, done.stderr
    assert "configs/user.conf" in done.stdout
    again = mecbench("blob", "upload", str(conf), "--key", "configs/user.conf", "--controller", stack.server.address)
    assert again.returncode == 2 and "ALREADY_EXISTS" in again.stderr

    samples = tmp_path / "samples.bin"
    samples.write_bytes(os.urandom(4096))
    uploaded = mecbench("dataset", "upload", str(samples), "--json", "--controller", stack.server.address)
    assert uploaded.returncode == 0, uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["sha256"] == hashlib.sha256(samples.read_bytes()).hexdigest()
    assert dataset["uri"].endswith("datasets/samples.bin")

    listed = mecbench("blob", "list", "--json", "--controller", stack.server.address)
    assert listed.returncode == 0, listed.stderr
    keys = {blob["key"] for blob in json.loads(listed.stdout)}
    assert {"configs/user.conf", "datasets/samples.bin"} <= keys

    missing = mecbench("blob", "upload", str(tmp_path / "nope"), "--controller", stack.server.address)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_run_wait_prints_every_point_and_exits_zero(stack: Stack, tmp_path: Path) -> None:
    done = mecbench("run", str(spec_file(tmp_path, "cli-ok")), "--wait", "--controller", stack.server.address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ss-c1-unshaped" in done.stdout and "ss-c2-unshaped" in done.stdout
    assert "experiment cli-ok: SUCCEEDED" in done.stdout
    assert "harness floor (zero-time SUT, 1 client, unshaped): SingleStream p50" in done.stdout
    assert "INVALID" not in done.stdout


def test_run_wait_exits_one_when_a_result_is_invalid(stack: Stack, tmp_path: Path) -> None:
    # Too few queries for LoadGen's early stopping to judge a Server p99: LoadGen says INVALID.
    spec = spec_file(tmp_path, "cli-invalid", "SCENARIO_SERVER", queries=20)
    done = mecbench("run", str(spec), "--wait", "--controller", stack.server.address)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "INVALID results: server-c1-unshaped-q200 #1" in done.stderr


def test_a_bad_spec_exits_two_naming_every_field(stack: Stack, tmp_path: Path) -> None:
    spec = spec_file(tmp_path, "cli-bad")
    spec.write_text(spec.read_text().replace("clients: [1, 2]", "clients: [0, 2]").replace("repeats: 1", "repeats: 500"))
    done = mecbench("run", str(spec), "--wait", "--controller", stack.server.address)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "INVALID_ARGUMENT" in done.stderr
    assert "spec.sweep.clients[0]" in done.stderr and "spec.sweep.repeats" in done.stderr
    assert stack.app.experiments.list() == [] or all(
        e.experiment_id != "cli-bad" for e in stack.app.experiments.list()
    )


def test_an_unreachable_controller_exits_three(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = mecbench("run", str(spec_file(tmp_path, "cli-nowhere")), "--controller", f"127.0.0.1:{port}")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "UNAVAILABLE" in done.stderr


def test_run_without_a_controller_uses_an_embedded_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    done = mecbench("run", str(spec_file(tmp_path, "cli-embedded")), "--json", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["experiment"]["state"] == "RUN_STATE_SUCCEEDED"
    assert len(report["runs"]) == 2
    summaries = list(data_dir.rglob("mlperf_log_summary.txt"))
    assert len(summaries) == 2 + 3  # the two calibration tests, then one client and two
    assert report["experiment"]["calibration"]["offline_samples_per_second"] > 0
    assert list(data_dir.rglob("manifest.json"))


@requires_root
def test_the_example_runs_end_to_end_with_its_profiles_applied(tmp_path: Path) -> None:
    """examples/quick-sweep.yaml (2 scenarios x clients 1, 2, 4 x 2 profiles x 2 repeats) from the
    CLI, in the netns topology where its 5 Mbit/s profile is shaped for real."""
    data_dir = tmp_path / "data"
    env_topology = {"MECBENCH_CONTROLLER_TOPOLOGY": "netns", "MECBENCH_CONTROLLER_TOPOLOGY_NAME": "mbex"}
    done = mecbench("run", str(EXAMPLE), "--json", "--data-dir", str(data_dir), env=env_topology, timeout=400)
    problems = _what_went_wrong(done.stdout)
    # Exit 1 also means "a result is INVALID": LoadGen's verdict on a 2-core VM with four shaped
    # clients may be INVALID now and then (early stopping). Every run must succeed; nearly every
    # result must be VALID, and those that are not are reported with LoadGen's reasons.
    assert done.returncode in (0, 1), problems or done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    runs = report["runs"]
    assert len(runs) == 12 and all(run["state"] == "RUN_STATE_SUCCEEDED" for run in runs), problems
    assert all(len(run["results"]) == 2 for run in runs)
    valid = sum(1 for run in runs for r in run["results"] if r["aggregate"].get("valid"))
    if problems:
        from tests.numbers import report as report_figure

        report_figure("example sweep", f"{valid} of 24 results VALID; the others: {problems}")
    assert valid >= 20, problems
    for run in runs:
        # Several clients: percentiles merged from every client's samples.
        assert all(int(r["aggregate"]["sample_count"]) > 0 and "p99" in r["aggregate"]["latency"] for r in run["results"])
    shaped = [run for run in runs if run["spec"].get("network", {}).get("name") == "edge-5mbit"]
    assert len(shaped) == 6
    assert len(list(data_dir.rglob("result.json"))) == 2 + 24  # calibration, then every repeat
    manifest = json.loads(next(data_dir.rglob("quick-sweep/manifest.json")).read_text())
    assert manifest["state"] == "RUN_STATE_SUCCEEDED" and len(manifest["runs"]) == 12


def test_results_table_shows_token_latencies_and_accuracy_only_when_present() -> None:
    from mecbench.cli import format_results_table
    from mecbench.core import durations
    from mecbench.v1 import common_pb2, controller_pb2

    plain = controller_pb2.Run(state=common_pb2.RUN_STATE_SUCCEEDED)
    plain.results.add(repeat=1).aggregate.samples_per_second = 10.0
    assert "TTFT" not in format_results_table([("plain", plain)])
    assert "accuracy" not in format_results_table([("plain", plain)])

    llm = controller_pb2.Run(state=common_pb2.RUN_STATE_SUCCEEDED)
    result = llm.results.add(repeat=1).aggregate
    result.ttft.p50.CopyFrom(durations.from_seconds(0.0125))
    result.tpot.p50.CopyFrom(durations.from_seconds(0.002))
    result.tokens_per_second = 480.0
    result.accuracy["top1"] = 0.8125
    result.accuracy_scorer = "top1"
    table = format_results_table([("plain", plain), ("llm", llm)])
    header, first, second, *reasons = table.splitlines()
    # Every INVALID verdict is followed by LoadGen's reason (none given in these hand-made results).
    assert reasons == ["plain: INVALID: LoadGen gave no reason", "llm: INVALID: LoadGen gave no reason"]
    assert "TTFT p50 ms" in header and "accuracy" in header
    assert "12.500" in second and "2.000" in second and "480.0" in second and "top1 0.8125" in second
    assert first.rstrip().endswith("-")


def _what_went_wrong(stdout: str) -> str:
    """Each run that failed or has an INVALID result, and why, from `mecbench run --json`."""
    try:
        runs = json.loads(stdout)["runs"]
    except (ValueError, KeyError):
        return ""
    lines = []
    for run in runs:
        reasons = [reason for result in run.get("results", [])
                   for reason in result.get("aggregate", {}).get("invalidReasons", [])]
        if run.get("state") != "RUN_STATE_SUCCEEDED" or reasons:
            lines.append(f"{run.get('spec', {}).get('selector')}: {run.get('state')} {run.get('error', '')} {reasons}")
    return "\n".join(lines)
