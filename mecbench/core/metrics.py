"""Prometheus metrics of one service: its registry, the RPC metrics the interceptor records, and
the HTTP endpoint Prometheus scrapes.

Each server has its own `CollectorRegistry` rather than prometheus_client's global one: several
services run in one process (the tests, an embedding controller) and must neither collide on
metric names nor report each other's RPCs. Service state (runs, sessions, shaping) is read when
scraped, by collectors each service registers, so no code path that changes that state has to
remember to update a gauge.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from mecbench.core.logging import get_logger
from mecbench.core.tls import TlsSettings

log = get_logger("mecbench.metrics")

# From a health check on loopback (~100us) to a streaming RPC that lasts a whole test or run; the
# tail buckets keep long streams (RunTest, WatchRun, StreamInfer) apart from +Inf.
RPC_DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
)

RPC_LABELS = ("service", "method", "code")


def split_method(full_method: str) -> tuple[str, str]:
    """`/mecbench.v1.Controller/ListRuns` -> (`mecbench.v1.Controller`, `ListRuns`)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class RpcMetrics:
    """`mecbench_rpc_duration_seconds` and `mecbench_rpc_total`, by service, method and status code.
    A streaming RPC is observed once, for its whole duration, when it ends."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "mecbench_rpc_duration_seconds",
            "Time from the start of an RPC to its end (streams: the whole stream), by status code.",
            RPC_LABELS,
            buckets=RPC_DURATION_BUCKETS,
            registry=registry,
        )
        self.total = Counter("mecbench_rpc", "RPCs that ended, by status code.", RPC_LABELS, registry=registry)
        # The labelled children by (full method, code): `labels()` validates and takes the
        # metric's lock on every call, a cost the per-RPC path need not pay twice. Methods and
        # codes are finite (only registered handlers are wrapped), so this stays small.
        self._children: dict[tuple[str, str], tuple[Histogram, Counter]] = {}

    def observe(self, full_method: str, code: str, seconds: float) -> None:
        key = (full_method, code)
        children = self._children.get(key)
        if children is None:
            service, method = split_method(full_method)
            # Two threads may both get here; labels() returns the same child to both.
            children = (self.duration.labels(service, method, code), self.total.labels(service, method, code))
            self._children[key] = children
        children[0].observe(seconds)
        children[1].inc()


class GuardedCollector:
    """A service collector whose failure costs only its own metrics: unguarded, one exception
    turns the whole scrape into an HTTP 500, RPC metrics included."""

    def __init__(self, collector: Collector, name: str) -> None:
        self._collector = collector
        self._name = name

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collector.collect())
        except Exception:
            log.exception("metrics_collect_failed", collector=self._name)
            return []


class MetricsEndpoint:
    """`/metrics` over HTTP on `host:port` (port 0: any free port, `port` says which), served by
    daemon threads until `close()`. With `tls` holding a certificate it is HTTPS, and with its
    `client_auth` a scraper must show a certificate from its CA, as on the gRPC port."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, tls: TlsSettings | None = None) -> None:
        secure = tls is not None and tls.cert is not None and tls.key is not None
        try:
            if tls is not None and secure:
                httpd, thread = start_http_server(
                    port, host, registry, certfile=str(tls.cert), keyfile=str(tls.key),
                    client_cafile=str(tls.ca) if tls.client_auth and tls.ca else None,
                    client_auth_required=tls.client_auth,
                )
            else:
                httpd, thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise OSError(f"could not bind the metrics endpoint on {host}:{port}: {exc}") from exc
        self._httpd: WSGIServer = httpd
        self._thread: threading.Thread = thread
        self.host = host
        self.port: int = httpd.server_port
        self.scheme = "https" if secure else "http"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
