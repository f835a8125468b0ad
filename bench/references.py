"""Reference figures the MECBench path is compared with, measured in the same run:

- LoadGen against an in-process SUT that answers at once (the ceiling of LoadGen itself);
- a plain Python TCP ping-pong on loopback (the floor of any network round trip);
- a plain grpcio unary call on loopback (what a naive harness would do per sample).

Each LoadGen reference runs in a child process: LoadGen is a per-process singleton.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import statistics
import tempfile
import threading
import time
from concurrent import futures
from typing import Any

import grpc

from mecbench.core.issuing import set_timer_slack_ns
from mecbench.v1 import sut_agent_pb2, sut_agent_pb2_grpc


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _loadgen_in_process(
    scenario: str, target_qps: float, duration_s: float, queue: Any, coalesce: bool = True, trace: bool = False,
    issue_slack_ns: int = 0,
) -> None:
    import mlperf_loadgen as lg

    # As a MECBench client does with DataPlaneOptions.issue_slack: the slack of the thread LoadGen
    # issues from.
    set_timer_slack_ns(issue_slack_ns)

    def issue(ids: list[int], indices: list[int]) -> None:
        lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])

    def flush() -> None:
        pass

    sut = lg.ConstructFastSUT(issue, flush)
    qsl = lg.ConstructQSL(1024, 1024, lambda s: None, lambda s: None)
    settings = lg.TestSettings()
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_duration_ms = int(duration_s * 1000)
    settings.min_query_count = 1
    if scenario == "server":
        settings.scenario = lg.TestScenario.Server
        settings.server_target_qps = target_qps
        settings.server_target_latency_ns = 100_000_000
        settings.server_coalesce_queries = coalesce
    else:
        settings.scenario = lg.TestScenario.SingleStream
        settings.single_stream_expected_latency_ns = 10_000
    with tempfile.TemporaryDirectory() as outdir:
        log_settings = lg.LogSettings()
        log_settings.log_output.outdir = outdir
        log_settings.log_output.copy_summary_to_stdout = False
        log_settings.enable_trace = trace
        lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
        with open(f"{outdir}/mlperf_log_summary.txt") as handle:
            summary = handle.read()
    lg.DestroyQSL(qsl)
    lg.DestroyFastSUT(sut)
    fields = {}
    for line in summary.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    queue.put(fields)


def loadgen_in_process(
    scenario: str, target_qps: float = 0.0, duration_s: float = 3.0, *, coalesce: bool = True, trace: bool = False,
    issue_slack_ns: int = 0,
) -> dict[str, str]:
    """LoadGen against a SUT that answers at once, in a fresh process; the summary's fields.
    `trace` turns on LoadGen's trace, which MECBench reads every sample's latency from;
    `issue_slack_ns` is the issuing thread's timer slack (0: the kernel's default)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_loadgen_in_process, args=(scenario, target_qps, duration_s, queue, coalesce, trace, issue_slack_ns)
    )
    process.start()
    fields: dict[str, str] = queue.get(timeout=duration_s + 120)
    process.join(30)
    return fields


def tcp_ping_pong(count: int = 5000) -> dict[str, float]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(64):
            conn.sendall(data)
        conn.close()

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.sendall(b"x" * 16)
        client.recv(64)
        samples.append(time.perf_counter() - started)
    client.close()
    thread.join(5)
    server.close()
    return {"p50_us": percentile(samples, 0.5) * 1e6, "p99_us": percentile(samples, 0.99) * 1e6}


class _EchoSut(sut_agent_pb2_grpc.SutAgentServicer):
    def Infer(self, request: sut_agent_pb2.InferRequest, context: grpc.ServicerContext) -> sut_agent_pb2.InferResponse:
        return sut_agent_pb2.InferResponse(batch=sut_agent_pb2.ResponseBatch(sample_ids=request.batch.sample_ids))


def grpc_unary(count: int = 3000) -> dict[str, float]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sut_agent_pb2_grpc.add_SutAgentServicer_to_server(_EchoSut(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = sut_agent_pb2_grpc.SutAgentStub(channel)
    request = sut_agent_pb2.InferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=[1], payloads=[b"x" * 64]))
    for _ in range(200):
        stub.Infer(request)
    samples = []
    started_all = time.perf_counter()
    for _ in range(count):
        started = time.perf_counter()
        stub.Infer(request)
        samples.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - started_all
    channel.close()
    server.stop(0)
    return {
        "p50_us": percentile(samples, 0.5) * 1e6,
        "p99_us": percentile(samples, 0.99) * 1e6,
        "calls_per_s": count / elapsed,
        "mean_us": statistics.fmean(samples) * 1e6,
    }


if __name__ == "__main__":
    print(json.dumps({
        "tcp": tcp_ping_pong(),
        "grpc_unary": grpc_unary(),
        "loadgen_single_stream": loadgen_in_process("single")["50.00 percentile latency (ns)"],
    }, indent=2))
