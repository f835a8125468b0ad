"""Per-sample latency rows as LoadGen's percentiles see them, shared by the LoadGen client (which
keeps them) and the controller (which pools them)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# (query sequence, latency ns) per sample, or latencies alone, int64.
Latencies = npt.NDArray[np.int64]


def query_latencies(rows: Latencies) -> Latencies:
    """One latency per query, that of its slowest sample (MultiStream's percentiles are over
    queries), in query order."""
    if len(rows) == 0:
        return rows[:, 1]
    ordered = rows[np.argsort(rows[:, 0], kind="stable")]
    starts = np.flatnonzero(np.r_[True, ordered[1:, 0] != ordered[:-1, 0]])
    result: Latencies = np.maximum.reduceat(ordered[:, 1], starts)
    return result
