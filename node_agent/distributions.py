"""netem delay-distribution tables, generated the way iproute2 generates its `.dist` files.

netem draws a jittered delay as `delay + jitter * table[random] / NETEM_DIST_SCALE` when a table
is installed (TCA_NETEM_DELAY_DIST, an array of signed 16-bit values), and uniformly in
`delay ± jitter` when none is. pyroute2 cannot send a table, so MECBench builds it: these are
ports of iproute2's netem/normal.c, pareto.c and paretonormal.c, and produce the same 4096 values
as the normal.dist, pareto.dist and paretonormal.dist files iproute2 installs (a test compares
them where those files exist).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt

NETEM_DIST_SCALE = 8192
_TABLESIZE = 16384
_PARETO_ALPHA = 3.0
_SHORT_MIN, _SHORT_MAX = -32768, 32767

DISTRIBUTIONS = ("normal", "pareto", "paretonormal")


@functools.cache
def _inverse_normal_samples() -> npt.NDArray[np.float64]:
    """normal.c's table[]: for each index i of a 16384-cell CDF grid, the last x on a 0.00005 grid
    of [-10, 10.05) whose rint(16384 * Phi(x)) is i."""
    # The C loop accumulates `x += .00005`; a sequential cumulative sum reproduces its rounding.
    steps = np.full(int(20.05 / 0.00005) + 2, 0.00005)
    steps[0] = -10.0
    xs = np.cumsum(steps)
    xs = xs[xs < 10.05]
    erf = np.frompyfunc(math.erf, 1, 1)
    cdf = 0.5 + 0.5 * np.asarray(erf(xs / math.sqrt(2.0)), dtype=np.float64)
    cells = np.rint(_TABLESIZE * cdf).astype(np.int64)
    table = np.zeros(_TABLESIZE + 1)
    # Later x overwrite earlier ones in C: keep, per cell, the last (largest) x that hit it.
    reversed_cells = cells[::-1]
    unique_cells, first_in_reversed = np.unique(reversed_cells, return_index=True)
    table[unique_cells] = xs[::-1][first_in_reversed]
    return table


def _pareto_values(indices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    value = 1.0 / np.power(indices / 65536.0, 1.0 / _PARETO_ALPHA)
    value = (value - 1.5) * (4.0 / 3.0) * NETEM_DIST_SCALE
    value = np.minimum(value, 32767)
    return np.rint(value).astype(np.int64)


@functools.cache
def distribution_table(name: str) -> tuple[int, ...]:
    """The 4096-entry table for "normal", "pareto" or "paretonormal"."""
    if name == "normal":
        normal = np.rint(_inverse_normal_samples()[0:_TABLESIZE:4] * NETEM_DIST_SCALE)
        return tuple(int(v) for v in np.clip(normal, _SHORT_MIN, _SHORT_MAX))
    if name == "pareto":
        return tuple(int(v) for v in _pareto_values(np.arange(65536, 0, -16, dtype=np.int64)))
    if name == "paretonormal":
        i = np.arange(0, _TABLESIZE, 4, dtype=np.int64)
        normal = np.rint(_inverse_normal_samples()[0:_TABLESIZE:4] * NETEM_DIST_SCALE).astype(np.int64)
        pareto = _pareto_values(65536 - 4 * i)
        # C's integer division truncates toward zero.
        mixed = np.trunc((normal + 3 * pareto) / 4).astype(np.int64)
        return tuple(int(v) for v in np.clip(mixed, _SHORT_MIN, _SHORT_MAX))
    raise ValueError(f"unknown distribution {name!r} (known: {', '.join(DISTRIBUTIONS)})")
