"""MECBench: MLPerf-grade benchmarks of AI inference at the network edge."""

from __future__ import annotations

__version__ = "0.1.0"
