"""The data plane behind StreamInfer and Infer: plain Python over the backend interface.

A stream has a reader (a thread of its own) that pulls request batches and submits them, and a
response side (the RPC's generator) that sends, in one ResponseBatch, everything that completed
since its last send. Work is per batch: ids, timings and outputs move as lists the protobuf
runtime copies in C; nothing loops over samples in Python here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

from mecbench.core.errors import Cancelled, DeadlineExceeded, InvalidArgument
from mecbench.core.logging import get_logger
from mecbench.v1 import sut_agent_pb2
from sut_agent.backends.base import Completion
from sut_agent.lifecycle import BackendManager
from sut_agent.settings import SutAgentSettings

log = get_logger("sut_agent.dataplane")


def check_batch(batch: sut_agent_pb2.QueryBatch, field: str) -> int:
    """The number of samples in `batch`; InvalidArgument when its parallel arrays disagree."""
    count = len(batch.sample_ids)
    if batch.payloads and len(batch.payloads) != count:
        raise InvalidArgument(f"must be empty or one per sample id ({count})", field=f"{field}.payloads")
    if batch.sample_indices and len(batch.sample_indices) != count:
        raise InvalidArgument(f"must be empty or one per sample id ({count})", field=f"{field}.sample_indices")
    return count


def build_response(completions: list[Completion]) -> sut_agent_pb2.ResponseBatch:
    """One ResponseBatch from completions (all first tokens, or all final), keeping the parallel
    arrays aligned."""
    if len(completions) == 1:
        only = completions[0]
        return sut_agent_pb2.ResponseBatch(
            sample_ids=only.sample_ids,
            queue_us=only.queue_us,
            compute_us=only.compute_us,
            outputs=only.outputs or (),
            errors=only.errors or (),
            token_counts=only.token_counts or (),
            first_tokens=only.first_tokens,
        )
    sample_ids: list[int] = []
    queue_us: list[int] = []
    compute_us: list[int] = []
    for completion in completions:
        sample_ids += completion.sample_ids
        queue_us += completion.queue_us
        compute_us += completion.compute_us
    response = sut_agent_pb2.ResponseBatch(sample_ids=sample_ids, queue_us=queue_us, compute_us=compute_us)
    if any(completion.outputs is not None for completion in completions):
        outputs: list[bytes] = []
        for completion in completions:
            outputs += completion.outputs if completion.outputs is not None else [b""] * len(completion)
        response.outputs.extend(outputs)
    if any(completion.errors is not None for completion in completions):
        errors: list[str] = []
        for completion in completions:
            errors += completion.errors if completion.errors is not None else [""] * len(completion)
        response.errors.extend(errors)
    if any(completion.token_counts is not None for completion in completions):
        counts: list[int] = []
        for completion in completions:
            counts += completion.token_counts if completion.token_counts is not None else [0] * len(completion)
        response.token_counts.extend(counts)
    response.first_tokens = completions[0].first_tokens
    return response


class _ReaderDone:
    """Put on a stream's queue by its reader when it stops: how many samples it submitted, and
    the error that stopped it (None when the client half-closed)."""

    __slots__ = ("error", "submitted")

    def __init__(self, submitted: int, error: Exception | None) -> None:
        self.submitted = submitted
        self.error = error


_CLOSED = object()  # put on a stream's queue when the RPC has ended


class InferStream:
    """One StreamInfer call. `feed` runs on a reader thread; `responses` is the RPC's generator.

    Everything the response side learns arrives on one C-implemented queue (completions, then
    the reader's end, or the RPC's end), so a hand-off costs no Python-level lock or condition,
    and the counters each have a single writer: the reader counts what it submitted, the
    response side what came back.
    """

    def __init__(self, manager: BackendManager, settings: SutAgentSettings) -> None:
        self._manager = manager
        self._stats = manager.stats
        self._max_samples = settings.max_response_samples
        self._max_bytes = settings.max_response_bytes
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False

    def on_done(self, completion: Completion) -> None:
        if not completion.first_tokens:
            self._stats.record(completion)
        if not self._closed:
            self._queue.put(completion)

    def feed(self, requests: Iterable[sut_agent_pb2.StreamInferRequest]) -> None:
        """Submit every request batch until the client half-closes, cancels, or a batch is bad."""
        manager = self._manager
        stats = self._stats
        on_done = self.on_done
        submitted = 0
        error: Exception | None = None
        try:
            for request in requests:
                if self._closed:
                    return
                batch = request.batch
                count = check_batch(batch, "batch")
                if not count:
                    continue
                backend = manager.ready_backend()
                submitted += count
                stats.submitted(count)
                backend.submit(batch.sample_ids, batch.sample_indices, batch.payloads, on_done)
        except Exception as exc:  # noqa: BLE001 - handed to the response side, which raises it
            error = exc
        finally:
            self._queue.put(_ReaderDone(submitted, error))

    def start_reader(self, requests: Iterable[sut_agent_pb2.StreamInferRequest]) -> None:
        threading.Thread(target=self.feed, args=(requests,), name="stream-reader", daemon=True).start()

    def responses(self) -> Iterator[sut_agent_pb2.StreamInferResponse]:
        """Yield what completed since the last message, until every submitted sample is answered
        after the client half-closed, the reader failed, or the RPC ended."""
        get, get_nowait = self._queue.get, self._queue.get_nowait
        max_samples, max_bytes = self._max_samples, self._max_bytes
        received = 0
        expected: int | None = None
        error: Exception | None = None
        try:
            while True:
                item = get()
                taken: list[Completion] = []
                first_tokens: list[Completion] = []
                samples = size = 0
                while True:
                    if type(item) is Completion:
                        if item.first_tokens:
                            # Sent apart, and before the final completions taken with them: a
                            # sample's first token must reach LoadGen before its completion.
                            first_tokens.append(item)
                        else:
                            taken.append(item)
                            samples += len(item.sample_ids)
                        if item.outputs:
                            size += sum(map(len, item.outputs))
                    elif item is _CLOSED:
                        return
                    elif isinstance(item, _ReaderDone):
                        expected, error = item.submitted, item.error
                    if samples >= max_samples or size >= max_bytes:
                        break
                    try:
                        item = get_nowait()
                    except queue.Empty:
                        break
                if first_tokens:
                    yield sut_agent_pb2.StreamInferResponse(batch=build_response(first_tokens))
                if taken:
                    received += samples
                    yield sut_agent_pb2.StreamInferResponse(batch=build_response(taken))
                if error is not None:
                    raise error
                if expected is not None and received >= expected:
                    return
        finally:
            self.close()

    def close(self) -> None:
        """The RPC ended (finished, failed or cancelled): drop what completes from now on."""
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSED)


class DataPlane:
    def __init__(self, manager: BackendManager, settings: SutAgentSettings) -> None:
        self._manager = manager
        self._settings = settings
        self._lock = threading.Lock()

    def stream(self, requests: Iterable[sut_agent_pb2.StreamInferRequest]) -> InferStream:
        """Open a stream over `requests` (FAILED_PRECONDITION when no backend is ready)."""
        self._manager.ready_backend()
        stream = InferStream(self._manager, self._settings)
        stream.start_reader(requests)
        return stream

    def serve_stream(
        self, requests: Iterable[sut_agent_pb2.StreamInferRequest], stream: InferStream
    ) -> Iterator[sut_agent_pb2.StreamInferResponse]:
        with self._lock:
            self._manager.open_streams += 1
        try:
            yield from stream.responses()
        finally:
            with self._lock:
                self._manager.open_streams -= 1

    def infer(
        self, batch: sut_agent_pb2.QueryBatch, done: threading.Event, timeout: float | None = None
    ) -> sut_agent_pb2.ResponseBatch:
        """Run one batch and wait for all of it. `done` is set here when it completes; the
        caller sets it too when the RPC is cancelled."""
        count = check_batch(batch, "batch")
        backend = self._manager.ready_backend()
        if not count:
            return sut_agent_pb2.ResponseBatch()
        stats = self._manager.stats
        lock = threading.Lock()
        completions: list[Completion] = []
        remaining = [count]

        def on_done(completion: Completion) -> None:
            if completion.first_tokens:
                return  # a unary call answers once, with the final outputs
            stats.record(completion)
            with lock:
                completions.append(completion)
                remaining[0] -= len(completion)
                finished = remaining[0] <= 0
            if finished:
                done.set()

        stats.submitted(count)
        backend.submit(batch.sample_ids, batch.sample_indices, batch.payloads, on_done)
        if not done.wait(timeout):
            raise DeadlineExceeded(f"{remaining[0]} of {count} samples not done in time")
        with lock:
            if remaining[0] > 0:
                raise Cancelled("the call was cancelled")
            return build_response(completions)
