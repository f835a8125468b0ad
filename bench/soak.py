"""Many short runs back to back through one controller: does anything pile up?

    .venv/bin/python -m bench.soak [--runs 1000]

Runs a short SingleStream test against a zero-time synthetic SUT `--runs` times through the
controller's API, and compares the process's open files, threads, child processes and memory
after a warm-up with the same after the last run. Every run must end SUCCEEDED and be listed.
The CI test (tests/reliability/test_soak.py) runs the same function with 100 runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2

WARM_UP_RUNS = 5


@dataclass(frozen=True)
class Resources:
    open_files: int
    threads: int
    children: int
    rss_mib: float

    def __str__(self) -> str:
        return (f"open files {self.open_files}, threads {self.threads}, child processes {self.children}, "
                f"RSS {self.rss_mib:.1f} MiB")


def _parents() -> dict[int, int]:
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    found[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return found


def resources() -> Resources:
    """This process's own counts, from /proc (what a leak would grow): every OS thread (gRPC's
    C threads included) and every descendant process (agents and their LoadGen sessions)."""
    parents = _parents()
    descendants, frontier = 0, {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        descendants += len(frontier)
    rss_kib = threads = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return Resources(len(os.listdir("/proc/self/fd")), threads, descendants, rss_kib / 1024)


@dataclass(frozen=True)
class SoakResult:
    runs: int
    succeeded: int
    listed: int
    before: Resources
    after: Resources


def soak(runs: int, data_dir: Path) -> SoakResult:
    settings = ControllerSettings.load(data_dir=data_dir, telemetry_interval_s=0.0)
    app = ControllerApp(settings)
    server, port = create_server("127.0.0.1:0", settings, app=app)
    channel = open_channel(f"127.0.0.1:{port}")
    stub = controller_pb2_grpc.ControllerStub(channel)
    try:
        stub.InitStorage(controller_pb2.InitStorageRequest())
        stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="soak", config=sut_agent_pb2.SutConfig(
            synthetic=sut_agent_pb2.SyntheticBackendConfig(
                distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT))))
        spec = controller_pb2.RunSpec(
            experiment_id="soak", sut_id="soak",
            settings=common_pb2.LoadGenSettings(
                scenario=common_pb2.SCENARIO_SINGLE_STREAM, min_duration=durations.from_seconds(0.1),
                min_query_count=20, single_stream_expected_latency=durations.from_seconds(0.001),
            ),
        )
        succeeded = 0
        before = resources()
        for index in range(WARM_UP_RUNS + runs):
            if index == WARM_UP_RUNS:
                before = resources()  # sessions, pools and caches exist by now
            run = stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
            final = app.runs.wait(run.run_id, 60)
            if index >= WARM_UP_RUNS and final.state == common_pb2.RUN_STATE_SUCCEEDED:
                succeeded += 1
        after = resources()
        listed = len(stub.ListRuns(controller_pb2.ListRunsRequest(experiment_id="soak", page_size=1000)).runs)
        return SoakResult(runs, succeeded, listed - WARM_UP_RUNS, before, after)
    finally:
        channel.close()
        server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as data_dir:
        result = soak(runs, Path(data_dir))
    print(f"soak: {result.runs} runs, {result.succeeded} succeeded, {result.listed} listed")
    print(f"  before: {result.before}")
    print(f"  after:  {result.after}")


if __name__ == "__main__":
    main()
