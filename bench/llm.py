"""LLM serving through MECBench's direct client path, against a floor, in one run:

    .venv/bin/python -m bench.llm [--rates 50,800,1200] [--duration 5] [--aiperf PATH] [--httpx [--httpx-rates 50,400]]

A fast OpenAI-compatible server with known latencies (TTFT 5 ms, then 8 tokens 1 ms apart,
streamed as server-sent events; aiohttp, its own process) serves both:
(i) the floor: a minimal asyncio client (aiohttp, Poisson arrivals at the rate, one process);
(ii) MECBench: the whole stack (controller, SUT agent with the server as an external endpoint,
LoadGen agent, one LoadGen session speaking the protocol directly), Server scenario at the rate;
(iii) NVIDIA AIPerf, when `--aiperf` names its executable (installed in a separate venv);
(iv) with `--httpx`, the floor's client written with httpx instead of aiohttp: which HTTP
library the direct client should use, by their CPU per request in the same run.
Printed per rate: the achieved share of the target rate, TTFT p50 (client-measured from the
request's send; MECBench's from its per-request records), its ratio to the floor's, failed
requests, and the client's CPU (the LoadGen session process; the floor's process): over the
run's wall time, set-up included, and (at rate) its CPU per request times the rate, the cores
it takes while sending at that rate. Ratios in one run, since this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

TTFT_S = 0.005
ITL_S = 0.001
TOKENS = 8
MODEL = "bench-llm"


# --- the server ---------------------------------------------------------------------------------


class _OpenAIStream(asyncio.Protocol):
    """One connection of the bench server: HTTP/1.1 keep-alive on a bare asyncio protocol (an
    aiohttp server saturated one core at 600 requests/s here, below the rates measured)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in head[1:] if h.lower().startswith("content-length:")), 0)
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = self.buffer[end + 4 : end + 4 + length], self.buffer[end + 4 + length :]
            self.handle(head[0], body)

    def send(self, status: str, content_type: str, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )

    def handle(self, request_line: str, body: bytes) -> None:
        assert self.transport is not None
        if request_line.startswith("GET /v1/models"):
            self.send("200 OK", "application/json", json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
            return
        if not request_line.startswith("POST /v1/chat/completions"):
            self.send("404 Not Found", "application/json", b'{"error": {"message": "no such path"}}')
            return
        streamed = bool(json.loads(body).get("stream"))
        loop = asyncio.get_running_loop()
        if not streamed:
            message = {"role": "assistant", "content": "x" * TOKENS}
            answer = {"choices": [{"index": 0, "message": message}], "usage": _USAGE}
            loop.call_later(
                TTFT_S + ITL_S * (TOKENS - 1), self.send, "200 OK", "application/json", json.dumps(answer).encode()
            )
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        loop.call_later(TTFT_S, self.token, 0)

    def chunk(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def token(self, index: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.chunk(_TOKEN_EVENT)
        if index + 1 < TOKENS:
            asyncio.get_running_loop().call_later(ITL_S, self.token, index + 1)
            return
        self.chunk(_USAGE_EVENT + b"data: [DONE]\n\n")
        self.transport.write(b"0\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


_USAGE = {"prompt_tokens": 16, "completion_tokens": TOKENS, "total_tokens": TOKENS + 16}
_ENVELOPE = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
_TOKEN_EVENT = (
    b"data: "
    + json.dumps({**_ENVELOPE, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}).encode()
    + b"\n\n"
)
_USAGE_EVENT = b"data: " + json.dumps({**_ENVELOPE, "choices": [], "usage": _USAGE}).encode() + b"\n\n"


def serve(port: int) -> None:
    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(_OpenAIStream, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.llm", "--serve", str(port)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the bench server did not start")


# --- the floor ----------------------------------------------------------------------------------


_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS, "stream": True}
).encode()


async def floor_client(port: int, rate: float, duration_s: float, library: str = "aiohttp") -> dict[str, Any]:
    """Poisson arrivals at `rate` for `duration_s`, each a streamed request whose first chunk
    carrying content is its first token; with aiohttp (the floor) or httpx (the comparison)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if library == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=60)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:

            async def one_httpx() -> float | None:
                started = time.perf_counter()
                try:
                    async with client.stream("POST", url, content=_BODY, headers=headers) as response:
                        return await _first_token(response.aiter_raw(), started)
                except (httpx.HTTPError, OSError):
                    return None

            return await _poisson(one_httpx, rate, duration_s)
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one_aiohttp() -> float | None:
            started = time.perf_counter()
            try:
                async with session.post(url, data=_BODY, headers=headers) as response:
                    return await _first_token(response.content.iter_any(), started)
            except (aiohttp.ClientError, OSError):
                return None

        return await _poisson(one_aiohttp, rate, duration_s)


async def _first_token(chunks: AsyncIterator[bytes], started: float) -> float:
    """Seconds from `started` to the first chunk that carries content; the stream is read to its end."""
    first = 0.0
    async for data in chunks:
        if not first and b'"content"' in data:
            first = time.perf_counter()
    return first - started


async def _poisson(
    one: Callable[[], Coroutine[Any, Any, float | None]], rate: float, duration_s: float
) -> dict[str, Any]:
    """Requests (`one` gives a TTFT, or None when it failed) at Poisson arrivals for `duration_s`."""
    rng = np.random.default_rng(1)
    tasks: list[asyncio.Task[float | None]] = []
    started = time.perf_counter()
    due = started
    while due - started < duration_s:
        due += rng.exponential(1 / rate)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    outcomes = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    ttfts = [ttft for ttft in outcomes if ttft is not None]
    return {
        "sent": len(tasks),
        "completed": len(ttfts),
        "achieved": len(ttfts) / elapsed,
        "failures": len(tasks) - len(ttfts),
        "ttft_p50_ms": float(np.median(ttfts)) * 1000 if ttfts else 0.0,
    }


def run_floor(port: int, rate: float, duration_s: float, library: str = "aiohttp") -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    result = asyncio.run(floor_client(port, rate, duration_s, library))
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result["cpu_cores"] = cpu_s / wall
    result["cpu_ms_per_request"] = cpu_s / max(result["completed"], 1) * 1000
    return result


# --- MECBench -----------------------------------------------------------------------------------


def _worker_cpu_s() -> float:
    """CPU seconds of this bench's LoadGen session processes now running (python -m
    loadgen_agent.worker, started below this process: other programs' sessions are not counted)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"loadgen_agent.worker" not in cmdline or not _descends_from_us(int(pid)):
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _descends_from_us(pid: int) -> bool:
    while pid > 1:
        if pid == os.getpid():
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


def run_mecbench(stub: Any, app: Any, dataset: Path, rate: float, duration_s: float) -> dict[str, Any]:
    from mecbench.core import durations
    from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2

    settings = common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SERVER,
        server_target_qps=rate,
        min_duration=durations.from_seconds(duration_s),
        min_query_count=int(rate * duration_s),
        server_target_latency=durations.from_seconds(1.0),
        use_token_latencies=True,
        ttft_latency=durations.from_seconds(1.0),
        tpot_latency=durations.from_seconds(1.0),
    )
    spec = controller_pb2.RunSpec(
        experiment_id="bench-llm",
        sut_id="bench-llm",
        settings=settings,
        dataset=common_pb2.DatasetSpec(uri=str(dataset)),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT),
    )
    cpu_before, wall = _worker_cpu_s(), time.perf_counter()
    run = stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = app.runs.wait(run.run_id, 600)
    # The session process outlives the run; its CPU over the run's wall time (set-up included),
    # and per request (set-up's share small): times the rate, the cores it takes at that rate.
    cpu_s = _worker_cpu_s() - cpu_before
    cpu = cpu_s / (time.perf_counter() - wall)
    if final.state != common_pb2.RUN_STATE_SUCCEEDED:
        return {"error": final.error}
    result = final.results[0].aggregate
    metrics = result.llm_metrics
    return {
        "achieved": result.completed_samples_per_second,
        "failures": result.failed_samples,
        "ttft_p50_ms": metrics.get("ttft_p50_s", 0.0) * 1000,
        "loadgen_ttft_p50_ms": durations.to_seconds(result.ttft.p50) * 1000,
        "cpu_cores": cpu,
        "cpu_cores_at_rate": cpu_s / max(metrics.get("requests_ok", 0.0), 1.0) * rate,
        "valid": result.valid,
    }


# --- AIPerf ---------------------------------------------------------------------------------------


def _local_tokenizer(scratch: Path) -> Path:
    """A tiny byte-level BPE as a Hugging Face tokenizer folder: AIPerf wants a tokenizer, and its
    "builtin" one is downloaded (no network here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = scratch / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["the edge server answers the client over the network"] * 50, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"})
    )
    return folder


def run_aiperf(executable: str, port: int, rate: float, duration_s: float, scratch: Path) -> dict[str, Any]:
    out = scratch / f"aiperf-{rate:g}"
    command = [
        executable,
        "profile",
        "--model",
        MODEL,
        "--url",
        f"http://127.0.0.1:{port}",
        "--endpoint-type",
        "chat",
        "--streaming",
        "--request-rate",
        f"{rate:g}",
        "--request-count",
        str(int(rate * duration_s)),
        "--synthetic-input-tokens-mean",
        "8",
        "--output-tokens-mean",
        str(TOKENS),
        "--artifact-dir",
        str(out),
        "--tokenizer",
        str(_local_tokenizer(scratch)),
        "--ui-type",
        "none",
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - started
    found = list(out.rglob("profile_export_aiperf.json")) if out.exists() else []
    if completed.returncode != 0 or not found:
        return {"error": (completed.stderr or completed.stdout)[-300:]}
    data = json.loads(found[0].read_text())
    ttft = data.get("time_to_first_token", data.get("ttft", {}))
    throughput = data.get("request_throughput", {})
    return {"achieved": float(throughput.get("avg", 0.0)), "ttft_p50_ms": float(ttft.get("p50", 0.0)), "wall_s": wall}


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rates", default="50,800,1200")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--aiperf", default="", help="the aiperf executable (in its own venv), to run beside")
    parser.add_argument(
        "--httpx", action="store_true", help="also run the floor's client written with httpx (pip install httpx)"
    )
    parser.add_argument("--httpx-rates", default="50,400,800", help="the rates (of --rates) to run httpx's client at")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    from controller.app import ControllerApp
    from controller.server import create_server
    from controller.settings import ControllerSettings
    from mecbench.core.channels import open_channel
    from mecbench.v1 import controller_pb2, controller_pb2_grpc, sut_agent_pb2
    from mecbench.workloads import ByteTokenizer, LengthDistribution, make_synthetic, write_dataset

    rates = [float(r) for r in args.rates.split(",")]
    httpx_rates = {float(r) for r in args.httpx_rates.split(",")} if args.httpx else set()
    server, port = start_server()
    rows: list[tuple[float, dict[str, Any], dict[str, Any], dict[str, Any] | None]] = []
    httpx_rows: list[tuple[float, dict[str, Any], dict[str, Any]]] = []
    try:
        with tempfile.TemporaryDirectory() as scratch_dir:
            scratch = Path(scratch_dir)
            dataset = scratch / "prompts.tar"
            prompts = make_synthetic(
                256, LengthDistribution.parse("fixed:16"), LengthDistribution.parse(f"fixed:{TOKENS}"), ByteTokenizer()
            )
            write_dataset(prompts, dataset)
            # The LoadGen agent reads local datasets only under the operator's roots.
            os.environ["MECBENCH_LOADGEN_DATASET_ROOTS"] = str(scratch)
            settings = ControllerSettings.load(data_dir=scratch / "controller")
            app = ControllerApp(settings)
            grpc_server, grpc_port = create_server("127.0.0.1:0", settings, app=app)
            channel = open_channel(f"127.0.0.1:{grpc_port}")
            stub = controller_pb2_grpc.ControllerStub(channel)
            config = sut_agent_pb2.SutConfig(
                external=sut_agent_pb2.ExternalBackendConfig(
                    server_type="openai", endpoint=f"127.0.0.1:{port}", model=MODEL, options={"max_tokens": str(TOKENS)}
                )
            )
            stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="bench-llm", config=config))
            try:
                run_mecbench(stub, app, dataset, rates[0], 1.0)  # warm: session process, connections
                for rate in rates:
                    floor = run_floor(port, rate, args.duration)
                    mecbench = run_mecbench(stub, app, dataset, rate, args.duration)
                    aiperf = run_aiperf(args.aiperf, port, rate, args.duration, scratch) if args.aiperf else None
                    rows.append((rate, floor, mecbench, aiperf))
                    httpx = run_floor(port, rate, args.duration, "httpx") if rate in httpx_rates else None
                    if httpx is not None:
                        httpx_rows.append((rate, floor, httpx))
                    line = {"rate": rate, "floor": floor, "mecbench": mecbench, "aiperf": aiperf, "httpx": httpx}
                    print(json.dumps(line), flush=True)
            finally:
                channel.close()
                grpc_server.stop(grace=1.0)
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"\nLLM serving, 8-token streams (TTFT 5 ms, ITL 1 ms), {args.duration:g} s per rate, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores"
    )
    print(
        f"{'rate':>6} | {'floor: achieved, TTFT p50, CPU':>32} | "
        f"{'MECBench: achieved, TTFT p50 (x floor), fails, CPU (at rate)':>62} | {'AIPerf: achieved, TTFT p50':>28}"
    )
    for rate, floor, mec, aiperf in rows:
        floor_text = f"{floor['achieved'] / rate:6.1%} {floor['ttft_p50_ms']:6.2f} ms {floor['cpu_cores']:4.2f}"
        if "error" in mec:
            mec_text = f"failed: {mec['error'][:40]}"
        else:
            ratio = mec["ttft_p50_ms"] / floor["ttft_p50_ms"] if floor["ttft_p50_ms"] else 0.0
            mec_text = (
                f"{mec['achieved'] / rate:6.1%} {mec['ttft_p50_ms']:6.2f} ms ({ratio:4.2f}x) "
                f"{mec['failures']:>3} {mec['cpu_cores']:4.2f} ({mec['cpu_cores_at_rate']:4.2f})"
            )
        if aiperf is None:
            aiperf_text = "-"
        elif "error" in aiperf:
            aiperf_text = "failed"
        else:
            aiperf_text = f"{aiperf['achieved'] / rate:6.1%} {aiperf['ttft_p50_ms']:6.2f} ms"
        print(f"{rate:>6.0f} | {floor_text:>32} | {mec_text:>62} | {aiperf_text:>28}")
    if httpx_rows:
        print("\nThe same minimal client with aiohttp and with httpx: achieved, TTFT p50, CPU ms per request")
        print(f"{'rate':>6} | {'aiohttp':>30} | {'httpx':>30} | {'httpx CPU / aiohttp CPU':>24}")
        for rate, floor, httpx in httpx_rows:
            texts = [
                f"{r['achieved'] / rate:6.1%} {r['ttft_p50_ms']:6.2f} ms {r['cpu_ms_per_request']:5.3f} ms"
                for r in (floor, httpx)
            ]
            ratio = httpx["cpu_ms_per_request"] / floor["cpu_ms_per_request"] if floor["cpu_ms_per_request"] else 0.0
            print(f"{rate:>6.0f} | {texts[0]:>30} | {texts[1]:>30} | {ratio:>23.2f}x")


if __name__ == "__main__":
    main()
