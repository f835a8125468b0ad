"""A controller killed with SIGKILL mid shaped run leaves nothing behind: no qdisc past its lease,
no namespace, no agent process; and a new controller starts cleanly on the same machine, over
whatever a dead one left."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns

from controller.backends.topology import NetnsTopology
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.conftest import requires_root, start_service_process
from tests.controller.conftest import short_settings, synthetic_sut
from tests.numbers import report

pytestmark = [requires_root, pytest.mark.slow]

NAME, SLOT, LEASE_S = "mbkill", 45, 2.0


def _env(data_dir: Path) -> dict[str, str]:
    return {
        "MECBENCH_CONTROLLER_DATA_DIR": str(data_dir), "MECBENCH_CONTROLLER_TOPOLOGY": "netns",
        "MECBENCH_CONTROLLER_TOPOLOGY_NAME": NAME, "MECBENCH_CONTROLLER_TOPOLOGY_SLOT": str(SLOT),
        "MECBENCH_CONTROLLER_TOPOLOGY_CLIENTS": "1", "MECBENCH_CONTROLLER_SHAPING_LEASE_S": str(LEASE_S),
        "MECBENCH_CONTROLLER_TELEMETRY_INTERVAL_S": "0",
    }


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _edge_qdiscs(topology: NetnsTopology) -> list[str]:
    """The qdisc kinds on the edge's data link, [] once the namespace is gone."""
    if topology.edge.netns not in netns.listnetns():
        return []
    try:
        # flags=0: open it only if it is there (pyroute2 creates a missing namespace by default, and a
        # look made just as the reaper removed it would put an empty one back).
        with NetNS(topology.edge.netns, flags=0) as ns:
            links = ns.link_lookup(ifname=topology.edge_data_interface(0))
            if not links:
                return []
            return [q.get_attr("TCA_KIND") for q in ns.get_qdiscs(index=links[0])]
    except OSError:
        return []


def test_kill_9_mid_shaped_run_leaves_nothing_and_a_new_controller_rebuilds_over_leftovers(tmp_path: Path) -> None:
    topology = NetnsTopology(NAME, SLOT, 1)
    process, address = start_service_process("controller", _env(tmp_path / "first"))
    try:
        with open_channel(address) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            stub.InitStorage(controller_pb2.InitStorageRequest())
            spec = controller_pb2.RunSpec(
                experiment_id="crash", sut=synthetic_sut(0.001),
                network=common_pb2.NetworkProfile(name="10mbit", netem=common_pb2.NetemConfig(rate_bps=10_000_000)),
                settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_duration=durations.from_seconds(30)),
            )
            run_id = stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run.run_id
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                run = stub.GetRun(controller_pb2.GetRunRequest(run_id=run_id)).run
                if run.state == common_pb2.RUN_STATE_RUNNING and run.progress.samples_completed > 0:
                    break
                time.sleep(0.1)
            assert run.state == common_pb2.RUN_STATE_RUNNING, run.error
        assert "tbf" in _edge_qdiscs(topology)
        children = _descendants(process.pid)
        assert children
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        process.wait(10)
        while time.monotonic() - killed < LEASE_S + 1.0 and (_edge_qdiscs(topology) or topology.leftovers()):
            time.sleep(0.05)
        gone_after = time.monotonic() - killed
        assert _edge_qdiscs(topology) == [] and topology.leftovers() == [], topology.leftovers()
        while time.monotonic() - killed < LEASE_S + 10 and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "agent processes outlived the controller"
        report("controller SIGKILL", f"shaping and namespaces gone {gone_after:.2f} s after the kill "
                                     f"(lease {LEASE_S:g} s); {len(children)} child processes ended")
    finally:
        if process.poll() is None:
            process.kill()
    # A new controller on the same machine, same topology, over what a controller that died before
    # its reaper ran would leave (a namespace of its name that nobody holds): it rebuilds the
    # topology and a run succeeds; an orderly stop then leaves nothing.
    netns.create(topology.edge.netns)
    try:
        restarted, address = start_service_process("controller", _env(tmp_path / "second"))
        try:
            assert topology.edge.netns in netns.listnetns()
            _run_to_success(address)
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(30)
        assert topology.leftovers() == []
    finally:
        topology.destroy()  # only what a failure above left


def _run_to_success(address: str) -> None:
    with open_channel(address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        stub.InitStorage(controller_pb2.InitStorageRequest())
        spec = controller_pb2.RunSpec(
            experiment_id="rebuilt", sut=synthetic_sut(0.001), settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM),
        )
        run_id = stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run.run_id
        for _ in range(600):
            run = stub.GetRun(controller_pb2.GetRunRequest(run_id=run_id)).run
            if run.state in (common_pb2.RUN_STATE_SUCCEEDED, common_pb2.RUN_STATE_FAILED, common_pb2.RUN_STATE_CANCELLED):
                break
            time.sleep(0.1)
        assert run.state == common_pb2.RUN_STATE_SUCCEEDED, run.error
