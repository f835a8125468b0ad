"""The SUT agent's own metrics, read from its backend manager and stats when Prometheus scrapes
(never from the data plane's per-sample path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mecbench.v1 import sut_agent_pb2
from sut_agent.lifecycle import BackendManager

BACKEND_STATES = [
    (value, name.removeprefix("BACKEND_STATE_"))
    for name, value in sut_agent_pb2.BackendState.items()
    if value != sut_agent_pb2.BACKEND_STATE_UNSPECIFIED
]


class SutAgentCollector:
    def __init__(self, manager: BackendManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        in_flight, completed, failed = self._manager.stats.totals()
        yield GaugeMetricFamily(
            "mecbench_sut_in_flight", "Samples submitted to the backend and not answered.", value=max(in_flight, 0)
        )
        yield CounterMetricFamily(
            "mecbench_sut_samples_completed", "Samples answered since the agent started.", value=completed
        )
        yield CounterMetricFamily(
            "mecbench_sut_samples_failed", "Samples failed since the agent started.", value=failed
        )
        yield GaugeMetricFamily(
            "mecbench_sut_open_streams",
            "Open StreamInfer streams and TCP data-plane connections.",
            value=self._manager.open_streams,
        )
        # What GetStatus reports: FAILED too when the server under a running backend died.
        status = self._manager.status()
        state = GaugeMetricFamily(
            "mecbench_sut_backend_state",
            "1 for the backend's current state, 0 for the others.",
            labels=["state"],
        )
        for value, name in BACKEND_STATES:
            state.add_metric([name], 1 if value == status.state else 0)
        yield state
        # Apart from the state, so that starting another backend does not start new state series.
        info = GaugeMetricFamily("mecbench_sut_backend", "1 for the backend loaded, if any.", labels=["backend"])
        if status.backend:
            info.add_metric([status.backend], 1)
        yield info
