"""The direct client path: LoadGen's queries go straight to the external inference server, in
the server's own protocol (OpenAI SSE, Ollama NDJSON), with no relay in between.

The SUT agent starts the server, probes it and keeps its lifecycle; this client reaches it at
the endpoint the agent reports (SutStatus.server_endpoint), with the host the LoadGen session
reaches the agent at when the server listens on a loopback or wildcard address (the netns
topology's data IP), so the client's real HTTP exchange crosses the (shaped) network, each
streamed chunk paying the link as a phone's client would.

One asyncio event loop (uvloop's) per LoadGen process, on its own thread for the life of the
process (the thread completes samples, see worker.py on LoadGen's thread-local loggers), with one
pool of keep-alive HTTP/1.1 connections (http1.py: each request's bytes built once per sample,
each answer read to its end so its connection can be reused, a streamed body cut into lines and
decoded as its pieces arrive, inside the protocol's data_received; it took 0.35 cores at 800
requests/s where aiohttp took 0.48-0.52 in the same bench, bench/llm.py) and a grpc.aio channel
for gRPC server types. LoadGen's issue callback only appends to a queue and wakes the loop; each
sample is one request task. The first text of a streamed answer is the sample's first token (FirstTokenComplete), for
TTFT and TPOT; a failed request completes with LoadGen's token rules kept (see worker.py,
FAILED_SAMPLE_TOKENS) and is counted by kind. Every request leaves a record (llm_records.py).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import grpc.aio
import numpy as np

from loadgen_agent.http1 import Http1Pool, request_bytes
from loadgen_agent.llm_records import RequestRecord, StageSpan, compute_stage_metrics
from mecbench.core.errors import MecbenchError
from mecbench.core.logging import get_logger
from mecbench.servers.base import AnswerDecoder, GrpcCall, HttpCall, ServerError, ServerType
from mecbench.servers.errors import error_kind
from mecbench.servers.http import base_url
from mecbench.v1 import loadgen_agent_pb2

log = get_logger("mecbench.loadgen.direct")

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "::", "::1", ""})
_ERROR_TEXT_LIMIT = 500


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (a dependency on Linux: it cut the client's CPU per
    request by about a seventh, bench/llm.py), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def reachable_endpoint(server_endpoint: str, sut_host: str) -> str:
    """The server's URL as this client reaches it: a loopback or wildcard host is replaced by the
    host this client reaches the SUT agent at (the same machine or namespace as the server)."""
    parts = urlsplit(base_url(server_endpoint))
    host = parts.hostname or ""
    if host not in _LOOPBACK_HOSTS or sut_host in _LOOPBACK_HOSTS:
        return urlunsplit(parts)
    netloc = f"[{sut_host}]" if ":" in sut_host else sut_host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def http_error_text(status: int, body: bytes) -> str:
    """`HTTP <status>: <the server's words>` (OpenAI's {"error": {"message"}} unwrapped)."""
    import json

    text = body.decode("utf-8", "replace").strip()
    try:
        decoded = json.loads(text)
        error = decoded.get("error", decoded) if isinstance(decoded, dict) else decoded
        if isinstance(error, dict):
            error = error.get("message", error)
        text = str(error)
    except ValueError:
        pass
    return f"HTTP {status}: {text[:_ERROR_TEXT_LIMIT]}"


class DirectClient:
    """LoadGen's SUT callbacks for an external server reached directly; the same interface as
    worker.RelayClient (issue, flush, start, begin_test, end_test, abort, outstanding, ...)."""

    def __init__(
        self,
        server: ServerType,
        url: str,
        samples: Sequence[bytes],
        response_timeout_s: float,
        failed_sample_tokens: int,
        counters_factory: Callable[[], Any],
        max_in_flight: int = 0,
        ramp: loadgen_agent_pb2.LoadRamp | None = None,
        loadgen: Any = None,
    ) -> None:
        import mlperf_loadgen

        # The mlperf_loadgen module, or a stand-in for it (the worker's RecordingLoadGen).
        self._lg = mlperf_loadgen if loadgen is None else loadgen
        self.server = server
        self.url = url.rstrip("/")
        self.samples = samples
        self.response_timeout_s = response_timeout_s
        self._failed_tokens = failed_sample_tokens
        # Concurrency mode: at most this many requests running (0: no bound).
        self.max_in_flight = max_in_flight
        self._running = 0
        # A load ramp (Offline scenario): the samples issued at once are sent stage by stage.
        self.stages = [
            StageSpan(stage.rate, stage.concurrency, stage.duration.ToNanoseconds())
            for stage in (ramp.stages if ramp else [])
        ]
        self._uniform_arrivals = bool(ramp and ramp.uniform_arrivals)
        self._ramp_seed = ramp.seed if ramp else 0
        self._ramp_task: asyncio.Task[None] | None = None
        self._ramp_wake: asyncio.Event | None = None
        self._counters_factory = counters_factory
        self.counters = counters_factory()
        self.on_abort: Callable[[MecbenchError], None] | None = None
        self._lock = threading.Lock()
        # Held around a FirstTokenComplete and around an abort's taking of the samples in flight,
        # so LoadGen never hears of a first token for a sample it was already told is complete
        # (taken before `_lock`, never while holding it).
        self._token_lock = threading.Lock()
        self._pending: deque[tuple[int, int, int]] = deque()
        self._wake_scheduled = False
        # wire id -> (LoadGen response id, record); a sample completes only while listed here.
        self._in_flight: dict[int, tuple[int, RequestRecord]] = {}
        self._wire_ids = itertools.count(1)
        self._first_token_seen: set[int] = set()
        self._records: list[RequestRecord] = []
        self._test_active = False
        self._aborting = False
        self._cancelled = False
        self._abort_error: MecbenchError | None = None
        self._want_data = False
        self._use_tokens = False
        self._last_activity = time.monotonic()
        self._loop = new_event_loop()
        # Each request's task and when it went out (monotonic ns), for the timeout sweep.
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._timed_out: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        # A sample's request is the same every time it is issued: built once (the body's JSON).
        # As it goes on the wire (HTTP: the whole request's bytes), built once.
        self._calls: dict[int, tuple[HttpCall | GrpcCall, bytes]] = {}
        self._pool: Http1Pool | None = None
        # gRPC server types: one grpc.aio channel on the loop, its methods by name (bytes in/out).
        self._grpc_channel: grpc.aio.Channel | None = None
        self._grpc_methods: dict[str, Any] = {}

    # LoadGen side --------------------------------------------------------------------------

    def issue(self, ids: Sequence[int], indices: Sequence[int]) -> None:
        now = time.monotonic_ns()
        with self._lock:
            self.counters.issued += len(ids)
            if not self._aborting:
                if not self._pending and not self._in_flight:
                    self._last_activity = time.monotonic()
                self._pending.extend(zip(ids, indices, itertools.repeat(now), strict=False))
                if not self._wake_scheduled:
                    self._wake_scheduled = True
                    self._loop.call_soon_threadsafe(self._take_pending)
                return
        self._complete_now(list(ids))

    def flush(self) -> None:
        """Nothing is held back."""

    # The event loop ------------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._run_loop, name="direct-client", daemon=True).start()
        self._ready.wait(30)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_later(self._sweep_interval_s(), self._sweep_timeouts)
        self._ready.set()
        self._loop.run_forever()

    def _open_pool(self) -> Http1Pool:
        """Keep-alive connections to the server, any number: LoadGen's arrivals decide the
        concurrency, as a crowd of users would."""
        parts = urlsplit(self.url)
        tls = parts.scheme == "https"
        self._pool = Http1Pool(parts.hostname or "", parts.port or (443 if tls else 80), tls, self._loop)
        return self._pool

    def _sweep_interval_s(self) -> float:
        return min(max(self.response_timeout_s / 20, 0.01), 0.5)

    def _sweep_timeouts(self) -> None:
        """Cancel the requests out for longer than the response timeout (each then fails as a
        timeout); runs every twentieth of the timeout (at most every 0.5 s)."""
        limit = time.monotonic_ns() - int(self.response_timeout_s * 1e9)
        for task, sent_ns in list(self._tasks.items()):
            if sent_ns < limit and task not in self._timed_out:
                self._timed_out.add(task)
                task.cancel()
        self._loop.call_later(self._sweep_interval_s(), self._sweep_timeouts)

    def _take_pending(self) -> None:
        if self.stages:
            with self._lock:
                self._wake_scheduled = False
                start = (self._ramp_task is None or self._ramp_task.done()) and bool(self._pending)
            if start:
                self._ramp_task = self._loop.create_task(self._run_ramp())
            return
        with self._lock:
            self._wake_scheduled = False
            if self.max_in_flight:
                room = max(0, self.max_in_flight - self._running)
                taken = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            else:
                taken = list(self._pending)
                self._pending.clear()
            started = self._started(taken, -1)
        create_task = self._loop.create_task
        for wire_id, record in started:
            create_task(self._request(wire_id, record))

    def _started(self, taken: Sequence[tuple[int, int, int]], stage: int) -> list[tuple[int, RequestRecord]]:
        """In flight from now (under `_lock`): each taken sample's wire id and record."""
        self._running += len(taken)
        started: list[tuple[int, RequestRecord]] = []
        for response_id, index, issued_ns in taken:
            wire_id = next(self._wire_ids)
            record = RequestRecord(index, issued_ns, stage=stage)
            self._in_flight[wire_id] = (response_id, record)
            started.append((wire_id, record))
        return started

    def _launch(self, count: int, stage: int) -> bool:
        """Send up to `count` pending samples as requests of ramp stage `stage`; False when none
        is left to send."""
        with self._lock:
            taken = [self._pending.popleft() for _ in range(min(count, len(self._pending)))]
            started = self._started(taken, stage)
            left = bool(self._pending)
            if started and not self._running - len(started):
                self._last_activity = time.monotonic()  # the server's wait starts now
        for wire_id, record in started:
            self._loop.create_task(self._request(wire_id, record))
        return left

    async def _run_ramp(self) -> None:
        """Send the pending samples stage by stage: a rate stage starts requests at its rate
        (Poisson or evenly spaced arrivals), a concurrency stage keeps its count in flight, each
        for its duration; the last stage goes on until no sample is left. Each stage's span is
        kept (StageSpan.start_ns/end_ns) for its figures."""
        rng = np.random.default_rng(self._ramp_seed)
        wake = self._ramp_wake = asyncio.Event()
        left = True
        for index, stage in enumerate(self.stages):
            last = index == len(self.stages) - 1
            stage.start_ns = time.monotonic_ns()
            end_ns = stage.start_ns + stage.duration_ns
            stage.end_ns = end_ns
            if not left:
                stage.end_ns = stage.start_ns
                continue
            if stage.rate:
                gap_s = 1.0 / stage.rate
                offset_s = 0.0
                for arrival in itertools.count():
                    if not left:
                        break
                    # Evenly spaced: the k-th at k gaps from the stage's start; Poisson: a gap in.
                    if self._uniform_arrivals:
                        offset_s = arrival * gap_s
                    else:
                        offset_s += rng.exponential(gap_s)
                    due_ns = stage.start_ns + round(offset_s * 1e9)
                    if due_ns >= end_ns and not last:
                        break
                    delay_s = (due_ns - time.monotonic_ns()) / 1e9
                    if delay_s > 0:
                        await asyncio.sleep(delay_s)
                    left = self._launch(1, index)
                    stage.end_ns = max(end_ns, time.monotonic_ns())
            else:
                timer = self._loop.call_later(stage.duration_ns / 1e9, wake.set)
                try:
                    while left and (last or time.monotonic_ns() < end_ns):
                        with self._lock:
                            room = stage.concurrency - self._running
                        if room > 0:
                            left = self._launch(room, index)
                        wake.clear()
                        await wake.wait()
                finally:
                    timer.cancel()
                stage.end_ns = max(end_ns, time.monotonic_ns()) if last else end_ns
            if not left and stage.end_ns > time.monotonic_ns():
                stage.end_ns = time.monotonic_ns()  # nothing left to send: the stage ends here

    async def _request(self, wire_id: int, record: RequestRecord) -> None:
        task = asyncio.current_task()
        assert task is not None
        record.sent_ns = time.monotonic_ns()
        self._tasks[task] = record.sent_ns
        try:
            await self._exchange(wire_id, record)
        finally:
            del self._tasks[task]
            self._timed_out.discard(task)
            with self._lock:
                self._running -= 1
                more = bool(self._pending) and bool(self.max_in_flight)
            if more:
                self._take_pending()
            elif self._ramp_wake is not None:
                self._ramp_wake.set()

    async def _exchange(self, wire_id: int, record: RequestRecord) -> None:
        error = ""
        try:
            built = self._calls.get(record.sample_index)
            if built is None:
                sample = self.samples[record.sample_index]
                made: HttpCall | GrpcCall | None = self.server.http_call(sample) or self.server.grpc_call(sample)
                if made is None:
                    raise ServerError(f"server type {self.server.name!r} has no client half")
                if isinstance(made, HttpCall):
                    parts = urlsplit(self.url)
                    wire = request_bytes(made.method, parts.netloc, parts.path + made.path, made.body, made.headers)
                    built = (made, wire)
                else:
                    built = (made, b"")
                self._calls[record.sample_index] = built
            call, wire = built
            decoder = self.server.decoder()
            if isinstance(call, GrpcCall):
                answer = await self._grpc_method(call.method)(call.body, timeout=self.response_timeout_s)
                record.response_bytes = len(answer)
                decoder.whole(answer)
                record.first_token_ns = 0
                self._finish(wire_id, record, decoder.output(), 0)
                return
            pool = self._pool or self._open_pool()
            # The body is read to its end (past the protocol's end marker), so the connection
            # goes back to the pool clean.
            stream = _Lines(self, wire_id, record, decoder) if call.streamed else None
            answer = await pool.exchange(wire, stream.feed if stream is not None else None)
            if answer.status >= 300:
                raise ServerError(f"{call.method} {call.path}: {http_error_text(answer.status, answer.body)}")
            if stream is not None:
                stream.end()
            else:
                record.response_bytes = len(answer.body)
                decoder.whole(answer.body, answer.headers)
            _, tokens = decoder.result()
            record.output_tokens = tokens
            record.input_tokens = decoder.input_tokens or 0
            self._finish(wire_id, record, decoder.output(), tokens)
            return
        except asyncio.CancelledError:
            if asyncio.current_task() not in self._timed_out:
                raise
            error = f"timed out after {self.response_timeout_s:g}s"
        except ServerError as exc:
            error = str(exc)
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        except TimeoutError:
            error = f"timed out after {self.response_timeout_s:g}s"
        except OSError as exc:
            error = f"connection: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure is a failed sample, never a dead loop
            error = f"{type(exc).__name__}: {exc}"
        record.error = error[:1000]
        record.error_kind = error_kind(error)
        self._finish(wire_id, record, b"", 0, failed=True)

    def retarget(self, server: ServerType, url: str) -> None:
        """Speak to another server from the next test on (the SUT agent restarted or replaced
        its server): requests built for the old one are dropped, its gRPC channel closed."""
        log.info("direct_client_retargeted", server_type=server.name, url=url, previous=self.url)
        old_channel = self._grpc_channel

        def switch() -> None:
            self.server.close()
            self.server = server
            self.url = url.rstrip("/")
            self._calls.clear()
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self._grpc_methods.clear()
            self._grpc_channel = None
            if old_channel is not None:
                self._loop.create_task(old_channel.close())

        done = threading.Event()

        def run() -> None:
            try:
                switch()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def _grpc_method(self, name: str) -> Any:
        """The unary method `name` on the loop's gRPC channel (plaintext: the inference server is
        not MECBench's own, so MECBench's TLS identity does not apply to it)."""
        method = self._grpc_methods.get(name)
        if method is None:
            if self._grpc_channel is None:
                self._grpc_channel = grpc.aio.insecure_channel(urlsplit(self.url).netloc)
            method = self._grpc_methods[name] = self._grpc_channel.unary_unary(name)
        return method

    def _on_text(self, wire_id: int, record: RequestRecord) -> None:
        now = time.monotonic_ns()
        if record.first_token_ns:
            record.later_tokens_ns.append(now)
            return
        record.first_token_ns = now
        with self._token_lock:
            with self._lock:
                entry = self._in_flight.get(wire_id)
                self._last_activity = time.monotonic()
                if entry is None or not self._use_tokens:
                    return
                self._first_token_seen.add(entry[0])
            self._lg.FirstTokenComplete([self._lg.QuerySampleResponse(entry[0], 0, 0)])

    def _finish(self, wire_id: int, record: RequestRecord, output: bytes, tokens: int, failed: bool = False) -> None:
        record.ended_ns = time.monotonic_ns()
        with self._lock:
            entry = self._in_flight.pop(wire_id, None)
            if entry is None:
                return  # answered already (abort, cancel): dropped
            response_id = entry[0]
            self._last_activity = time.monotonic()
            self.counters.completed += 1
            self._records.append(record)
            use_tokens = self._use_tokens
            first_seen = response_id in self._first_token_seen
            self._first_token_seen.discard(response_id)
            want_data = self._want_data
            if failed:
                self.counters.sample_errors += 1
                if not self.counters.first_sample_error:
                    self.counters.first_sample_error = record.error
        if failed:
            self.counters.errors.add(record.error, kind=record.error_kind)
        if failed or tokens < self._failed_tokens:
            # LoadGen's rule (worker.py, FAILED_SAMPLE_TOKENS): a sample counts more than one
            # token, or its TPOT goes negative; an answer of 0 or 1 tokens (the model's end of
            # text at once) is given LoadGen's least, its record keeps the server's count.
            tokens = self._failed_tokens
        make = self._lg.QuerySampleResponse
        if use_tokens and not first_seen:
            self._lg.FirstTokenComplete([make(response_id, 0, 0, tokens)])
        owner = np.frombuffer(output, dtype=np.uint8) if want_data and output else None
        pointer, size = (owner.ctypes.data, owner.size) if owner is not None else (0, 0)
        if use_tokens:
            self._lg.QuerySamplesComplete([make(response_id, pointer, size, tokens)])
        else:
            self._lg.QuerySamplesComplete([make(response_id, pointer, size)])
        del owner

    # Tests -----------------------------------------------------------------------------------

    def begin_test(self, want_data: bool, use_tokens: bool = False) -> None:
        with self._lock:
            self.counters = self._counters_factory()
            self._test_active = True
            self._aborting = False
            self._cancelled = False
            self._abort_error = None
            self._want_data = want_data
            self._use_tokens = use_tokens
            self._first_token_seen = set()
            self._records = []
            self._last_activity = time.monotonic()
            self._ramp_task = None
            for stage in self.stages:
                stage.start_ns = stage.end_ns = 0

    def end_test(self) -> tuple[Any, bool, MecbenchError | None]:
        with self._lock:
            self._test_active = False
            self._aborting = False
            self._pending.clear()
            self._in_flight.clear()
            self._first_token_seen = set()
            return self.counters, self._cancelled, self._abort_error

    def stage_metrics(self, records: Sequence[RequestRecord]) -> dict[str, float]:
        """The load ramp's figures per stage (none without a ramp), from the test's records."""
        return compute_stage_metrics(records, self.stages) if self.stages else {}

    def take_records(self) -> list[RequestRecord]:
        with self._lock:
            records, self._records = self._records, []
        return records

    def outstanding(self) -> tuple[int, float]:
        """Samples waiting on the server, and how long since it last answered anything (or a ramp
        last sent): the monitor's response timeout. A ramp's samples not yet due wait on no one."""
        with self._lock:
            waiting = len(self._in_flight) + (0 if self.stages else len(self._pending))
            return waiting, time.monotonic() - self._last_activity

    def is_active(self) -> bool:
        with self._lock:
            return self._test_active

    def abort(self, error: MecbenchError | None, cancelled: bool = False) -> bool:
        with self._token_lock, self._lock:
            if not self._test_active:
                return False
            self._cancelled = self._cancelled or cancelled
            if self._aborting:
                return True
            self._aborting = True
            self._abort_error = error
            ids = [response_id for response_id, _, _ in self._pending]
            ids.extend(response_id for response_id, _ in self._in_flight.values())
            self._pending.clear()
            self._in_flight.clear()
            self.counters.completed += len(ids)
        log.info("test_aborting", cancelled=cancelled, outstanding=len(ids), error=str(error) if error else None)
        self._loop.call_soon_threadsafe(self._cancel_tasks)
        if error is not None:
            if ids:
                self.counters.errors.add(f"aborted: {error}", count=len(ids), kind="aborted")
            if self.on_abort is not None:
                self.on_abort(error)
        self._complete_now(ids)
        return True

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._ramp_task is not None:
            self._ramp_task.cancel()

    def _complete_now(self, ids: Sequence[int]) -> None:
        make = self._lg.QuerySampleResponse
        with self._lock:
            use_tokens = self._use_tokens
            fresh = [i for i in ids if i not in self._first_token_seen] if use_tokens else []
        if fresh:
            self._lg.FirstTokenComplete([make(i, 0, 0, self._failed_tokens) for i in fresh])
        if ids:
            if use_tokens:
                self._lg.QuerySamplesComplete([make(i, 0, 0, self._failed_tokens) for i in ids])
            else:
                self._lg.QuerySamplesComplete([make(i, 0, 0) for i in ids])


class _Lines:
    """A streamed answer's body, piece by piece as it arrives, cut into lines for the decoder;
    the first text is the sample's first token."""

    __slots__ = ("client", "decoder", "pending", "record", "wire_id")

    def __init__(self, client: DirectClient, wire_id: int, record: RequestRecord, decoder: AnswerDecoder) -> None:
        self.client = client
        self.wire_id = wire_id
        self.record = record
        self.decoder = decoder
        self.pending = b""

    def feed(self, data: bytes) -> None:
        self.record.response_bytes += len(data)
        lines = (self.pending + data if self.pending else data).split(b"\n")
        self.pending = lines.pop()
        decoder = self.decoder
        for line in lines:
            if line and not decoder.done and decoder.line(line.rstrip(b"\r")):
                self.client._on_text(self.wire_id, self.record)

    def end(self) -> None:
        if self.pending and not self.decoder.done and self.decoder.line(self.pending.rstrip(b"\r")):
            self.client._on_text(self.wire_id, self.record)
