"""Node telemetry recorded for the length of a repeat: a thread reads the node agent's
StreamTelemetry, keeps the samples for GetMetrics, and they are stored beside the results as
JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import threading

from google.protobuf import json_format

from controller.agent_clients import ReplyStream
from controller.agents import AgentPool
from mecbench.core import durations
from mecbench.core.errors import MecbenchError
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2

log = get_logger("mecbench.controller.telemetry")

CSV_COLUMNS = ["time", "node", "cpu_percent", "memory_used_bytes", "memory_total_bytes", "interface", "rx_bytes",
               "tx_bytes", "rx_packets", "tx_packets", "tx_dropped", "gpu", "gpu_utilization_percent",
               "gpu_memory_used_bytes", "gpu_power_watts"]


class TelemetryRecorder:
    """Context manager: samples flow while the block runs. A node agent that cannot be reached
    costs the run its telemetry, never its measurements."""

    def __init__(self, pool: AgentPool, interval_s: float, targets: list[node_agent_pb2.ShapingTarget]) -> None:
        self.pool = pool
        self.interval_s = interval_s
        self.targets = targets
        self.samples: list[common_pb2.TelemetrySample] = []
        self.error = ""
        self._stream: ReplyStream[node_agent_pb2.StreamTelemetryResponse] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> TelemetryRecorder:
        try:
            node = self.pool.node_agent().client
        except Exception as exc:  # noqa: BLE001 - telemetry is optional for a run
            self.error = f"node agent unavailable: {exc}"
            log.warning("telemetry_unavailable", error=self.error)
            return self
        request = node_agent_pb2.StreamTelemetryRequest(
            interval=durations.from_seconds(self.interval_s), interfaces=self.targets
        )
        self._stream = node.stream_telemetry(request)
        self._thread = threading.Thread(target=self._read, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._stream is not None
        try:
            for reply in self._stream:
                with self._lock:
                    self.samples.append(reply.sample)
        except MecbenchError as exc:
            self.error = f"telemetry stream ended: {exc.code.name}: {exc}"
            log.warning("telemetry_stream_failed", error=self.error)

    def __exit__(self, *exc_info: object) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def snapshot(self) -> list[common_pb2.TelemetrySample]:
        with self._lock:
            return list(self.samples)


def telemetry_json(samples: list[common_pb2.TelemetrySample]) -> bytes:
    return json.dumps([json_format.MessageToDict(s) for s in samples], indent=1).encode()


def telemetry_csv(samples: list[common_pb2.TelemetrySample]) -> bytes:
    """One row per sample and interface/GPU, so a spreadsheet can plot any column over time."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for sample in samples:
        base = [sample.time.ToJsonString(), sample.node, f"{sample.cpu_percent:.2f}", sample.memory_used_bytes,
                sample.memory_total_bytes]
        rows = 0
        for counters in sample.interfaces:
            writer.writerow([*base, counters.name, counters.rx_bytes, counters.tx_bytes, counters.rx_packets,
                             counters.tx_packets, counters.tx_dropped, "", "", "", ""])
            rows += 1
        for gpu in sample.gpus:
            writer.writerow([*base, "", "", "", "", "", "", gpu.index, f"{gpu.utilization_percent:.1f}",
                             gpu.memory_used_bytes, f"{gpu.power_watts:.1f}"])
            rows += 1
        if not rows:
            writer.writerow([*base] + [""] * (len(CSV_COLUMNS) - len(base)))
    return out.getvalue().encode()
