"""On a cluster backend the kubelet confines the SUT's pod; the controller records what the pod got
as read back by the node agent of its node. No cluster here: the backend is the local one saying
its SUT agent is a pod (the pod reference a cluster backend gives through sut_shaping_points, as
the Kubernetes backend does), and the pod's cgroups are laid out by the test as the kubelet does
(tests/node_agent/test_pod_placement.py), with a real process in them."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.agents import AgentPool
from controller.backends.base import AgentHandle, PodRef, ShapingPoint
from controller.backends.local import LocalProcessBackend
from mecbench.core import durations
from mecbench.v1 import common_pb2, sut_agent_pb2
from tests.conftest import requires_root
from tests.node_agent.test_pod_placement import FakePod, fake_pod  # noqa: F401 - the pod fixture


class PodsBackend(LocalProcessBackend):
    """Local processes that the controller is told are pods: nothing is placed by PID."""

    places_processes = False

    def __init__(self, log_dir: Path, pod: FakePod) -> None:
        super().__init__(log_dir)
        self.pod = pod

    def sut_shaping_points(self, side: str, client: int, sut: AgentHandle) -> list[ShapingPoint]:
        return [ShapingPoint("eth0", "", pod=PodRef("mecbench", "sut-pod", self.pod.uid))]


@requires_root
def test_a_pods_placement_is_read_back_for_the_result(fake_pod: FakePod, tmp_path: Path) -> None:  # noqa: F811
    pool = AgentPool(PodsBackend(tmp_path / "logs", fake_pod), {"MECBENCH_NODE_AGENT_STATE_DIR": str(tmp_path / "na")})
    try:
        config = sut_agent_pb2.SutConfig(
            synthetic=sut_agent_pb2.SyntheticBackendConfig(mean=durations.from_seconds(0.001)),
            resources=common_pb2.ResourceLimits(cpu_cores=1.5, memory_bytes=256 * 2**20),
        )
        handle = pool.deploy_sut("podded", config)
        assert handle.placement is None  # nothing placed by PID: the pod's limits are the kubelet's
        # No node agent in use yet: nothing is read (and none is waited for).
        assert pool.read_placement(handle) is None
        pool.node_infos()  # as a run's telemetry does
        placement = pool.read_placement(handle)
        assert placement is not None
        assert placement.resources.cpu_cores == 1.5
        applied = placement.applied
        assert applied.cgroups["cpu"] == str(fake_pod.pod_dirs["cpu"])
        assert applied.cpu_cores == pytest.approx(1.5) and applied.memory_limit_bytes == 256 * 2**20
        assert list(applied.pids) == [fake_pod.process.pid]

        unconfined = pool.deploy_sut("plain", sut_agent_pb2.SutConfig(synthetic=config.synthetic))
        assert pool.read_placement(unconfined) is None
    finally:
        pool.close()
