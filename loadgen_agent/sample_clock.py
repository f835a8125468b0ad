"""Every sample's latency as LoadGen measures it, without LoadGen's trace.

LoadGen's latency of a sample runs from the query's *scheduled* time to the moment
QuerySamplesComplete is entered for it (loadgen.cc, ResponseDelegateDetailed::SampleComplete:
`sched.delta(complete_begin_time)`). Its trace is the one file that lists it per sample, and
writing that trace costs LoadGen a large share of its CPU (bench/harness.py measures it) and each
repeat a parse of a file that grows with the test. MECBench needs the per-sample figures only to
pool several clients' latencies by LoadGen's rule, so the client keeps them itself:

- the completion time is stamped as each QuerySamplesComplete is called (RecordingLoadGen);
- the scheduled time is the issue time in SingleStream and MultiStream, where LoadGen schedules a
  query when it issues it (when the previous one ended);
- in the Server scenario LoadGen draws each query's offset from the test's start from its own
  generator: std::mt19937 seeded with `schedule_rng_seed` and std::exponential_distribution at
  the target QPS, truncated to whole nanoseconds and summed, the first query at offset 0. The same
  draws are made here (numpy's MT19937 with the standard 32-bit seeding, and libstdc++'s
  generate_canonical: two 32-bit words per double). The start is the earliest (issue time minus
  offset) over the test: no query is issued before its time, and the first one is issued at once.

What the stamps cannot see is the time between LoadGen's issuing a query and our callback
running (the binding's list conversion, taking the GIL: about 15 us here), which makes the start
look that much later and every latency that much shorter. The test's one unknown, that offset,
is then taken from LoadGen itself: the latencies are shifted so that their mean is the mean
LoadGen's summary reports (`anchor_to_mean`; LoadGen's mean is the integer quotient of the sum, so
they agree to the nanosecond). What remains is the scatter between our stamps and LoadGen's
(a thread preempted between two lines); tests/loadgen_agent/test_sample_clock.py compares both,
sample by sample, against LoadGen's trace, and tests/loadgen_agent/test_agent.py a client's pooled
figures against its own summary. Offline is left to the trace: its one query is
scheduled at the test's start, which LoadGen takes milliseconds before it hands the samples over
(7.8 ms for 22,000 samples here), and nothing the client sees marks it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from mecbench.core.latencies import query_latencies

Int64s = np.ndarray[Any, np.dtype[np.int64]]

# LoadGen's TestScenario values as the Python binding names them.
_SERVER = "Server"
_PER_QUERY_SCENARIOS = ("MultiStream",)
_MEASURED_SCENARIOS = ("Server", "SingleStream", "MultiStream")


def measures(test_settings: Any) -> bool:
    """Whether the clock gives this test's latencies (else LoadGen's trace must)."""
    scenario = test_settings.scenario.name
    return bool(scenario in _MEASURED_SCENARIOS and not test_settings.server_num_issue_query_threads)


def server_offsets(seed: int, target_qps: float, count: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The scheduled offsets (ns from the test's start) of a Server test's first `count` queries,
    drawn as LoadGen draws them (see the module docstring)."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    generator = np.random.MT19937()
    # std::mt19937(seed): the reference 32-bit initialisation, of the seed modulo 2**32 (LoadGen's
    # seeds are 64-bit; the engine keeps the low word).
    generator._legacy_seeding(seed & 0xFFFFFFFF)
    words = generator.random_raw(2 * (count - 1)).astype(np.float64)
    canonical = (words[0::2] + words[1::2] * 4294967296.0) / 18446744073709551616.0
    canonical = np.minimum(canonical, np.nextafter(1.0, 0.0))
    gaps = (-np.log(1.0 - canonical) / target_qps * 1e9).astype(np.int64)  # duration_cast truncates
    offsets = np.zeros(count, dtype=np.int64)
    np.cumsum(gaps, out=offsets[1:])
    return offsets


class SampleClock:
    """Issue and completion stamps of one test's samples, and their latencies by LoadGen's rule.

    `issued` is called from LoadGen's issue thread, `completed` from whichever thread completes
    samples; both only read the clock and append (ids are matched to samples after the test)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._server = False
        self._seed = 0
        self._target_qps = 0.0
        self._per_query = False
        self._reset()

    def _reset(self) -> None:
        # Flat lists of ints, which the garbage collector does not track (a tuple kept per call
        # would make its full collections scan every one of a long test's calls): the ids in the
        # order LoadGen issued them, and per call its stamp and how many ids it had; the same for
        # completions. Issues come from LoadGen's issuing thread alone (mecbench.core.issuing),
        # so they append without a lock; completions come from any thread and take it.
        self._issue_ids: list[int] = []
        self._issue_sizes: list[int] = []
        self._issue_stamps: list[int] = []
        self._completed_ids: list[int] = []
        self._completed_sizes: list[int] = []
        self._completed_stamps: list[int] = []

    def begin(self, test_settings: Any, active: bool = True) -> None:
        """Start a test run with these (effective) LoadGen TestSettings; an inactive clock (a test
        whose latencies are not kept, or left to the trace) records nothing."""
        scenario = test_settings.scenario.name
        with self._lock:
            self._reset()
            self._active = active
            self._server = scenario == _SERVER
            self._per_query = scenario in _PER_QUERY_SCENARIOS
            self._target_qps = float(test_settings.server_target_qps)
            self._seed = int(test_settings.test05_schedule_rng_seed if test_settings.test05
                             else test_settings.schedule_rng_seed)

    def issued(self, ids: Sequence[int]) -> None:
        now = time.monotonic_ns()
        if self._active:
            self._issue_ids.extend(ids)
            self._issue_sizes.append(len(ids))
            self._issue_stamps.append(now)

    def completed(self, ids: Sequence[int]) -> None:
        """Called just before QuerySamplesComplete, so the stamp is as close to LoadGen's own as
        the call allows."""
        if self._active:
            with self._lock:
                self._completed_ids.extend(ids)
                self._completed_sizes.append(len(ids))
                self._completed_stamps.append(time.monotonic_ns())

    def _sequences(self) -> tuple[Int64s, Int64s, Int64s, Int64s]:
        """Issue stamps and query numbers by sample sequence (the order LoadGen issued them), and
        each completed sample's sequence and completion stamp. A response id names one sample of a
        test (LoadGen's address of the sample's record, which lives for the whole test); a
        completion of a sample this test did not issue, or a second one, is left out."""
        with self._lock:
            issue_ids, issue_sizes = list(self._issue_ids), list(self._issue_sizes)
            issue_stamps = np.array(self._issue_stamps, dtype=np.int64)
            completed_ids, completed_sizes = list(self._completed_ids), list(self._completed_sizes)
            completed_stamps = np.array(self._completed_stamps, dtype=np.int64)
        issue_ns = np.repeat(issue_stamps, issue_sizes)
        query_of = np.repeat(np.arange(len(issue_sizes), dtype=np.int64), issue_sizes)
        sequence_of = dict(zip(issue_ids, range(len(issue_ids)), strict=True))
        sequences = np.array(list(map(sequence_of.pop, completed_ids, repeat(-1))), dtype=np.int64)
        completed_ns = np.repeat(completed_stamps, completed_sizes)
        known = sequences >= 0
        return issue_ns, query_of, sequences[known], completed_ns[known]

    def rows(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """(query sequence, latency ns) of every completed sample, as sample_latencies.npy holds them."""
        issued, queries, sequence, completed = self._sequences()
        if len(sequence) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        if self._server:
            offsets = server_offsets(self._seed, self._target_qps, len(issued))
            scheduled = int((issued - offsets).min()) + offsets
        else:
            scheduled = issued
        latency = completed - scheduled[sequence]
        query = queries[sequence] if self._per_query else sequence
        order = np.argsort(sequence, kind="stable")
        return np.stack([query[order], latency[order]], axis=1)

    def write(self, destination: Path, loadgen_mean_ns: int | None = None) -> int:
        """Write `rows()` as sample_latencies.npy (the format the trace's extract writes), anchored
        to LoadGen's mean latency when given; the count."""
        rows = self.rows()
        if loadgen_mean_ns is not None:
            rows = anchor_to_mean(rows, loadgen_mean_ns, per_query=self._per_query)
        with destination.open("wb") as handle:
            np.save(handle, rows)
        return len(rows)


class RecordingLoadGen:
    """The mlperf_loadgen module as a data plane uses it, with every QuerySamplesComplete stamped
    on a SampleClock just before LoadGen's own stamp; everything else passes through."""

    def __init__(self, loadgen: Any, clock: SampleClock) -> None:
        self._loadgen = loadgen
        self._clock = clock

    def QuerySamplesComplete(self, responses: Sequence[Any]) -> None:  # noqa: N802 (LoadGen's name)
        self._clock.completed([response.id for response in responses])
        self._loadgen.QuerySamplesComplete(responses)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loadgen, name)


def anchor_to_mean(
    rows: np.ndarray[Any, np.dtype[np.int64]], loadgen_mean_ns: int, per_query: bool = False
) -> np.ndarray[Any, np.dtype[np.int64]]:
    """`rows` with every latency shifted by one constant, so that their mean (per query, as the
    maximum of its samples', when `per_query`: MultiStream) is `loadgen_mean_ns` as LoadGen computes
    a mean (the integer quotient of the sum)."""
    if len(rows) == 0:
        return rows
    latencies = query_latencies(rows) if per_query else rows[:, 1]
    shift = loadgen_mean_ns - int(latencies.sum()) // len(latencies)
    anchored = rows.copy()
    anchored[:, 1] += shift
    return anchored
