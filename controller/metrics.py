"""The controller's own metrics, read from its registry and spool when Prometheus scrapes, so the
code that moves runs between states has nothing to keep in step."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from controller.app import ControllerApp
from mecbench.v1 import common_pb2

# Every state but UNSPECIFIED, so a state with no runs reads 0 instead of vanishing.
RUN_STATES = [
    (value, name.removeprefix("RUN_STATE_"))
    for name, value in common_pb2.RunState.items()
    if value != common_pb2.RUN_STATE_UNSPECIFIED
]


def _by_state(name: str, documentation: str, counts: dict[int, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for value, state in RUN_STATES:
        family.add_metric([state], counts.get(value, 0))
    return family


class ControllerCollector:
    def __init__(self, app: ControllerApp) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        registry = self._app.registry
        yield _by_state(
            "mecbench_runs", "Runs in the controller's registry, by state.", registry.count_by_state("runs")
        )
        yield _by_state(
            "mecbench_experiments",
            "Experiments in the controller's registry, by state.",
            registry.count_by_state("experiments"),
        )
        batches = self._app.spool.pending()
        yield GaugeMetricFamily(
            "mecbench_spool_pending_batches",
            "Result batches kept in the local spool because the store has not taken them yet.",
            value=len(batches),
        )
        yield GaugeMetricFamily(
            "mecbench_spool_pending_objects",
            "Result files in the local spool waiting for the store.",
            value=sum(batch.remaining for batch in batches),
        )
