"""The synthetic backend: a queueing model of a server, not a thread per sample.

Samples wait in a FIFO queue for one of `max_concurrency` servers (unlimited when 0). A server
takes up to `max_batch_size` queued samples at once and holds them for a service time drawn from
the configured distribution (per batch), plus `per_sample_time` per sample. One scheduler thread
keeps a heap of completion deadlines: at each deadline it completes the batch, frees the server
and starts what is queued. Times are model times (a freed server starts the next batch at the
previous one's deadline, not when the scheduler happened to wake), so the reported queue and
compute times are exact and scheduler lag does not accumulate.

A service time that is always zero completes samples inside `submit`, batch-wise, with no lock
and no thread hop: that is what harness calibration runs against at tens of thousands of
samples per second.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from heapq import heappop, heappush

import numpy as np

from mecbench.core import durations
from mecbench.core.logging import get_logger
from mecbench.v1 import sut_agent_pb2
from sut_agent.backends.base import STOPPED_ERROR, Backend, Completion, CompletionCallback

log = get_logger("sut_agent.synthetic")

_DRAW_BLOCK = 4096


class ServiceTimeSampler:
    """Service times in integer nanoseconds, drawn in blocks from a seeded numpy Generator."""

    def __init__(self, config: sut_agent_pb2.SyntheticBackendConfig) -> None:
        distribution = config.distribution or sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT
        mean = durations.to_ns(config.mean)
        stddev = durations.to_ns(config.stddev)
        low, high = durations.to_ns(config.low), durations.to_ns(config.high)
        self._rng = np.random.default_rng(config.seed)
        self._buffer: list[int] = []
        self._position = 0
        self._generate: Callable[[int], np.ndarray] | None = None
        # A distribution that can only give one value is served as a constant: cheaper, exact.
        self.constant_ns: int | None = None
        if distribution == sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_UNIFORM:
            if low == high:
                self.constant_ns = low
            else:
                self._generate = lambda n: self._rng.uniform(low, high, n)
        elif distribution == sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_NORMAL:
            if stddev == 0:
                self.constant_ns = mean
            else:
                self._generate = lambda n: self._rng.normal(mean, stddev, n)
        elif distribution == sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_LOGNORMAL:
            if stddev == 0 or mean == 0:
                self.constant_ns = mean
            else:
                # The underlying normal's parameters that give this mean and standard deviation.
                sigma2 = math.log1p((stddev / mean) ** 2)
                mu = math.log(mean) - sigma2 / 2
                sigma = math.sqrt(sigma2)
                self._generate = lambda n: self._rng.lognormal(mu, sigma, n)
        else:
            self.constant_ns = mean

    def draw(self) -> int:
        if self.constant_ns is not None:
            return self.constant_ns
        if self._position >= len(self._buffer):
            self._refill(_DRAW_BLOCK)
        value = self._buffer[self._position]
        self._position += 1
        return value

    def draw_many(self, count: int) -> list[int]:
        if self.constant_ns is not None:
            return [self.constant_ns] * count
        if self._position + count > len(self._buffer):
            self._refill(max(count, _DRAW_BLOCK))
        values = self._buffer[self._position : self._position + count]
        self._position += count
        return values

    def _refill(self, count: int) -> None:
        assert self._generate is not None
        rest = self._buffer[self._position :]
        # Clipped at 0: a normal distribution can draw negative times.
        fresh = np.maximum(self._generate(count), 0.0).astype(np.int64).tolist()
        self._buffer = rest + fresh
        self._position = 0


class _Chunk:
    """Samples of one submit call still waiting in the queue, from `position` on."""

    __slots__ = ("arrival_ns", "callback", "ids", "position")

    def __init__(self, ids: list[int], callback: CompletionCallback, arrival_ns: int) -> None:
        self.ids = ids
        self.callback = callback
        self.arrival_ns = arrival_ns
        self.position = 0


# One callback's share of a job: its ids, queue and compute times, and batches counted.
_Group = tuple[CompletionCallback, list[int], list[int], list[int], int]


class _Job:
    __slots__ = ("groups", "holds_server")

    def __init__(self, groups: list[_Group], holds_server: bool) -> None:
        self.groups = groups
        self.holds_server = holds_server


class SyntheticBackend(Backend):
    name = "synthetic"

    def __init__(self, config: sut_agent_pb2.SyntheticBackendConfig, spin_us: int = 200) -> None:
        self._sampler = ServiceTimeSampler(config)
        self._per_sample_ns = durations.to_ns(config.per_sample_time)
        self._limit = config.max_concurrency
        self._batch_size = max(1, config.max_batch_size)
        self._payload = bytes(config.response_bytes) if config.response_bytes else None
        self._spin_ns = max(0, spin_us) * 1000
        self.zero_time = self._sampler.constant_ns == 0 and self._per_sample_ns == 0
        self._cond = threading.Condition()
        self._queue: deque[_Chunk] = deque()
        # Heap of the (model) times idle servers became free; empty = all busy.
        self._free_at: list[int] = [0] * self._limit
        self._heap: list[tuple[int, int, _Job]] = []
        self._sequence = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        if not self.zero_time:
            self._thread = threading.Thread(target=self._run, name="synthetic-scheduler", daemon=True)
            self._thread.start()

    # Submit path -----------------------------------------------------------------------------

    def submit(
        self,
        sample_ids: Sequence[int],
        indices: Sequence[int],
        payloads: Sequence[bytes],
        on_done: CompletionCallback,
    ) -> None:
        count = len(sample_ids)
        if not count:
            return
        if self._closed:
            on_done(Completion.failed(sample_ids, STOPPED_ERROR))
            return
        if self.zero_time:
            zeros = [0] * count
            batches = count if self._batch_size == 1 else -(-count // self._batch_size)
            outputs = [self._payload] * count if self._payload is not None else None
            on_done(Completion(list(sample_ids), zeros, zeros, outputs, None, batches))
            return
        now = time.perf_counter_ns()
        with self._cond:
            if self._closed:
                rejected = True
            else:
                rejected = False
                heap = self._heap
                earliest = heap[0][0] if heap else None
                self._queue.append(_Chunk(list(sample_ids), on_done, now))
                self._start_queued()
                if heap and (earliest is None or heap[0][0] < earliest):
                    self._cond.notify()
        if rejected:
            on_done(Completion.failed(sample_ids, STOPPED_ERROR))

    def _start_queued(self) -> None:
        """Start as many queued samples as there are free servers. Called with the lock held."""
        queue = self._queue
        unlimited = self._limit == 0
        batch_size = self._batch_size
        while queue and (unlimited or self._free_at):
            if unlimited and batch_size == 1:
                chunk = queue.popleft()
                self._start_each(chunk, chunk.ids[chunk.position :] if chunk.position else chunk.ids)
                continue
            free_at = 0 if unlimited else heappop(self._free_at)
            taken: list[tuple[_Chunk, list[int]]] = []
            count = 0
            latest_arrival = 0
            while queue and count < batch_size:
                chunk = queue[0]
                take = min(batch_size - count, len(chunk.ids) - chunk.position)
                ids = chunk.ids[chunk.position : chunk.position + take]
                chunk.position += take
                if chunk.position >= len(chunk.ids):
                    queue.popleft()
                taken.append((chunk, ids))
                count += take
                latest_arrival = max(latest_arrival, chunk.arrival_ns)
            start = max(free_at, latest_arrival)
            service_ns = self._sampler.draw() + self._per_sample_ns * count
            compute_us = service_ns // 1000
            groups: list[_Group] = []
            for position, (chunk, ids) in enumerate(taken):
                n = len(ids)
                queue_us = (start - chunk.arrival_ns) // 1000
                groups.append((chunk.callback, ids, [queue_us] * n, [compute_us] * n, 1 if position == 0 else 0))
            heappush(self._heap, (start + service_ns, next(self._sequence), _Job(groups, not unlimited)))

    def _start_each(self, chunk: _Chunk, ids: list[int]) -> None:
        """Unlimited servers, no batching: every sample starts on arrival with its own time."""
        count = len(ids)
        start = chunk.arrival_ns
        constant = self._sampler.constant_ns
        if constant is not None:
            service_ns = constant + self._per_sample_ns
            group: _Group = (chunk.callback, ids, [0] * count, [service_ns // 1000] * count, count)
            heappush(self._heap, (start + service_ns, next(self._sequence), _Job([group], False)))
            return
        per_sample = self._per_sample_ns
        callback = chunk.callback
        heap = self._heap
        sequence = self._sequence
        for sample_id, drawn in zip(ids, self._sampler.draw_many(count), strict=True):
            service_ns = drawn + per_sample
            job = _Job([(callback, [sample_id], [0], [service_ns // 1000], 1)], False)
            heappush(heap, (start + service_ns, next(sequence), job))

    # Scheduler -------------------------------------------------------------------------------

    def _run(self) -> None:
        cond = self._cond
        heap = self._heap
        spin_ns = self._spin_ns
        while True:
            with cond:
                while True:
                    if self._closed:
                        return
                    if not heap:
                        cond.wait()
                        continue
                    wait_ns = heap[0][0] - time.perf_counter_ns() - spin_ns
                    if wait_ns <= 0:
                        break
                    cond.wait(wait_ns / 1e9)
                target = heap[0][0]
            # The last stretch: yield the CPU until the deadline instead of oversleeping it.
            while time.perf_counter_ns() < target:
                os.sched_yield()
            done: dict[CompletionCallback, Completion] = {}
            with cond:
                if self._closed:
                    return
                now = time.perf_counter_ns()
                while heap and heap[0][0] <= now:
                    deadline, _, job = heappop(heap)
                    if job.holds_server:
                        heappush(self._free_at, deadline)
                    for callback, ids, queue_us, compute_us, batches in job.groups:
                        entry = done.get(callback)
                        if entry is None:
                            done[callback] = Completion(ids, queue_us, compute_us, None, None, batches)
                        else:
                            entry.sample_ids.extend(ids)
                            entry.queue_us.extend(queue_us)
                            entry.compute_us.extend(compute_us)
                            entry.batches += batches
                self._start_queued()
            self._deliver(done)

    def _deliver(self, done: dict[CompletionCallback, Completion]) -> None:
        payload = self._payload
        for callback, completion in done.items():
            if payload is not None:
                completion.outputs = [payload] * len(completion)
            try:
                callback(completion)
            except Exception:
                log.exception("completion_callback_failed")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued = list(self._queue)
            running = [job for _, _, job in self._heap]
            self._queue.clear()
            self._heap.clear()
            self._cond.notify_all()
        for chunk in queued:
            chunk.callback(Completion.failed(chunk.ids[chunk.position :], STOPPED_ERROR))
        for job in running:
            for callback, ids, _, _, _ in job.groups:
                callback(Completion.failed(ids, STOPPED_ERROR))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
