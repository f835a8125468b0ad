"""A real LoadGen agent on an ephemeral loopback port, its sessions real processes, talking to a
real SUT agent over gRPC."""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from loadgen_agent.server import create_server
from loadgen_agent.settings import LoadGenAgentSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.core.server import RunningServer, build_server
from mecbench.v1 import common_pb2, loadgen_agent_pb2, loadgen_agent_pb2_grpc, sut_agent_pb2, sut_agent_pb2_grpc
from sut_agent.server import create_server as create_sut_server
from sut_agent.settings import SutAgentSettings
from tests.conftest import TEST_FILE_ROOT

# --- SUT agents ------------------------------------------------------------------------------------


class StandInSut(sut_agent_pb2_grpc.SutAgentServicer):
    """A small real SutAgent servicer for what the real SUT agent (sut_agent/) does not offer: it
    streams first tokens (`token_steps`), for the token-latency test, and records the samples it
    receives, to check the payloads the sessions send. It answers each batch after a constant
    service time, echoing the first `response_bytes` of each payload. Every other test talks to
    the real SUT agent with its synthetic backend.
    """

    def __init__(self, service_time_s: float, response_bytes: int = 8, token_steps: int = 0) -> None:
        self.service_time_s = service_time_s
        self.response_bytes = response_bytes
        self.token_steps = token_steps
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        # (sample index, payload) of every sample received.
        self.received: list[tuple[int, bytes]] = []
        threading.Thread(target=self._run_timers, daemon=True).start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _later(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._order), action))
            self._cond.notify()

    def _run_timers(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._closed:
                    return
                _, _, action = heapq.heappop(self._heap)
            action()

    def GetStatus(
        self, request: sut_agent_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> sut_agent_pb2.GetStatusResponse:
        return sut_agent_pb2.GetStatusResponse(
            status=sut_agent_pb2.SutStatus(state=sut_agent_pb2.BACKEND_STATE_READY, backend="stand-in")
        )

    def StreamInfer(
        self, request_iterator: Iterator[sut_agent_pb2.StreamInferRequest], context: grpc.ServicerContext
    ) -> Iterator[sut_agent_pb2.StreamInferResponse]:
        responses: queue.SimpleQueue[sut_agent_pb2.StreamInferResponse | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                for request in request_iterator:
                    self._answer(request.batch, responses)
            except grpc.RpcError:
                pass
            responses.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (response := responses.get()) is not None:
            yield response

    def _answer(
        self, batch: sut_agent_pb2.QueryBatch, responses: queue.SimpleQueue[sut_agent_pb2.StreamInferResponse | None]
    ) -> None:
        ids = list(batch.sample_ids)
        payloads = list(batch.payloads) or [b""] * len(ids)
        self.received.extend(zip(batch.sample_indices, payloads, strict=True))
        outputs = [p[: self.response_bytes] or b"\x00" * self.response_bytes for p in batch.payloads] or [
            b"\x01" * self.response_bytes
        ] * len(ids)
        if self.token_steps:
            first = sut_agent_pb2.ResponseBatch(sample_ids=ids, outputs=outputs, first_tokens=True)
            self._later(self.service_time_s / 2, lambda: responses.put(sut_agent_pb2.StreamInferResponse(batch=first)))
        done = sut_agent_pb2.ResponseBatch(
            sample_ids=ids,
            outputs=outputs,
            token_counts=[max(1, self.token_steps)] * len(ids) if self.token_steps else [],
        )
        self._later(self.service_time_s, lambda: responses.put(sut_agent_pb2.StreamInferResponse(batch=done)))


@dataclass
class SutServer:
    address: str
    stop: Callable[[], None]
    stand_in: StandInSut | None = None


def start_sut(mean_s: float, settings: SutAgentSettings | None = None) -> SutServer:
    """The real SUT agent with its synthetic backend: a constant service time of `mean_s`."""
    running, port = create_sut_server("127.0.0.1:0", settings)
    address = f"127.0.0.1:{port}"
    channel = open_channel(address)
    try:
        sut_agent_pb2_grpc.SutAgentStub(channel).Start(
            sut_agent_pb2.StartRequest(
                config=sut_agent_pb2.SutConfig(
                    synthetic=sut_agent_pb2.SyntheticBackendConfig(
                        distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT,
                        mean=durations.from_seconds(mean_s),
                        response_bytes=8,
                    )
                )
            ),
            timeout=30,
        )
    except BaseException:
        running.stop(0)
        raise
    finally:
        channel.close()
    return SutServer(address, lambda: running.stop(0.5))


def start_stand_in_sut(mean_s: float, token_steps: int = 0) -> SutServer:
    # Only GetStatus and StreamInfer: all a LoadGen session calls.
    servicer = StandInSut(mean_s, token_steps=token_steps)  # type: ignore[abstract]
    running = build_server(
        "127.0.0.1:0",
        lambda server: sut_agent_pb2_grpc.add_SutAgentServicer_to_server(servicer, server),
        ["mecbench.v1.SutAgent"],
    )

    def stop() -> None:
        servicer.close()
        running.stop(0.5)

    return SutServer(f"127.0.0.1:{running.port}", stop, servicer)


@pytest.fixture(scope="package")
def sut() -> Iterator[SutServer]:
    """A SUT agent answering every sample after 2 ms (constant)."""
    server = start_sut(0.002)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def hanging_sut() -> Iterator[SutServer]:
    """A SUT agent that takes 10 minutes per sample: nothing comes back during a test."""
    server = start_sut(600.0)
    yield server
    server.stop()


# --- the LoadGen agent -------------------------------------------------------------------------------


@dataclass
class Agent:
    server: RunningServer
    channel: grpc.Channel
    stub: loadgen_agent_pb2_grpc.LoadGenAgentStub
    settings: LoadGenAgentSettings

    def open(self, sut_address: str, **fields: object) -> loadgen_agent_pb2.Session:
        request = loadgen_agent_pb2.OpenSessionRequest(sut_address=sut_address, **fields)  # type: ignore[arg-type]
        session: loadgen_agent_pb2.Session = self.stub.OpenSession(request, timeout=60).session
        return session

    def close(self, session_id: str) -> None:
        self.stub.CloseSession(loadgen_agent_pb2.CloseSessionRequest(session_id=session_id), timeout=30)

    def session(self, session_id: str) -> loadgen_agent_pb2.Session:
        sessions = self.stub.ListSessions(loadgen_agent_pb2.ListSessionsRequest(), timeout=10).sessions
        found: loadgen_agent_pb2.Session = next(s for s in sessions if s.session_id == session_id)
        return found


def agent_settings(work_dir: Path, **overrides: object) -> LoadGenAgentSettings:
    base: dict[str, object] = {
        "work_dir": work_dir,
        "cancel_grace_s": 1.0,
        "sut_connect_timeout_s": 5.0,
        "open_timeout_s": 60.0,
        "progress_interval_s": 0.25,
        "worker_log_level": "warning",
        # Never the user's own cache: each agent fetches into its work directory.
        "dataset_cache_dir": work_dir / "dataset-cache",
        "dataset_roots": (Path(TEST_FILE_ROOT),),
    }
    base |= overrides
    return LoadGenAgentSettings(**base)  # type: ignore[arg-type]


def start_agent(work_dir: Path, **overrides: object) -> Agent:
    settings = agent_settings(work_dir, **overrides)
    running, port = create_server("127.0.0.1:0", settings)
    channel = open_channel(f"127.0.0.1:{port}")
    return Agent(running, channel, loadgen_agent_pb2_grpc.LoadGenAgentStub(channel), settings)


@pytest.fixture(scope="package")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = start_agent(tmp_path_factory.mktemp("loadgen-agent"))
    yield agent
    agent.channel.close()
    agent.server.stop(1.0)


# --- running tests -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: loadgen_agent_pb2.TestStarted | None = None
    progress: list[loadgen_agent_pb2.TestProgress] = field(default_factory=list)
    files: dict[str, bytearray] = field(default_factory=dict)
    chunks: list[common_pb2.FileChunk] = field(default_factory=list)
    finished: loadgen_agent_pb2.TestFinished | None = None
    test_ids: set[str] = field(default_factory=set)

    @property
    def result(self) -> common_pb2.TestResult:
        assert self.finished is not None
        return self.finished.result


def collect(
    events: Iterator[loadgen_agent_pb2.RunTestResponse], on_event: Callable[[str], None] | None = None
) -> Outcome:
    outcome = Outcome()
    for event in events:
        outcome.test_ids.add(event.test_id)
        kind = event.WhichOneof("event")
        if kind == "started":
            outcome.started = event.started
        elif kind == "progress":
            outcome.progress.append(event.progress)
        elif kind == "log_chunk":
            outcome.chunks.append(event.log_chunk)
            outcome.files.setdefault(event.log_chunk.name, bytearray()).extend(event.log_chunk.data)
        elif kind == "finished":
            outcome.finished = event.finished
        if on_event is not None and kind is not None:
            on_event(kind)
    return outcome


def run_test(agent: Agent, session_id: str, settings: common_pb2.LoadGenSettings, test_id: str = "") -> Outcome:
    request = loadgen_agent_pb2.RunTestRequest(session_id=session_id, settings=settings, test_id=test_id)
    return collect(agent.stub.RunTest(request, timeout=120))


def short_settings(scenario: common_pb2.Scenario.ValueType, **fields: object) -> common_pb2.LoadGenSettings:
    """About a second per test; LoadGen's mlperf.conf would ask for ten minutes."""
    base: dict[str, object] = {
        "scenario": scenario,
        "min_duration": durations.from_seconds(1.0),
        "min_query_count": 50,
        "skip_mlperf_defaults": True,
    }
    if scenario == common_pb2.SCENARIO_SERVER:
        base |= {"server_target_qps": 200.0, "server_target_latency": durations.from_seconds(0.1)}
    elif scenario == common_pb2.SCENARIO_OFFLINE:
        base |= {"offline_expected_qps": 1000.0}
    elif scenario == common_pb2.SCENARIO_SINGLE_STREAM:
        base |= {"single_stream_expected_latency": durations.from_seconds(0.002)}
    elif scenario == common_pb2.SCENARIO_MULTI_STREAM:
        base |= {"multi_stream_samples_per_query": 4, "multi_stream_expected_latency": durations.from_seconds(0.003)}
    base |= fields
    return common_pb2.LoadGenSettings(**base)  # type: ignore[arg-type]


# --- processes -----------------------------------------------------------------------------------


def worker_processes() -> list[int]:
    """Session processes that are children of this test process (the agent runs in it)."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"loadgen_agent.worker" in cmdline:
            found.append(int(entry.name))
    return found


def process_exists(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
