"""The cluster the Kubernetes backend's tests run against.

By default: the in-memory fake API (tests/kubernetes/fake_api.py), with two CPU nodes and one
tainted GPU node. With `MECBENCH_K8S_TEST_KUBECONFIG=<path>` the same tests run against that
real cluster (kind, k3s; docs/kubernetes.md): each test gets a fresh namespace, deleted after it,
and the tests that need the fake's internals (its GPU node, compaction, its validation) skip.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.backends.kubernetes import (
    ClusterApi,
    ClusterApiError,
    KubernetesApi,
    KubernetesBackend,
    KubernetesConfig,
)
from mecbench.v1 import common_pb2, sut_agent_pb2
from tests.kubernetes.fake_api import (
    IMAGE_CRASHES,
    IMAGE_CREATE_ERROR,
    IMAGE_CREATE_ERROR_ONCE,
    IMAGE_DIES,
    IMAGE_HANGS,
    IMAGE_RUNS,
    IMAGE_SERVES,
    FakeCluster,
    FakeNode,
)

KUBECONFIG_ENV = "MECBENCH_K8S_TEST_KUBECONFIG"
IMAGE_ENV = "MECBENCH_K8S_TEST_IMAGE"
REAL_CLUSTER = bool(os.environ.get(KUBECONFIG_ENV))

# The MECBench image (built from the Dockerfile and loaded into the cluster's nodes); a plain
# image without `mecbench` in it; one that does not exist. The fake also knows a MECBench image
# whose agent never answers its health check and one whose agent exits.
IMAGE = os.environ.get(IMAGE_ENV, "ghcr.io/mecbench/mecbench:0.1.0")
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
MISSING_IMAGE = "ghcr.io/mecbench/no-such-image:0.0.0-missing"
HANGING_IMAGE = "ghcr.io/mecbench/hangs:0.0.0-test"
CRASHING_IMAGE = "ghcr.io/mecbench/crashes:0.0.0-test"
FLAKY_CREATE_IMAGE = "ghcr.io/mecbench/create-error-once:0.0.0-test"
BROKEN_CREATE_IMAGE = "ghcr.io/mecbench/create-error:0.0.0-test"
DYING_IMAGE = "ghcr.io/mecbench/dies:0.0.0-test"

def cluster_config(*workers: str, cores: tuple[float, ...] = (), image: str = "", runtime: str = "ray",
                   gpus: tuple[int, ...] = ()) -> sut_agent_pb2.SutConfig:
    """A cluster SUT: a head serving an external server from a launch profile, and `workers`
    (their CPU cores and GPUs by position; alike when not given)."""
    members = [
        sut_agent_pb2.SutMember(
            name=name,
            resources=common_pb2.ResourceLimits(cpu_cores=cores[i] if i < len(cores) else 0.5,
                                                memory_bytes=2**30),
            gpus=common_pb2.GpuRequest(count=gpus[i] if i < len(gpus) else 0),
        )
        for i, name in enumerate(workers)
    ]
    return sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(profile="vllm-ray"), image=image,
        resources=common_pb2.ResourceLimits(cpu_cores=1, memory_bytes=2**30),
        cluster=sut_agent_pb2.SutCluster(runtime=runtime, workers=members),
    )


fake_only = pytest.mark.skipif(REAL_CLUSTER, reason=f"uses the fake API's internals ({KUBECONFIG_ENV} is set)")
real_only = pytest.mark.skipif(
    not REAL_CLUSTER, reason=f"needs a real cluster: set {KUBECONFIG_ENV} (docs/kubernetes.md)"
)


@dataclass
class Cluster:
    api: ClusterApi
    namespace: str
    real: bool
    fake: FakeCluster | None
    # How long a pod may take to be ready here: the fake is instant, a real pod pulls and starts.
    ready_timeout_s: float
    backends: list[KubernetesBackend] = field(default_factory=list)

    def backend(self, **overrides: Any) -> KubernetesBackend:
        settings: dict[str, Any] = {
            "namespace": self.namespace,
            "image": IMAGE,
            # The fake has no such Secret; the LoadGen pod refers to it as optional either way.
            "store_secret": "mecbench-store",
            "ready_timeout_s": self.ready_timeout_s,
            "delete_timeout_s": 60.0 if self.real else 5.0,
            "controller": "test",
            "service_account": "default",
            # An autoscaler's word, or a container error's clearing, is waited for this long.
            "unschedulable_grace_s": 5.0 if self.real else 0.3,
            "container_error_grace_s": 10.0 if self.real else 0.3,
            "recheck_interval_s": 1.0 if self.real else 0.05,
        }
        settings.update(overrides)
        backend = KubernetesBackend(self.api, KubernetesConfig(**settings), maintain=False)
        self.backends.append(backend)
        return backend

    def node_names(self) -> list[str]:
        """Nodes an ordinary pod can land on (no NoSchedule taint: not the GPU pool)."""
        return sorted(
            node["metadata"]["name"] for node in self.api.list("Node", "").items
            if not any(t.get("effect") in ("NoSchedule", "NoExecute") for t in (node.get("spec") or {}).get("taints") or [])
        )

    def names(self, kind: str, selector: str = "") -> set[str]:
        """Objects present and not being deleted."""
        return {
            obj["metadata"]["name"] for obj in self.api.list(kind, self.namespace, label_selector=selector).items
            if not obj["metadata"].get("deletionTimestamp")
        }

    def eventually(self, check: Callable[[], bool], timeout: float | None = None, what: str = "") -> None:
        """For what the cluster does on its own time (garbage collection): the test has nothing
        to watch but the outcome."""
        deadline = time.monotonic() + (timeout or (120.0 if self.real else 5.0))
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or check}")
            time.sleep(0.05 if not self.real else 1.0)


def _fake_cluster(namespace: str) -> FakeCluster:
    return FakeCluster(
        nodes=[
            FakeNode("node-a", cpu=4, memory=16 * 2**30),
            FakeNode("node-b", cpu=4, memory=16 * 2**30),
            FakeNode("gpu-1", cpu=16, memory=64 * 2**30, gpus=1, labels={"nvidia.com/gpu.present": "true"},
                     taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]),
        ],
        images={IMAGE: IMAGE_SERVES, PAUSE_IMAGE: IMAGE_RUNS, HANGING_IMAGE: IMAGE_HANGS,
                CRASHING_IMAGE: IMAGE_CRASHES, FLAKY_CREATE_IMAGE: IMAGE_CREATE_ERROR_ONCE,
                BROKEN_CREATE_IMAGE: IMAGE_CREATE_ERROR, DYING_IMAGE: IMAGE_DIES},
        namespaces=("default", namespace),
    )


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    namespace = f"mecbench-test-{uuid.uuid4().hex[:6]}"
    kubeconfig = os.environ.get(KUBECONFIG_ENV, "")
    if kubeconfig:
        api: ClusterApi = KubernetesApi.connect(kubeconfig)
        api.create("Namespace", "", {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {"app.kubernetes.io/part-of": "mecbench-tests"}},
        })
        under_test = Cluster(api, namespace, real=True, fake=None, ready_timeout_s=180.0)
    else:
        fake = _fake_cluster(namespace)
        under_test = Cluster(fake, namespace, real=False, fake=fake, ready_timeout_s=5.0)
    try:
        yield under_test
    finally:
        for backend in under_test.backends:
            backend.close()
        if under_test.fake is not None:
            under_test.fake.close()
        else:
            try:
                under_test.api.delete("Namespace", "", namespace)
            except ClusterApiError as exc:
                if exc.status != 404:
                    raise
