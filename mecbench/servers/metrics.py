"""An inference server's own Prometheus metrics (vLLM's queue and TTFT histograms, SGLang's,
TGI's, llama.cpp's, the model server's), scraped by the SUT agent: counters (and histogram and
summary `_count`/`_sum`/`_bucket` series) as their increase since the last reset, gauges as read."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from mecbench.servers.base import ServerError
from mecbench.servers.http import HttpClient

# A server with thousands of series (per-LoRA, per-bucket) is cut here, by name order.
MAX_SERIES = 2000
_CUMULATIVE_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created")


def parse_prometheus(text: str) -> dict[str, tuple[float, bool]]:
    """`name{label="v",...}` -> (value, cumulative) for every sample of a Prometheus text page."""
    found: dict[str, tuple[float, bool]] = {}
    for family in text_string_to_metric_families(text):
        cumulative_family = family.type in ("counter", "histogram", "summary")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # a timestamp, not a measurement
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            cumulative = cumulative_family or sample.name.endswith(_CUMULATIVE_SUFFIXES)
            found[key] = (float(sample.value), cumulative)
    return found


class ServerMetrics:
    """Scrapes one server's metrics page; `read(reset)` gives counters as increases since the
    last reset (or since the first read) and gauges as they are."""

    def __init__(self, http: HttpClient, path: str, timeout_s: float = 2.0) -> None:
        self._http = http
        self._path = path
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._baseline: dict[str, float] | None = None
        self.error = ""

    def _scrape(self) -> dict[str, tuple[float, bool]]:
        response = self._http.request("GET", self._path, timeout_s=self._timeout_s)
        if response.status != 200:
            raise ServerError(f"GET {self._path}: HTTP {response.status}")
        try:
            return parse_prometheus(response.data.decode("utf-8", "replace"))
        except ValueError as exc:
            raise ServerError(f"GET {self._path}: not Prometheus text: {exc}") from None

    def read(self, reset: bool = False) -> dict[str, float]:
        """The metrics now; {} when the server has none (the reason in `error`)."""
        try:
            current = self._scrape()
        except ServerError as exc:
            self.error = str(exc)
            return {}
        self.error = ""
        with self._lock:
            baseline = self._baseline if self._baseline is not None else {}
            values = {
                key: value - baseline.get(key, 0.0) if cumulative else value
                for key, (value, cumulative) in sorted(current.items())[:MAX_SERIES]
            }
            if reset or self._baseline is None:
                self._baseline = {key: value for key, (value, cumulative) in current.items() if cumulative}
        return values
