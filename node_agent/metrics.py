"""The node agent's own metrics, read from its state database when Prometheus scrapes."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from node_agent.agent import NodeAgent
from node_agent.netns import namespace_from_record


class NodeAgentCollector:
    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        store = self._agent.store
        # Keyed, not one sample per record: two records on one interface and direction (a
        # replace in progress) must not make a duplicate series, which fails the whole scrape.
        active: Counter[tuple[str, str, str]] = Counter()
        for record in store.shapings():
            if record.state != "installed":
                continue
            netns = namespace_from_record(
                record.netns_kind, record.netns_ref, record.netns_path, record.netns_identity
            ).label
            for direction, on in (("egress", record.egress), ("ingress", record.ingress)):
                if on:
                    active[(record.interface, netns, direction)] += 1
        shaping = GaugeMetricFamily(
            "mecbench_shaping_active",
            'Shaping installed by this agent, per interface (netns "": the agent\'s own) and direction.',
            labels=["interface", "netns", "direction"],
        )
        for labels, count in sorted(active.items()):
            shaping.add_metric(list(labels), count)
        yield shaping
        now = time.time()
        leases = store.leases()
        yield GaugeMetricFamily(
            "mecbench_shaping_leases",
            "Live leases holding shaping (what they hold is removed when they lapse).",
            value=sum(1 for lease in leases if lease.kind == "shaping" and lease.live(now)),
        )
        yield GaugeMetricFamily(
            "mecbench_gpus_allocated", "GPUs allocated under a lease.", value=len(store.gpu_allocations())
        )
