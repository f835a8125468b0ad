"""Assembles the controller from its parts: registry, store, deployment backend, agents, runs."""

from __future__ import annotations

from controller.agent_clients import AgentConnector
from controller.agents import AgentPool
from controller.backends.base import DeploymentBackend
from controller.backends.local import LocalProcessBackend
from controller.backends.topology import NetnsTopology
from controller.experiments import ExperimentManager
from controller.registry import RunRegistry
from controller.runs import RunManager
from controller.settings import ControllerSettings
from mecbench.core.errors import InvalidArgument
from mecbench.core.logging import get_logger
from store.base import ObjectStore
from store.local import LocalDirStore
from store.settings import StoreSettings, open_store
from store.spool import UploadSpool

log = get_logger("mecbench.controller")


def open_backend(settings: ControllerSettings) -> DeploymentBackend:
    if settings.topology not in ("loopback", "netns"):
        raise InvalidArgument(f"unknown topology {settings.topology!r} (known: loopback, netns)", field="topology")
    if settings.backend == "local":
        topology = None
        if settings.topology == "netns":
            topology = NetnsTopology(settings.topology_name, settings.topology_slot, settings.topology_clients,
                                     settings.topology_sut_nodes)
        return LocalProcessBackend(
            settings.data_dir / "logs",
            host=settings.agent_host,
            start_timeout=settings.agent_start_timeout_s,
            topology=topology,
        )
    if settings.backend == "kubernetes":
        # Imported here: the local backend never loads the Kubernetes client.
        from controller.backends.kubernetes import open_kubernetes_backend

        return open_kubernetes_backend(
            settings.k8s_namespace,
            settings.k8s_image,
            kubeconfig=settings.k8s_kubeconfig,
            image_pull_policy=settings.k8s_image_pull_policy,
            service_account=settings.k8s_service_account,
            node_agent_selector=settings.k8s_node_agent_selector,
            ready_timeout_s=settings.k8s_ready_timeout_s,
            ttl_s=settings.k8s_ttl_s,
            gpu_runtime_class=settings.k8s_gpu_runtime_class,
            store_secret=settings.k8s_store_secret,
            log_dir=settings.data_dir / "logs",
        )
    raise InvalidArgument(f"unknown backend {settings.backend!r} (known: local, kubernetes)", field="backend")


class ControllerApp:
    def __init__(
        self, settings: ControllerSettings, store: ObjectStore | None = None, backend: DeploymentBackend | None = None,
        connector: AgentConnector | None = None,
    ) -> None:
        """`backend` replaces the one the settings name and `connector` the agents' gRPC clients
        (tests run the state machine on in-memory fakes)."""
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store_settings = StoreSettings.load()
        if store is None:
            store = open_store(self.store_settings, settings.data_dir / "store")
            if isinstance(store, LocalDirStore):
                # The embedded default needs no set-up step: its buckets are folders.
                store.init_buckets()
        self.store = store
        self.registry = RunRegistry(settings.data_dir / "registry.sqlite3")
        # The node agent this controller starts keeps its leases beside the controller's data, so a
        # restarted controller's node agent reconciles what the previous one left.
        self.pool = AgentPool(
            backend or open_backend(settings),
            {"MECBENCH_NODE_AGENT_STATE_DIR": str(settings.data_dir.resolve() / "node-agent")},
            connector,
        )
        self.spool = UploadSpool(
            store, settings.data_dir / "spool", attempts=self.store_settings.upload_attempts,
            backoff_s=self.store_settings.upload_backoff_s, flush_interval_s=self.store_settings.spool_flush_interval_s,
            on_drained=lambda run_id: self.runs.results_uploaded(run_id),  # noqa: PLW0108 - runs is made below
        )
        self.runs = RunManager(self.registry, self.pool, self.store, settings, self.spool)
        self.spool.start()
        self.experiments = ExperimentManager(self.runs)

    def close(self) -> None:
        self.runs.close()
        self.pool.close()
        self.spool.close()
        self.registry.close()
        self.store.close()
        log.info("controller_closed")
