"""Controller settings: `MECBENCH_CONTROLLER_*` environment variables override the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mecbench.core.settings import from_env


@dataclass
class ControllerSettings:
    # Where the registry database, the store's local root and the spool live.
    data_dir: Path = field(default_factory=lambda: Path("mecbench-data"))
    # "local": agents are child processes on this machine. "kubernetes": pods (the k8s_* fields).
    backend: Literal["local", "kubernetes"] = "local"
    # Host the local backend binds agents on.
    agent_host: str = "127.0.0.1"
    agent_start_timeout_s: float = 30.0
    max_workers: int = field(default=32, metadata={"min": 1})
    # Runs executing at once; more wait in PENDING, up to max_pending_runs (then RESOURCE_EXHAUSTED).
    max_concurrent_runs: int = field(default=4, metadata={"min": 1})
    max_pending_runs: int = field(default=256, metadata={"min": 0})
    # Longest a single LoadGen test may take before the run fails (guards stuck SUTs).
    max_test_duration_s: float = 3600.0
    # A result file's LoadGen log chunks are kept in memory up to this size per file.
    max_log_bytes: int = 512 * 1024 * 1024
    # A blob upload (a dataset) is held in memory to check its digest before it is stored.
    max_blob_bytes: int = 2 * 1024 * 1024 * 1024
    # "loopback": every agent on 127.0.0.1. "netns" (root only): the SUT on an edge namespace and
    # each LoadGen client on a client namespace, joined by veth pairs that shaping applies to.
    topology: Literal["loopback", "netns"] = "loopback"
    topology_clients: int = field(default=4, metadata={"min": 1, "max": 62})
    # SUT nodes beside the edge in the netns topology, for the workers of cluster SUTs
    # (SutConfig.cluster): each joined to the edge by a link of its own. 0: none.
    topology_sut_nodes: int = field(default=0, metadata={"min": 0, "max": 62})
    # Which 10.231.<slot>/10.232.<slot> subnets the netns topology uses (one per controller).
    topology_slot: int = field(default=0, metadata={"min": 0, "max": 63})
    topology_name: str = "mb0"
    # Node telemetry sampled during each repeat; 0 turns it off.
    telemetry_interval_s: float = 0.5
    # A run starts only when the results spool (under data_dir) has this much disk free: with
    # the store away, every measured file waits there.
    spool_min_free_bytes: int = 256 * 1024 * 1024
    # Shaping lease: the node agent removes shaping this long after the controller stops renewing.
    shaping_lease_s: float = 15.0
    # backend = "kubernetes": agents are pods in this namespace (docs/kubernetes.md).
    k8s_namespace: str = "mecbench"
    k8s_image: str = "ghcr.io/mecbench/mecbench:0.1.0"
    k8s_image_pull_policy: str = "IfNotPresent"
    # "" = the in-cluster service account; else the path of a kubeconfig (its current context).
    k8s_kubeconfig: str = ""
    # The agents' pods run as this service account (it needs no API rights).
    k8s_service_account: str = "mecbench-agent"
    # How node agents (the DaemonSet's pods) are found.
    k8s_node_agent_selector: str = "app.kubernetes.io/name=mecbench,app.kubernetes.io/component=node-agent"
    # Longest an agent's pod may take to be Ready (pulling a server image, scheduling).
    k8s_ready_timeout_s: float = 300.0
    # Objects left behind by a controller that is gone are swept this long after it last renewed.
    k8s_ttl_s: float = 24 * 3600.0
    # RuntimeClass for pods asking for GPUs ("nvidia" where the GPU operator made one); "" = none.
    k8s_gpu_runtime_class: str = ""
    # Secret of MECBENCH_STORE_* variables LoadGen pods read s3:// datasets with.
    k8s_store_secret: str = "mecbench-store"
    # Prometheus /metrics on the gRPC server's host: -1 off, 0 any free port (logged as
    # metrics_listening), else that port.
    metrics_port: int = -1
    # Bearer tokens and their roles (controller/auth.py; docs/security.md); unset: no
    # authentication on the controller API.
    tokens_file: Path | None = None
    # Directories a request's local accuracy-labels path may lie under (comma separated); empty:
    # no local file is read (upload labels to the store and name them s3://). /proc, /sys and
    # /dev never.
    labels_roots: tuple[Path, ...] = ()
    # Hosts (name, address or host:port; "*" for any) the webhooks of runs and experiments may
    # call; empty: a request with a webhook_url is refused.
    webhook_hosts: tuple[str, ...] = ()

    @classmethod
    def load(cls, **overrides: object) -> ControllerSettings:
        return from_env(cls, "MECBENCH_CONTROLLER_", None, **overrides)
