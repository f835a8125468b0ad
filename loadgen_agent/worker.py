"""A LoadGen session process ("session worker"): run as `python -m loadgen_agent.worker`.

LoadGen is a per-process singleton, so each session is its own process. It loads the dataset (the
QSL) once, opens the data-plane connection to the SUT agent once, constructs LoadGen's SUT and
QSL once, then runs the tests the agent sends it back to back (protocol in `protocol.py`).

Threads, and why they live as long as the process: LoadGen keeps a thread-local logger for each
thread that calls into it, and a thread that exits after calling QuerySamplesComplete can crash
LoadGen's logging thread later (seen with LoadGen 6.0: SIGSEGV in TlsLogger::SwapBuffers). So
every thread of ours that completes samples (the stream receivers, the monitor, the command
reader) is started once and never ends before the process does.

- main thread: set-up, then one test at a time (StartTest blocks it);
- command reader: reads the agent's commands (a cancel must get through while a test runs);
  exits the process at `close` or when the agent's end of the pipe closes (the agent died);
- one receiver per data-plane stream: reads ResponseBatch messages, completes samples;
- monitor: progress events and the response timeout.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import queue
import shutil
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import structlog

from loadgen_agent import datasets, protocol
from loadgen_agent.direct import DirectClient, reachable_endpoint
from loadgen_agent.llm_records import compute_metrics, write_records, write_token_latencies
from loadgen_agent.results import SUMMARY_FILE, TRACE_FILE, extract_sample_latencies, parse_summary_fields
from loadgen_agent.sample_clock import RecordingLoadGen, SampleClock, measures
from loadgen_agent.settings_builder import build_test_settings, describe_test_settings
from mecbench.core import durations
from mecbench.core.channels import open_channel, wait_until_serving
from mecbench.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, MecbenchError, Unavailable
from mecbench.core.framing import FrameError, FrameReader, FrameWriter, read_frame, write_frame
from mecbench.core.issuing import set_timer_slack_ns
from mecbench.core.logging import configure_logging, get_logger
from mecbench.core.path_options import path_option_violations
from mecbench.core.server import split_address
from mecbench.core.tls import TlsSettings, TlsStream, ssl_client_context
from mecbench.servers.base import ServerError, ServerType
from mecbench.servers.errors import ErrorTally
from mecbench.servers.registry import load_server_type
from mecbench.v1 import common_pb2, loadgen_agent_pb2, sut_agent_pb2, sut_agent_pb2_grpc
from store.layout import SAMPLE_LATENCIES_NAME

log = get_logger("mecbench.loadgen.worker")

DEFAULT_SAMPLE_COUNT = 1024
DEFAULT_SHAPE = (16,)
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_RESPONSE_TIMEOUT_S = 60.0
# LoadGen is handed at most this many responses per QuerySamplesComplete when we answer queries
# ourselves (cancel, abort), to bound the size of one call.
_COMPLETE_CHUNK = 8192
# LoadGen's rules for token latencies (mlperf_loadgen 6.0): a sample's first token must be
# reported before the sample completes, and a completed sample must count more than one token
# ("Number of tokens need to be greater than 1"), or its TTFT reads INT64_MIN and its TPOT goes
# negative in the summary. A sample that failed or was aborted is given both at the time it
# failed: TTFT = time to failure, this many tokens (TPOT then about 0); the result is INVALID anyway.
FAILED_SAMPLE_TOKENS = 2

_DTYPES: dict[int, np.dtype[Any]] = {
    common_pb2.DATA_TYPE_UNSPECIFIED: np.dtype(np.float32),
    common_pb2.DATA_TYPE_FLOAT32: np.dtype(np.float32),
    common_pb2.DATA_TYPE_FLOAT16: np.dtype(np.float16),
    common_pb2.DATA_TYPE_INT64: np.dtype(np.int64),
    common_pb2.DATA_TYPE_INT32: np.dtype(np.int32),
    common_pb2.DATA_TYPE_UINT8: np.dtype(np.uint8),
    common_pb2.DATA_TYPE_BYTES: np.dtype(np.uint8),
}


def start_thread(name: str, target: Callable[..., None], *args: Any) -> None:
    """A daemon thread that runs in a copy of the caller's context, so its logs carry the session id."""
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(target, *args), name=name, daemon=True).start()


# --- the dataset (QSL) -------------------------------------------------------------------------


def synthetic_shape(spec: common_pb2.SyntheticDataset) -> tuple[int, ...]:
    return tuple(int(d) for d in spec.shape) or DEFAULT_SHAPE


def synthetic_sample_bytes(spec: common_pb2.SyntheticDataset) -> int:
    """Bytes of one sample of a synthetic dataset."""
    return int(np.prod(synthetic_shape(spec))) * _DTYPES.get(spec.data_type, np.dtype(np.uint8)).itemsize


def synthetic_samples(spec: common_pb2.SyntheticDataset) -> list[bytes]:
    """`sample_count` random tensors of `shape`/`data_type` from `seed`, one bytes object each."""
    count = spec.sample_count or DEFAULT_SAMPLE_COUNT
    shape = (count, *synthetic_shape(spec))
    dtype = _DTYPES[spec.data_type]
    rng = np.random.default_rng(spec.seed)
    if dtype.kind == "f":
        data: np.ndarray[Any, Any] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    elif dtype == np.uint8:
        data = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        data = rng.integers(0, 1000, size=shape, dtype=dtype)
    return [row.tobytes() for row in data]


def load_samples(
    spec: common_pb2.DatasetSpec,
    cache_dir: Path | None = None,
    max_bytes: int | None = None,
    local_roots: Sequence[Path] = (),
) -> list[bytes]:
    """The samples of the session's dataset, held in memory for the whole session. A `uri` dataset
    is fetched into `cache_dir` (default: the user's cache) unless it holds the `sha256` already;
    a local path only under `local_roots` (the operator's)."""
    if spec.WhichOneof("source") == "uri":
        path = datasets.fetch(
            spec.uri, spec.sha256, cache_dir or datasets.default_cache_dir(), local_roots=local_roots,
            max_bytes=max_bytes if max_bytes is not None else datasets.DEFAULT_MAX_OBJECT_BYTES,
        )
        return datasets.load_samples(path, max_bytes=max_bytes)
    return synthetic_samples(spec.synthetic)


# --- the data plane ----------------------------------------------------------------------------


@dataclass
class TestCounters:
    issued: int = 0
    completed: int = 0
    batches_sent: int = 0
    samples_sent: int = 0
    sample_errors: int = 0
    first_sample_error: str = ""
    # Every failed sample by kind, and the first messages (logged once per kind).
    errors: ErrorTally = field(default_factory=lambda: ErrorTally("loadgen"))


class _Call:
    """One StreamInfer call of a stream slot; `dead` tells its request generator to stop."""

    def __init__(self) -> None:
        self.dead = False
        # When this stream last sent a message (time.monotonic()), for min_frame_interval.
        self.last_frame = 0.0


class RelayClient:
    """LoadGen's queries to the SUT agent over StreamInfer, and the responses back into LoadGen.

    Issue callbacks only append (response id, sample index, arrival time) to `pending` and wake a
    stream; nothing else happens on LoadGen's issue threads. Each stream's request generator (run
    by gRPC's sending thread for that call, so there is no extra hand-off) takes up to
    `max_batch_size` pending samples into one QueryBatch.

    Batching bound: a generator sends what is pending as soon as it wakes when `max_batch_delay`
    and `min_frame_interval` are 0. With a delay, it waits until `max_batch_size` samples are
    pending or the oldest pending sample has waited `max_batch_delay`, whichever comes first, so no
    sample waits in the batcher longer than `max_batch_delay` (plus thread wake-up) while a stream
    is free to take it. With an interval, a stream's next message waits until `min_frame_interval`
    after its last one (or `max_batch_size` pending): samples issued further apart go at once,
    faster ones share messages, and each waits at most the interval. Either way the issue callback
    wakes only a stream that waits for a first sample, or one holding a full batch back: a stream
    holding samples back is not woken once per sample.

    Samples travel with our own wire ids (a per-process sequence), not LoadGen's response ids:
    LoadGen's ids are addresses that a later test may reuse, so a late answer to an earlier test
    could otherwise complete the wrong sample. A response completes a sample only if its wire id is
    still in flight; everything else (late, duplicate, after a cancel) is dropped.
    """

    def __init__(
        self,
        stub: sut_agent_pb2_grpc.SutAgentStub,
        samples: Sequence[bytes],
        options: loadgen_agent_pb2.DataPlaneOptions,
        sut_address: str,
        loadgen: Any = None,
    ) -> None:
        import mlperf_loadgen

        # The mlperf_loadgen module, or a stand-in for it (the worker's RecordingLoadGen).
        self._lg = mlperf_loadgen if loadgen is None else loadgen
        self._stub = stub
        self._samples = samples
        self._sut_address = sut_address
        self.max_batch_size = options.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        self.max_batch_delay_s = durations.to_seconds(options.max_batch_delay)
        self.omit_payloads = options.omit_payloads
        self.response_timeout_s = durations.to_seconds(options.response_timeout) or DEFAULT_RESPONSE_TIMEOUT_S
        self.stream_count = options.streams or 1
        self.min_frame_interval_s = durations.to_seconds(options.min_frame_interval)
        # Streams waiting for a first sample: only they need waking per sample; a stream holding
        # samples back is woken when max_batch_size are pending (or when its time comes).
        self._idle_senders = 0
        self.transport = options.transport
        self._tcp_port: int | None = None
        # The TCP data plane speaks TLS when this process's environment configures it, like
        # the gRPC channel to the same agent (mecbench.core.channels.open_channel).
        self._tls = TlsSettings.load()
        self._ssl_context = ssl_client_context(self._tls)
        self._cond = threading.Condition()
        # Held around a FirstTokenComplete and around an abort's taking of the samples in flight,
        # so LoadGen never hears of a first token for a sample it was already told is complete.
        self._token_lock = threading.Lock()
        self._pending: deque[tuple[int, int, float]] = deque()
        self._in_flight: dict[int, int] = {}
        self._wire_ids = itertools.count(1)
        self._last_activity = time.monotonic()
        self._test_active = False
        self._aborting = False
        self._cancelled = False
        self._abort_error: MecbenchError | None = None
        self._want_data = False
        self._use_tokens = False
        # Samples (LoadGen response ids) of this test whose first token LoadGen has been told of.
        self._first_token_seen: set[int] = set()
        # Token tests: each sample's issue and first-token times (ns), and the finished samples'
        # rows (issue ns, TTFT ns, latency ns, tokens, failed) for token_latencies.npy.
        self._token_issued: dict[int, int] = {}
        self._token_first: dict[int, int] = {}
        self.token_rows: list[tuple[int, int, int, int, int]] = []
        self.counters = TestCounters()
        # Told when the data plane aborts a test on its own (timeout, broken stream).
        self.on_abort: Callable[[MecbenchError], None] | None = None
        self._error_logged = False

    # LoadGen side: issue and flush callbacks -----------------------------------------------

    def issue(self, ids: Sequence[int], indices: Sequence[int]) -> None:
        """ConstructFastSUT's issue callback."""
        now = time.monotonic()
        with self._cond:
            self.counters.issued += len(ids)
            if not self._aborting:
                if not self._pending and not self._in_flight:
                    self._last_activity = now
                self._pending.extend(zip(ids, indices, itertools.repeat(now), strict=False))
                if self._use_tokens:
                    self._token_issued.update(dict.fromkeys(ids, time.monotonic_ns()))
                if self._idle_senders or len(self._pending) >= self.max_batch_size:
                    self._cond.notify()
                return
        self._complete_now(ids)

    def flush(self) -> None:
        """Nothing is held back: the streams send what is pending without being asked."""

    # Streams ----------------------------------------------------------------------------------

    def start(self) -> None:
        """One receiver thread per stream, for the life of the process (see the module docstring)."""
        for index in range(self.stream_count):
            start_thread(f"receiver-{index}", self._receive_loop, index)

    def _requests(self, call: _Call) -> Iterator[sut_agent_pb2.StreamInferRequest]:
        while True:
            with self._cond:
                while not self._pending and not call.dead:
                    self._idle_senders += 1
                    try:
                        self._cond.wait(0.5)
                    finally:
                        self._idle_senders -= 1
                if call.dead:
                    return
                hold_until = self._hold_until(call)
                if hold_until is not None:
                    while len(self._pending) < self.max_batch_size and not call.dead:
                        remaining = hold_until - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if call.dead or not self._pending:
                        continue
                count = min(len(self._pending), self.max_batch_size)
                call.last_frame = time.monotonic()
                taken = [self._pending.popleft() for _ in range(count)]
                wire_ids = [next(self._wire_ids) for _ in range(count)]
                in_flight = self._in_flight
                for wire_id, (response_id, _, _) in zip(wire_ids, taken, strict=True):
                    in_flight[wire_id] = response_id
                self.counters.batches_sent += 1
                self.counters.samples_sent += count
                if self._pending:
                    self._cond.notify()  # another stream may take the rest
            indices = [index for _, index, _ in taken]
            batch = sut_agent_pb2.QueryBatch(sample_ids=wire_ids, sample_indices=indices)
            if not self.omit_payloads:
                batch.payloads.extend([self._samples[i] for i in indices])
            yield sut_agent_pb2.StreamInferRequest(batch=batch)

    def _hold_until(self, call: _Call) -> float | None:
        """With `_cond` held and samples pending: until when the stream may hold them back for
        company (unless `max_batch_size` are pending first); None when it sends at once."""
        hold_until = None
        if self.max_batch_delay_s > 0:
            hold_until = self._pending[0][2] + self.max_batch_delay_s
        if self.min_frame_interval_s > 0:
            paced = call.last_frame + self.min_frame_interval_s
            hold_until = paced if hold_until is None else max(hold_until, paced)
        return hold_until

    def _receive_loop(self, index: int) -> None:
        backoff = 0.05
        while True:
            call = _Call()
            try:
                for batch in self._open_stream(call, index):
                    backoff = 0.05
                    self._on_response(batch)
                reason = "the SUT agent ended the stream"
            except grpc.RpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except (OSError, FrameError, MecbenchError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug in handling a response must not end this receiver for good
                log.exception("data_plane_response_failed", stream=index, sut=self._sut_address)
                reason = f"{type(exc).__name__} handling a response: {exc}"
            with self._cond:
                call.dead = True
                self._cond.notify_all()
                active = self._test_active
            # Reconnects are retried every 2 s at most; only the first failure in a row is a warning.
            report = log.warning if backoff == 0.05 else log.debug
            report("data_plane_stream_ended", stream=index, sut=self._sut_address, reason=reason)
            if active:
                self.abort(
                    Unavailable(f"data-plane stream {index} to the SUT agent at {self._sut_address} failed: {reason}")
                )
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _open_stream(self, call: _Call, index: int) -> Iterator[sut_agent_pb2.ResponseBatch]:
        """The response batches of one stream to the SUT agent, over the chosen transport: TCP
        by default where the SUT agent offers it, else gRPC; TCP when asked, or an error."""
        address = None if self.transport == loadgen_agent_pb2.DATA_PLANE_TRANSPORT_GRPC else self._tcp_address()
        if address is None:
            if self.transport == loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP:
                raise FailedPrecondition(f"the SUT agent at {self._sut_address} offers no TCP data plane")
            for response in self._stub.StreamInfer(self._requests(call)):
                yield response.batch
            return
        try:
            connection = socket.create_connection(address, timeout=10)
        except OSError:
            self._tcp_port = None  # a restarted SUT agent listens elsewhere: ask again next time
            raise
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader: FrameReader
            writer: FrameWriter
            if self._ssl_context is None:
                reader, writer = connection.makefile("rb"), connection
            else:
                tls = TlsStream(
                    connection, self._ssl_context, server_side=False,
                    server_hostname=self._tls.server_name or address[0],
                )
                tls.handshake()
                reader = writer = tls
            connection.settimeout(None)
            start_thread(f"sender-{index}", self._send_frames, connection, writer, call)
            while (frame := read_frame(reader)) is not None:
                yield sut_agent_pb2.StreamInferResponse.FromString(frame).batch
        finally:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _send_frames(self, connection: socket.socket, writer: FrameWriter, call: _Call) -> None:
        """The TCP transport's sending side: what `_requests` batches, framed, until the call
        dies; then the end of requests: a half-close, or over TLS (which has none) an empty frame."""
        try:
            for request in self._requests(call):
                write_frame(writer, request.SerializeToString())
            if writer is not connection:
                write_frame(writer, b"")
        except OSError:
            return  # the receiving side sees the connection end and reports it
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_WR)

    def _tcp_address(self) -> tuple[str, int] | None:
        """The SUT agent's plain-TCP data plane (its gRPC host, the port its status reports), or
        None when it has none. Asked once per session: the port lives as long as the agent."""
        if self._tcp_port is None:
            status = self._stub.GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10).status
            self._tcp_port = status.tcp_data_plane_port
            log.info("data_plane_transport", sut=self._sut_address, tcp_port=self._tcp_port or None)
        if not self._tcp_port:
            return None
        host, _ = split_address(self._sut_address)
        return host, self._tcp_port

    def _on_response(self, batch: sut_agent_pb2.ResponseBatch) -> None:
        if batch.first_tokens:
            with self._token_lock:
                self._on_first_tokens(batch)
            return
        wire_ids = batch.sample_ids
        matched: list[tuple[int, int]] = []
        with self._cond:
            self._last_activity = time.monotonic()
            pop = self._in_flight.pop
            for position, wire_id in enumerate(wire_ids):
                response_id = pop(wire_id, None)
                if response_id is not None:
                    matched.append((position, response_id))
            self.counters.completed += len(matched)
            failed_positions: set[int] = set()
            failed: list[str] = []
            if batch.errors:
                errors = batch.errors
                failed_positions = {p for p, _ in matched if p < len(errors) and errors[p]}
                failed = [errors[p] for p, _ in matched if p in failed_positions]
                self.counters.sample_errors += len(failed)
                if failed and not self._error_logged:
                    self._error_logged = True
                    self.counters.first_sample_error = failed[0][:1000]
            want_data = self._want_data
            use_tokens = self._use_tokens
            no_first_token: list[tuple[int, int]] = []
            if use_tokens:
                seen = self._first_token_seen
                no_first_token = [(p, rid) for p, rid in matched if rid not in seen]
                for _, rid in matched:
                    seen.discard(rid)
                self._record_token_rows(batch, matched, failed_positions)
        for message in failed:
            self.counters.errors.add(message)
        if not matched:
            return
        tokens_of = dict.fromkeys(failed_positions, FAILED_SAMPLE_TOKENS) if use_tokens else None
        if no_first_token:
            # A sample answered whole (not streamed) or failed: its first token is now.
            first, first_owners = self._responses(batch, no_first_token, False, tokens_of)
            self._lg.FirstTokenComplete(first)
            del first_owners
        responses, owners = self._responses(batch, matched, want_data, tokens_of)
        self._lg.QuerySamplesComplete(responses)
        del owners  # LoadGen has copied the outputs it logs

    def _record_token_rows(
        self, batch: sut_agent_pb2.ResponseBatch, matched: list[tuple[int, int]], failed: set[int]
    ) -> None:
        """With `_cond` held: the finished samples' token latencies, as the client saw them."""
        now = time.monotonic_ns()
        counts = batch.token_counts
        for position, rid in matched:
            issued = self._token_issued.pop(rid, now)
            first = self._token_first.pop(rid, now)
            tokens = counts[position] if position < len(counts) else 0
            self.token_rows.append((issued, first - issued, now - issued, tokens, int(position in failed)))

    def _on_first_tokens(self, batch: sut_agent_pb2.ResponseBatch) -> None:
        """With `_token_lock` held: first tokens of samples still in flight (completion follows)."""
        matched: list[tuple[int, int]] = []
        with self._cond:
            self._last_activity = time.monotonic()
            get = self._in_flight.get
            for position, wire_id in enumerate(batch.sample_ids):
                response_id = get(wire_id)
                if response_id is not None:
                    matched.append((position, response_id))
            want_data = self._want_data
            self._first_token_seen.update(response_id for _, response_id in matched)
            if self._use_tokens:
                self._token_first.update(dict.fromkeys((rid for _, rid in matched), time.monotonic_ns()))
        if matched:
            responses, owners = self._responses(batch, matched, want_data)
            self._lg.FirstTokenComplete(responses)
            del owners

    def _responses(
        self, batch: sut_agent_pb2.ResponseBatch, matched: list[tuple[int, int]], want_data: bool,
        tokens_of: dict[int, int] | None = None,
    ) -> tuple[list[Any], list[np.ndarray[Any, Any]]]:
        """QuerySampleResponse objects, and the arrays that own the output bytes they point to (the
        caller keeps those alive until LoadGen has copied them). Outputs are passed only when
        LoadGen logs them (accuracy runs, sampled accuracy logging), otherwise 0/0: no copies.
        `tokens_of` overrides the token count of some positions (failed samples)."""
        make = self._lg.QuerySampleResponse
        counts: Sequence[int] = batch.token_counts
        if tokens_of:
            counts = [tokens_of.get(p, counts[p] if p < len(counts) else 0) for p in range(len(batch.sample_ids))]
        if not want_data or not batch.outputs:
            if counts:
                return [make(rid, 0, 0, counts[p] if p < len(counts) else 0) for p, rid in matched], []
            return [make(rid, 0, 0) for _, rid in matched], []
        outputs = batch.outputs
        responses: list[Any] = []
        owners: list[np.ndarray[Any, Any]] = []
        for position, response_id in matched:
            data = outputs[position] if position < len(outputs) else b""
            pointer, size = 0, 0
            if data:
                array = np.frombuffer(data, dtype=np.uint8)
                owners.append(array)
                pointer, size = array.ctypes.data, array.size
            if counts:
                responses.append(make(response_id, pointer, size, counts[position] if position < len(counts) else 0))
            else:
                responses.append(make(response_id, pointer, size))
        return responses, owners

    # Tests ------------------------------------------------------------------------------------

    def begin_test(self, want_data: bool, use_tokens: bool = False) -> None:
        with self._cond:
            self.counters = TestCounters()
            self._test_active = True
            self._aborting = False
            self._cancelled = False
            self._abort_error = None
            self._want_data = want_data
            self._use_tokens = use_tokens
            self._first_token_seen = set()
            self._token_issued = {}
            self._token_first = {}
            self.token_rows = []
            self._error_logged = False
            self._last_activity = time.monotonic()

    def end_test(self) -> tuple[TestCounters, bool, MecbenchError | None]:
        """Counters, whether the test was cancelled, and the error that aborted it (if any)."""
        with self._cond:
            self._test_active = False
            self._aborting = False
            # LoadGen returned, so every sample was completed; anything still listed is stale.
            self._pending.clear()
            self._in_flight.clear()
            self._first_token_seen = set()
            return self.counters, self._cancelled, self._abort_error

    def outstanding(self) -> tuple[int, float]:
        """Samples issued and not answered, and seconds since the last sign of life from the SUT."""
        with self._cond:
            return len(self._pending) + len(self._in_flight), time.monotonic() - self._last_activity

    def is_active(self) -> bool:
        with self._cond:
            return self._test_active

    def abort(self, error: MecbenchError | None, cancelled: bool = False) -> bool:
        """End the running test as fast as LoadGen allows: answer every outstanding sample now and
        every later one as it is issued (with empty responses). Returns False when no test runs."""
        with self._token_lock, self._cond:
            if not self._test_active:
                return False
            self._cancelled = self._cancelled or cancelled
            if self._aborting:
                return True
            self._aborting = True
            self._abort_error = error
            ids = [response_id for response_id, _, _ in self._pending]
            ids.extend(self._in_flight.values())
            self._pending.clear()
            self._in_flight.clear()
            self.counters.completed += len(ids)
            self._cond.notify_all()
        log.info("test_aborting", cancelled=cancelled, outstanding=len(ids), error=str(error) if error else None)
        if error is not None:
            if ids:
                self.counters.errors.add(f"aborted: {error}", count=len(ids), kind="aborted")
            if self.on_abort is not None:
                self.on_abort(error)
        self._complete_now(ids)
        return True

    def _complete_now(self, ids: Sequence[int]) -> None:
        """Complete samples with empty answers (abort, cancel); in a token test each is first given
        the first token LoadGen requires, unless it had one (see FAILED_SAMPLE_TOKENS)."""
        make = self._lg.QuerySampleResponse
        with self._cond:
            use_tokens = self._use_tokens
            seen = self._first_token_seen
            fresh = [i for i in ids if i not in seen] if use_tokens else []
        for start in range(0, len(fresh), _COMPLETE_CHUNK):
            chunk = fresh[start : start + _COMPLETE_CHUNK]
            self._lg.FirstTokenComplete([make(i, 0, 0, FAILED_SAMPLE_TOKENS) for i in chunk])
        for start in range(0, len(ids), _COMPLETE_CHUNK):
            chunk = list(ids[start : start + _COMPLETE_CHUNK])
            if use_tokens:
                self._lg.QuerySamplesComplete([make(i, 0, 0, FAILED_SAMPLE_TOKENS) for i in chunk])
            else:
                self._lg.QuerySamplesComplete([make(i, 0, 0) for i in chunk])


# --- the session process -----------------------------------------------------------------------


class SessionWorker:
    """Set-up and the test loop of one session process."""

    def __init__(self, open_command: protocol.OpenSession, events: protocol.EventWriter) -> None:
        self.session_id = open_command.session_id
        self.sut_address = open_command.sut_address
        self.dataset = common_pb2.DatasetSpec.FromString(open_command.dataset)
        self.options = loadgen_agent_pb2.DataPlaneOptions.FromString(open_command.data_plane)
        self.progress_interval_s = open_command.progress_interval_s
        self.connect_timeout_s = open_command.sut_connect_timeout_s
        self.session_dir = open_command.session_dir
        self.dataset_cache_dir = Path(open_command.dataset_cache_dir) if open_command.dataset_cache_dir else None
        self.max_dataset_bytes: int | None = open_command.max_dataset_bytes
        self.dataset_roots = [Path(root) for root in open_command.dataset_roots]
        self.events = events
        self.tests: queue.SimpleQueue[protocol.RunTest] = queue.SimpleQueue()
        # Tests received and not finished (queued or running), and those of them cancelled.
        self._known_tests: set[str] = set()
        self._cancelled_tests: set[str] = set()
        self._current_test = ""
        self._lock = threading.Lock()
        self.data_plane: RelayClient | DirectClient | None = None
        self._clock = SampleClock()
        self._sut: Any = None
        self._qsl: Any = None
        self._status_stub: sut_agent_pb2_grpc.SutAgentStub | None = None
        # What the direct client was built for (endpoint, server type, config), to follow changes.
        self._direct_key = b""

    def setup(self) -> None:
        import mlperf_loadgen as lg

        started = time.monotonic()
        samples = load_samples(self.dataset, self.dataset_cache_dir, self.max_dataset_bytes, self.dataset_roots)
        channel = open_channel(self.sut_address)
        wait_until_serving(channel, timeout=self.connect_timeout_s)
        stub = sut_agent_pb2_grpc.SutAgentStub(channel)
        self._status_stub = stub
        # Both data planes complete samples through the LoadGen they are given: this one stamps
        # every completion on the sample clock, whichever path and thread completes it.
        recording = RecordingLoadGen(lg, self._clock)
        data_plane: RelayClient | DirectClient = self._direct_client(stub, samples, recording) or RelayClient(
            stub, samples, self.options, self.sut_address, recording
        )
        # Only now is the path known: a field only the other path applies is refused, not ignored.
        unapplied = path_option_violations(self.options, direct=isinstance(data_plane, DirectClient))
        if unapplied:
            if isinstance(data_plane, DirectClient):
                data_plane.server.close()
            channel.close()
            raise InvalidArgument(unapplied)
        data_plane.on_abort = self._on_abort
        self.data_plane = data_plane
        clock = self._clock

        def issue(ids: Sequence[int], indices: Sequence[int]) -> None:
            clock.issued(ids)
            data_plane.issue(ids, indices)

        def issue_samples(query_samples: Sequence[Any]) -> None:
            """ConstructSUT's and ConstructQDL's issue callback (QuerySample objects)."""
            issue([sample.id for sample in query_samples], [sample.index for sample in query_samples])

        interface = self.options.sut_interface
        if interface == loadgen_agent_pb2.SUT_INTERFACE_STANDARD:
            self._sut = lg.ConstructSUT(issue_samples, data_plane.flush)
        elif interface == loadgen_agent_pb2.SUT_INTERFACE_NETWORK_QDL:
            self._sut = lg.ConstructQDL(issue_samples, data_plane.flush, self._qdl_name)
        else:
            self._sut = lg.ConstructFastSUT(issue, data_plane.flush)
        self._qsl = lg.ConstructQSL(len(samples), len(samples), _no_op, _no_op)
        data_plane.start()
        start_thread("monitor", self._monitor)
        setup_s = time.monotonic() - started
        log.info("session_ready", samples=len(samples), setup_s=round(setup_s, 3), sut=self.sut_address)
        self.events.send(protocol.SessionReady(setup_time_s=setup_s, sample_count=len(samples), pid=os.getpid()))

    def _direct_client(
        self, stub: sut_agent_pb2_grpc.SutAgentStub, samples: Sequence[bytes], loadgen: Any
    ) -> DirectClient | None:
        """The direct client path, for an external server whose type has a client half, unless the
        relay is asked for (GRPC, TCP); DIRECT asked for and not possible is an error."""
        transport = self.options.transport
        relay = (loadgen_agent_pb2.DATA_PLANE_TRANSPORT_GRPC, loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP)
        if transport in relay:
            return None
        status = stub.GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10).status
        target = self._direct_target(status, samples, transport == loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT)
        if target is None:
            return None
        server, url = target
        self._direct_key = _direct_key(status)
        timeout_s = durations.to_seconds(self.options.response_timeout) or DEFAULT_RESPONSE_TIMEOUT_S
        return DirectClient(
            server, url, samples, timeout_s, FAILED_SAMPLE_TOKENS, TestCounters, self.options.max_in_flight,
            self.options.ramp if self.options.HasField("ramp") else None, loadgen,
        )

    def _direct_target(
        self, status: sut_agent_pb2.SutStatus, samples: Sequence[bytes], asked: bool
    ) -> tuple[ServerType, str] | None:
        """The server type (its client half ready) and URL of the external server `status` names;
        None when it has none (FailedPrecondition instead when `asked`)."""
        config = status.config.external if status.config.WhichOneof("backend") == "external" else None
        server_class = load_server_type(status.server_type) if status.server_type else None
        if config is None or not status.server_endpoint or server_class is None:
            if asked:
                raise FailedPrecondition(
                    f"the SUT agent at {self.sut_address} serves no external server to reach directly "
                    f"(backend {status.backend or 'none'})"
                )
            return None
        timeout_s = durations.to_seconds(self.options.response_timeout) or DEFAULT_RESPONSE_TIMEOUT_S
        # Where this client reaches the server (in the netns topology, not the server's own
        # 0.0.0.0), for what the client half reads from it first (KServe's model metadata) too.
        url = reachable_endpoint(status.server_endpoint, split_address(self.sut_address)[0])
        server = server_class(url, config.model, dict(config.options), timeout_s, 1, "config.external.options")
        try:
            server.prepare_client(time.monotonic() + min(timeout_s, 30.0))
            first = samples[0] if samples else b""
            has_client = server.http_call(first) is not None or server.grpc_call(first) is not None
        except (ServerError, MecbenchError) as exc:
            server.close()
            if asked:
                raise FailedPrecondition(f"the direct client to {status.server_endpoint} cannot start: {exc}") from None
            log.warning("direct_client_unavailable", endpoint=status.server_endpoint, error=str(exc))
            return None
        if not has_client:
            server.close()
            if asked:
                raise FailedPrecondition(f"server type {server.name!r} has no direct client; use the relay")
            return None
        log.info("direct_client", server_type=server.name, url=url, endpoint=status.server_endpoint)
        return server, url

    def _follow_server(self, client: DirectClient) -> None:
        """Before each test: the session outlives a SUT agent's restart of its server (a new port,
        config or server type); the direct client follows it. A SUT agent that no longer serves
        an external server ends this session's use (FailedPrecondition)."""
        assert self._status_stub is not None
        status = self._status_stub.GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10).status
        key = _direct_key(status)
        if key == self._direct_key:
            return
        target = self._direct_target(status, client.samples, asked=True)
        assert target is not None
        client.retarget(*target)
        self._direct_key = key

    def _qdl_name(self) -> str:
        """QDL's Name callback: a real round trip to the SUT agent, as MLPerf's network division asks."""
        assert self._status_stub is not None
        try:
            status = self._status_stub.GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10).status
            return f"mecbench-qdl:{status.backend or 'sut'}@{self.sut_address}"
        except grpc.RpcError as exc:
            log.warning("qdl_name_failed", error=exc.code().name)
            return f"mecbench-qdl:unreachable@{self.sut_address}"

    def _on_abort(self, error: MecbenchError) -> None:
        with self._lock:
            test_id = self._current_test
        self.events.send(protocol.TestAborting(test_id, protocol.WireError.of(error)))

    def enqueue(self, command: protocol.RunTest) -> None:
        with self._lock:
            self._known_tests.add(command.test_id)
        self.tests.put(command)

    def cancel(self, test_id: str) -> None:
        """Cancel a queued or running test; a test that is not (or no longer) known is left alone."""
        with self._lock:
            if test_id not in self._known_tests:
                return
            self._cancelled_tests.add(test_id)
            running = test_id == self._current_test
        if running and self.data_plane is not None:
            self.data_plane.abort(None, cancelled=True)

    def _is_cancelled(self, test_id: str) -> bool:
        with self._lock:
            return test_id in self._cancelled_tests

    def _monitor(self) -> None:
        assert self.data_plane is not None
        data_plane = self.data_plane
        next_progress = 0.0
        while True:
            time.sleep(0.05)
            with self._lock:
                test_id = self._current_test
            if not test_id or not data_plane.is_active():
                next_progress = time.monotonic() + self.progress_interval_s
                continue
            outstanding, idle_s = data_plane.outstanding()
            if outstanding and idle_s > data_plane.response_timeout_s:
                data_plane.abort(
                    DeadlineExceeded(
                        f"no response from the SUT agent at {self.sut_address} for "
                        f"{data_plane.response_timeout_s:g}s with {outstanding} samples in flight; test aborted"
                    )
                )
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + self.progress_interval_s
                counters = data_plane.counters
                self.events.send(protocol.TestProgress(test_id, now, counters.issued, counters.completed))

    def run_test(self, command: protocol.RunTest) -> None:
        test_id = command.test_id
        with self._lock:
            self._current_test = test_id
        try:
            self._run_test(command, test_id)
        finally:
            with self._lock:
                self._current_test = ""
                self._known_tests.discard(test_id)
                self._cancelled_tests.discard(test_id)

    def _run_test(self, command: protocol.RunTest, test_id: str) -> None:
        import mlperf_loadgen as lg

        assert self.data_plane is not None
        outdir = Path(command.outdir)
        settings = common_pb2.LoadGenSettings.FromString(command.settings)
        if self._is_cancelled(test_id):
            self.events.send(protocol.TestFinished(test_id, ran=False, cancelled=True))
            return
        try:
            conf_dir = Path(command.conf_dir)
            conf_dir.mkdir(parents=True, exist_ok=True)
            test_settings = build_test_settings(settings, conf_dir)
        except MecbenchError as exc:
            self.events.send(protocol.TestFinished(test_id, ran=False, error=protocol.WireError.of(exc)))
            return
        outdir.mkdir(parents=True, exist_ok=True)
        output = lg.LogOutputSettings()
        output.outdir = str(outdir)
        output.copy_summary_to_stdout = False
        output.copy_detail_to_stdout = False
        log_settings = lg.LogSettings()
        log_settings.log_output = output
        record_latencies = command.record_latencies
        # Each sample's latency, for pooling clients: kept by the client's own clock against
        # LoadGen's schedule (loadgen_agent.sample_clock), which costs LoadGen nothing; where the
        # clock cannot tell the scheduled time (Offline), from LoadGen's trace, parsed afterwards.
        clocked = record_latencies and measures(test_settings)
        log_settings.enable_trace = record_latencies and not clocked
        self._clock.begin(test_settings, active=clocked)
        want_data = (
            test_settings.mode in (lg.TestMode.AccuracyOnly, lg.TestMode.SubmissionRun)
            or test_settings.accuracy_log_probability > 0
            or test_settings.accuracy_log_sampling_target > 0
        )
        if isinstance(self.data_plane, DirectClient):
            try:
                self._follow_server(self.data_plane)
            except (MecbenchError, grpc.RpcError) as exc:
                failure = exc if isinstance(exc, MecbenchError) else Unavailable(f"SUT agent at {self.sut_address}")
                self.events.send(protocol.TestFinished(test_id, ran=False, error=protocol.WireError.of(failure)))
                return
        self.data_plane.begin_test(want_data, bool(test_settings.use_token_latencies))
        if self._is_cancelled(test_id):  # cancelled while the settings were built
            self.data_plane.abort(None, cancelled=True)
        effective = describe_test_settings(test_settings)
        started = time.monotonic()
        self.events.send(protocol.TestStarted(test_id, started, effective))
        # LoadGen issues the Server scenario's queries from this thread (the one calling StartTest).
        issue_slack_ns = set_timer_slack_ns(durations.to_ns(self.options.issue_slack))
        try:
            lg.StartTestWithLogSettings(self._sut, self._qsl, test_settings, log_settings)
        finally:
            set_timer_slack_ns(0)
            wall_s = time.monotonic() - started
            counters, cancelled, error = self.data_plane.end_test()
        log.info("test_finished", test_id=test_id, wall_s=round(wall_s, 3), cancelled=cancelled, error=str(error or ""))
        llm_metrics: dict[str, float] = {}
        if isinstance(self.data_plane, DirectClient):
            records = self.data_plane.take_records()
            try:
                write_records(records, outdir)
            except OSError as exc:
                log.warning("llm_records_unwritable", test_id=test_id, error=str(exc))
            llm_metrics = compute_metrics(
                records, durations.to_seconds(settings.ttft_latency), durations.to_seconds(settings.tpot_latency)
            )
            llm_metrics.update(self.data_plane.stage_metrics(records))
        elif self.data_plane.token_rows:
            try:
                write_token_latencies(self.data_plane.token_rows, outdir)
            except OSError as exc:
                log.warning("token_latencies_unwritable", test_id=test_id, error=str(exc))
        trace = outdir / TRACE_FILE
        try:
            if clocked:
                self._clock.write(outdir / SAMPLE_LATENCIES_NAME, _summary_mean_ns(outdir))
            elif record_latencies and trace.is_file():
                extract_sample_latencies(trace, outdir / SAMPLE_LATENCIES_NAME)
        except (OSError, ValueError) as exc:
            log.warning("sample_latencies_unreadable", test_id=test_id, error=str(exc))
        by_kind, messages = counters.errors.snapshot()
        self.events.send(
            protocol.TestFinished(
                test_id,
                ran=True,
                cancelled=cancelled,
                error=protocol.WireError.of(error) if error is not None else None,
                wall_s=wall_s,
                batches_sent=counters.batches_sent,
                samples_sent=counters.samples_sent,
                sample_errors=counters.sample_errors,
                first_sample_error=counters.first_sample_error,
                failed_samples_by_kind=tuple(by_kind.items()),
                sample_error_messages=tuple(messages),
                llm_metrics=tuple(llm_metrics.items()),
                issued=counters.issued,
                completed=counters.completed,
                issue_slack_ns=issue_slack_ns,
            )
        )

    def serve(self) -> None:
        while True:
            command = self.tests.get()
            self.run_test(command)


def _direct_key(status: sut_agent_pb2.SutStatus) -> bytes:
    config = status.config.SerializeToString(deterministic=True)
    return b"|".join([status.server_endpoint.encode(), status.server_type.encode(), config])


def _summary_mean_ns(outdir: Path) -> int | None:
    """LoadGen's mean latency from the test's summary, or None when it wrote none."""
    try:
        fields = parse_summary_fields((outdir / SUMMARY_FILE).read_text())
    except OSError:
        return None
    value = fields.get("Mean latency (ns)", "")
    return int(value) if value.isdigit() else None


def _no_op(_samples: Any) -> None:
    """QSL load/unload callbacks: every sample is in memory for the whole session."""


def _read_commands(stream: IO[bytes], worker: SessionWorker) -> None:
    """The command reader: queues tests, forwards cancels, ends the process at close or EOF."""
    try:
        while True:
            command = protocol.read_command(stream)
            if command is None:
                # The agent is gone without closing the session (killed): clean up after it.
                if worker.session_dir:
                    shutil.rmtree(worker.session_dir, ignore_errors=True)
                break
            if isinstance(command, protocol.CloseSession):
                break
            if isinstance(command, protocol.RunTest):
                worker.enqueue(command)
            elif isinstance(command, protocol.CancelTest):
                worker.cancel(command.test_id)
    except Exception:
        log.exception("command_stream_failed")
    # The agent closed the session or is gone: nothing left to do. os._exit, because LoadGen may
    # be inside StartTest on the main thread and would never return to a normal shutdown.
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    # The protocol owns the original stdout; everything else printed (LoadGen's own messages)
    # goes to stderr with the logs.
    events_fd = os.dup(1)
    os.dup2(2, 1)
    commands = os.fdopen(os.dup(0), "rb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    events = protocol.EventWriter(os.fdopen(events_fd, "wb", buffering=0))
    try:
        open_command = protocol.read_command(commands)
    except protocol.ProtocolError as exc:
        sys.stderr.write(f"loadgen_agent.worker: {exc}\n")
        open_command = None
    if not isinstance(open_command, protocol.OpenSession):
        sys.stderr.flush()
        os._exit(2)
    configure_logging(level=open_command.log_level, json_output=True)
    structlog.contextvars.bind_contextvars(session_id=open_command.session_id)
    worker = SessionWorker(open_command, events)
    start_thread("commands", _read_commands, commands, worker)
    try:
        worker.setup()
    except (MecbenchError, grpc.RpcError) as exc:
        error = exc if isinstance(exc, MecbenchError) else Unavailable(f"SUT agent at {worker.sut_address}: {exc}")
        log.warning("session_open_failed", error=str(error))
        events.send(protocol.OpenFailed(protocol.WireError.of(error)))
        sys.stderr.flush()
        os._exit(3)
    except Exception as exc:
        events.send(protocol.WorkerFatal(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise
    try:
        worker.serve()
    except Exception as exc:
        log.exception("session_worker_failed")
        with contextlib.suppress(Exception):
            events.send(protocol.WorkerFatal(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
