"""External server processes: launch profiles, probes, start/ready/watch/stop, with real child
processes (tiny Python servers written into tmp_path) and no mocks."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mecbench.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from sut_agent.external.probes import probe_once
from sut_agent.external.process import ServerProcess
from sut_agent.external.profiles import (
    LaunchProfile,
    Probe,
    allocate_ports,
    load_profiles,
    port_values,
    render,
)

REPO = Path(__file__).resolve().parents[2]

# argv: PORT DELAY [ignore-term | spawn-child]. Listens for HTTP after DELAY seconds; /health is
# 200, /shutdown answers then exits with code 7.
HTTP_SERVER = """
import http.server, os, signal, subprocess, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else ""
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "spawn-child":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(f"child pid {child.pid}", flush=True)
print(f"starting on {port}", flush=True)
print("a line on stderr", file=sys.stderr, flush=True)
time.sleep(delay)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/health", "/shutdown") else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.wfile.flush()
        if self.path == "/shutdown":
            print("shutdown requested", flush=True)
            os._exit(7)

    def log_message(self, format, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

# argv: MESSAGE. Fails at once, as a server with a bad flag does.
EXIT_AT_ONCE = """
import sys
print("boom:", sys.argv[1], file=sys.stderr)
sys.exit(3)
"""

NEVER_LISTENS = """
import time
print("loading forever", flush=True)
time.sleep(60)
"""

# argv: PORT DELAY. A raw TCP server that logs what each connection sends.
TCP_SERVER = """
import socket, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
time.sleep(delay)
server = socket.create_server(("127.0.0.1", port))
print("tcp listening", flush=True)
print("tcp stderr line", file=sys.stderr, flush=True)
while True:
    connection, _ = server.accept()
    data = connection.recv(100)
    if data:
        print("got:", data.decode().strip(), flush=True)
    connection.close()
"""

# argv: PORT DELAY. grpc.health.v1 says NOT_SERVING for mecbench.Test until DELAY has passed.
GRPC_SERVER = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
port, delay = int(sys.argv[1]), float(sys.argv[2])
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
servicer = health.HealthServicer()
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(f"127.0.0.1:{port}")
servicer.set("mecbench.Test", health_pb2.HealthCheckResponse.NOT_SERVING)
server.start()
print("grpc started", flush=True)
time.sleep(delay)
servicer.set("mecbench.Test", health_pb2.HealthCheckResponse.SERVING)
print("grpc serving", flush=True)
server.wait_for_termination()
"""


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's zombie may wait on init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[ServerProcess] = []

    def script(self, name: str, source: str) -> str:
        path = self.tmp_path / f"{name}.py"
        path.write_text(source)
        return str(path)

    def profile(self, body: dict[str, Any], name: str = "srv") -> LaunchProfile:
        path = self.tmp_path / f"profiles-{name}.yaml"
        path.write_text(yaml.safe_dump({"profiles": {name: body}}))
        return load_profiles(path)[name]

    def server(
        self,
        body: dict[str, Any],
        on_failure: Callable[[str], None] | None = None,
        log_name: str = "server.log",
    ) -> ServerProcess:
        profile = self.profile(body)
        values = {**port_values(allocate_ports(profile.ports, profile.host)), "model": "m", "model_dir": "."}
        server = ServerProcess(render(profile, values), profile, self.tmp_path / "logs" / log_name, on_failure)
        self.servers.append(server)
        return server


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    for server in h.servers:
        server.stop()


def _http_body(h: Harness, delay: float = 0.0, mode: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "command": ["{python}", h.script("http_server", HTTP_SERVER), "{port}", str(delay), *([mode] if mode else [])],
        "ready": {"http": "http://{host}:{port}/health", "interval_s": 0.05, "timeout_s": 0.5},
        "ready_timeout_s": 10,
        "stop_timeout_s": 2,
        **extra,
    }


# --- Start, ready, stop ----------------------------------------------------------------------------


def test_slow_start_is_ready_once_it_listens(harness: Harness) -> None:
    server = harness.server(_http_body(harness, delay=0.4))
    assert server.pid == 0
    started = time.monotonic()
    server.start()
    assert time.monotonic() - started >= 0.4
    assert server.running() and server.pid > 0
    assert server.endpoint.startswith("http://127.0.0.1:")
    assert probe_once(Probe("http", f"{server.endpoint}/health")) is None
    pid = server.pid
    assert server.stop() == -signal.SIGTERM
    assert server.stop() == -signal.SIGTERM  # idempotent
    assert not server.running() and server.failure() is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_exit_before_ready_reports_code_and_stderr(harness: Harness) -> None:
    body = {
        "command": ["{python}", harness.script("exit", EXIT_AT_ONCE), "no model given"],
        "ready": {"tcp": "{host}:{port}"},
    }
    server = harness.server(body)
    with pytest.raises(FailedPrecondition) as caught:
        server.start()
    message = str(caught.value)
    assert "server srv exited with code 3 before it was ready" in message
    assert "boom: no model given" in message
    assert not server.running()
    assert server.stop() == 3


def test_log_tail_covers_only_the_latest_start(harness: Harness) -> None:
    script = harness.script("exit", EXIT_AT_ONCE)
    for word in ("first", "second"):
        server = harness.server({"command": ["{python}", script, word], "ready": {"tcp": "{host}:{port}"}})
        with pytest.raises(FailedPrecondition) as caught:
            server.start()
    assert "boom: second" in str(caught.value) and "boom: first" not in str(caught.value)
    log = (harness.tmp_path / "logs" / "server.log").read_text()
    assert log.count("--- mecbench: starting server srv: ") == 2
    assert "boom: first" in log and "boom: second" in log


def test_not_ready_in_time_is_stopped(harness: Harness) -> None:
    body = {
        "command": ["{python}", harness.script("never", NEVER_LISTENS)],
        "ready": {"tcp": "{host}:{port}", "interval_s": 0.05},
        "ready_timeout_s": 120,
        "stop_timeout_s": 1,
    }
    server = harness.server(body)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        server.start(ready_timeout_s=0.5)  # overrides the profile's 120 s
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert "server srv was not ready within 0.5s (connection refused)" in message
    assert "loading forever" in message
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


def test_command_that_cannot_run(harness: Harness) -> None:
    server = harness.server(
        {"command": ["/nonexistent/server-binary", "--port", "{port}"], "ready": {"tcp": "{host}:{port}"}}
    )
    with pytest.raises(FailedPrecondition, match=r"cannot execute '/nonexistent/server-binary'"):
        server.start()
    assert server.stop() is None
    missing_dir = str(harness.tmp_path / "missing")
    server = harness.server({"command": ["{python}", "-V"], "cwd": missing_dir, "ready": {"tcp": "{host}:{port}"}})
    with pytest.raises(FailedPrecondition, match="cannot change to its directory"):
        server.start()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(harness: Harness) -> None:
    server = harness.server(_http_body(harness, mode="ignore-term", stop_timeout_s=0.5))
    server.start()
    pid = server.pid
    started = time.monotonic()
    assert server.stop() == -signal.SIGKILL
    assert time.monotonic() - started < 2.0
    assert not _alive(pid)
    log = (harness.tmp_path / "logs" / "server.log").read_text()
    assert "did not stop within its grace period; SIGKILL" in log


def test_stop_reaches_the_servers_children(harness: Harness) -> None:
    server = harness.server(_http_body(harness, mode="spawn-child"))
    server.start()
    line = next(line for line in server.log_tail(50).splitlines() if line.startswith("child pid "))
    child = int(line.removeprefix("child pid "))
    assert _alive(child)
    server.stop()
    assert _wait_for(lambda: not _alive(child), 3)


def test_stop_command(harness: Harness) -> None:
    stop = "import urllib.request; urllib.request.urlopen('http://{host}:{port}/shutdown', timeout=5)"
    server = harness.server(_http_body(harness, stop_command=["{python}", "-c", stop], stop_signal="SIGKILL"))
    server.start()
    assert server.stop() == 7  # the server's own exit, not a signal
    log = (harness.tmp_path / "logs" / "server.log").read_text()
    assert "--- mecbench: stop command: " in log and "shutdown requested" in log


def test_concurrent_stops_agree(harness: Harness) -> None:
    server = harness.server(_http_body(harness))
    server.start()
    codes: list[int | None] = []
    threads = [threading.Thread(target=lambda: codes.append(server.stop())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [-signal.SIGTERM] * 4


# --- Watching --------------------------------------------------------------------------------------


def test_crash_after_ready_is_reported_once(harness: Harness) -> None:
    reports: list[str] = []
    reported = threading.Event()

    def on_failure(message: str) -> None:
        reports.append(message)
        reported.set()

    server = harness.server(_http_body(harness), on_failure=on_failure)
    server.start()
    os.kill(server.pid, signal.SIGKILL)
    assert reported.wait(5)
    assert reports[0].startswith("server srv exited with code -9 (SIGKILL); last log lines:\n")
    assert "a line on stderr" in reports[0]
    assert server.failure() == reports[0]
    assert not server.running()
    assert server.stop() == -signal.SIGKILL
    assert reports == [reports[0]]


def test_requested_stop_is_no_failure(harness: Harness) -> None:
    reports: list[str] = []
    server = harness.server(_http_body(harness), on_failure=reports.append)
    server.start()
    server.stop()
    time.sleep(0.1)
    assert reports == [] and server.failure() is None


def test_hung_server_fails_its_liveness_probe(harness: Harness) -> None:
    reported = threading.Event()
    live = {"http": "http://{host}:{port}/health", "interval_s": 0.1, "timeout_s": 0.3}
    server = harness.server(_http_body(harness, live=live, live_failures=2), on_failure=lambda _: reported.set())
    server.start()
    time.sleep(0.3)  # a few healthy probes first
    assert server.failure() is None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        assert reported.wait(5)
        failure = server.failure()
        assert failure is not None
        assert failure.startswith("server srv stopped answering its liveness probe (timed out)")
        assert not server.running()
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert server.stop() == -signal.SIGTERM


# --- Probes and logs -------------------------------------------------------------------------------


def test_tcp_ready_probe_and_log_capture(harness: Harness) -> None:
    body = {
        "command": ["{python}", harness.script("tcp", TCP_SERVER), "{port}", "0.2"],
        "ready": {"tcp": "{host}:{port}", "interval_s": 0.05},
    }
    server = harness.server(body)
    server.start()
    assert _wait_for(lambda: b"tcp stderr line" in server.read_log(0))
    log = server.read_log(0).decode()
    assert log.startswith("--- mecbench: starting server srv: ")
    assert "tcp listening" in log
    offset = server.log_size()
    host, port = server.endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"hello\n")
    assert _wait_for(lambda: b"got: hello" in server.read_log(offset))
    assert server.read_log(offset) == b"got: hello\n"
    assert server.read_log(offset, limit=3) == b"got"
    assert server.log_tail(1) == "got: hello"
    with pytest.raises(InvalidArgument):
        server.read_log(-1)


def test_grpc_ready_probe_waits_for_serving(harness: Harness) -> None:
    body = {
        "command": ["{python}", harness.script("grpc_server", GRPC_SERVER), "{port}", "0.5"],
        "endpoint": "{host}:{port}",
        "ready": {"grpc": "{host}:{port}", "service": "mecbench.Test", "interval_s": 0.05},
        "live": {"grpc": "{host}:{port}", "interval_s": 0.2},
    }
    server = harness.server(body)
    server.start()
    assert "grpc serving" in server.log_tail()
    assert probe_once(Probe("grpc", server.endpoint, "mecbench.Test")) is None
    assert server.stop() is not None


def test_probe_reasons() -> None:
    closed_port = allocate_ports(1, "127.0.0.1")[0]
    assert probe_once(Probe("http", f"http://127.0.0.1:{closed_port}/health")) == "connection refused"
    assert probe_once(Probe("tcp", f"127.0.0.1:{closed_port}")) == "connection refused"
    assert probe_once(Probe("grpc", f"127.0.0.1:{closed_port}", timeout_s=1)) == "connection refused"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            codes = {"/ok": 200, "/moved": 302, "/loading": 503}
            self.send_response(codes.get(self.path, 404))
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    try:
        assert probe_once(Probe("http", f"{base}/ok")) is None
        assert probe_once(Probe("http", f"{base}/moved")) is None
        assert probe_once(Probe("http", f"{base}/loading")) == "HTTP 503"
        assert probe_once(Probe("tcp", f"127.0.0.1:{web.server_address[1]}")) is None
    finally:
        web.shutdown()
        web.server_close()

    checked = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, checked)
    checked_port = checked.add_insecure_port("127.0.0.1:0")
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # no health service at all
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    checked.start()
    bare.start()
    try:
        servicer.set("model", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe_once(Probe("grpc", f"127.0.0.1:{checked_port}", "model")) == "NOT_SERVING"
        servicer.set("model", health_pb2.HealthCheckResponse.SERVING)
        assert probe_once(Probe("grpc", f"127.0.0.1:{checked_port}", "model")) is None
        assert probe_once(Probe("grpc", f"127.0.0.1:{checked_port}", "other")) == "unknown health service 'other'"
        assert probe_once(Probe("grpc", f"127.0.0.1:{bare_port}")) is None
    finally:
        checked.stop(0)
        bare.stop(0)


# --- Profiles --------------------------------------------------------------------------------------


def _load_error(tmp_path: Path, body: object, name: str = "bad") -> str:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"profiles": {name: body}}))
    with pytest.raises(FailedPrecondition) as caught:
        load_profiles(path)
    message = str(caught.value)
    assert str(path) in message
    return message


READY = {"http": "http://{host}:{port}/health"}


def test_profile_errors_name_the_profile_and_key(tmp_path: Path) -> None:
    message = _load_error(tmp_path, {"comand": ["serve"], "ready": READY})
    assert "profiles.bad.comand: unknown key" in message
    assert "profiles.bad.command: is required" in message

    message = _load_error(tmp_path, {"command": "serve --model {modle} --port {port}", "ready": READY})
    assert "profiles.bad.command[2]: unknown placeholder {modle}" in message

    message = _load_error(
        tmp_path, {"command": "serve", "ready": {"http": "http://{host}:{port}", "tcp": "{host}:{port}"}}
    )
    assert "profiles.bad.ready: must be a mapping with one of" in message and "not several (http, tcp)" in message

    message = _load_error(tmp_path, {"command": "serve", "ready": {"htp": "http://{host}:{port}"}})
    assert "profiles.bad.ready.htp: unknown key" in message

    message = _load_error(tmp_path, {"command": "serve", "ready": {"tcp": "http://{host}:{port}/health"}})
    assert 'profiles.bad.ready.tcp: must be "host:port"' in message

    message = _load_error(tmp_path, {"command": "serve", "ready": "http://localhost/health"})
    assert "profiles.bad.ready: must be a mapping" in message

    message = _load_error(tmp_path, {"command": "serve", "ready": {"tcp": "{host}:{port}", "service": "x"}})
    assert "profiles.bad.ready.service: only a grpc probe names a service" in message

    message = _load_error(tmp_path, {"command": "serve --grpc-port {port2}", "ready": READY})
    assert "profiles.bad.command[2]: uses {port2} but the profile allocates 1 port(s); set ports: 2" in message

    message = _load_error(tmp_path, {"ready": READY})
    assert "profiles.bad.command: is required" in message

    message = _load_error(tmp_path, {"command": "serve"})
    assert "profiles.bad.ready: is required" in message


def test_profile_errors_are_all_reported_at_once(tmp_path: Path) -> None:
    body = {
        "command": ["serve", 1.5, "{x}"],
        "ready": READY,
        "stop_signal": "SIGNOPE",
        "stop_timeout_s": -1,
        "ports": 99,
        "env": {"BAD NAME": "1", "OK": ["list"]},
        "live": {"http": "http://{host}:{port}/", "interval_s": 0},
        "cwd": "{oops",
    }
    message = _load_error(tmp_path, body)
    for expected in (
        "profiles.bad.command[1]: must be a string",
        "profiles.bad.command[2]: unknown placeholder {x}",
        "profiles.bad.stop_signal: unknown signal 'SIGNOPE'",
        "profiles.bad.stop_timeout_s: must be 0 to 3600 seconds, not -1",
        "profiles.bad.ports: must be 0 to 16, not 99",
        "profiles.bad.env.BAD NAME: is not a valid environment variable name",
        "profiles.bad.env.OK: must be a string",
        "profiles.bad.live.interval_s: must be above 0",
        "profiles.bad.cwd: bad template '{oops'",
    ):
        assert expected in message, expected


def test_profile_file_shape_errors(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n  a: {command: x, ready: {tcp: '{host}:{port}'}}\n  a: {command: y, ready: {tcp: '{host}:{port}'}}\n"
    )
    with pytest.raises(FailedPrecondition, match="duplicate key 'a'"):
        load_profiles(path)
    path.write_text("servers: {}\n")
    with pytest.raises(FailedPrecondition, match="servers: unknown key"):
        load_profiles(path)
    path.write_text("profiles: [a, b]\n")
    with pytest.raises(FailedPrecondition, match="profiles: must be a mapping"):
        load_profiles(path)
    with pytest.raises(FailedPrecondition, match="cannot read server profiles"):
        load_profiles(tmp_path / "missing.yaml")


def test_profile_defaults_json_and_merge_keys(tmp_path: Path) -> None:
    path = tmp_path / "profiles.json"
    path.write_text(
        json.dumps({"profiles": {"plain": {"command": "serve --port {port}", "ready": {"tcp": "{host}:{port}"}}}})
    )
    profile = load_profiles(path)["plain"]
    assert profile.command == ("serve", "--port", "{port}")
    assert (profile.ports, profile.host, profile.endpoint) == (1, "127.0.0.1", "http://{host}:{port}")
    assert (profile.stop_signal, profile.stop_timeout_s, profile.stop_command) == ("SIGTERM", 10.0, ())
    assert (profile.ready_timeout_s, profile.live, profile.live_failures) == (120.0, None, 3)

    path = tmp_path / "profiles.yaml"
    # A profile may build on another with a YAML merge key; its own keys override the merged ones.
    path.write_text(
        "profiles:\n"
        "  one: &base {command: serve, ready: {tcp: '{host}:{port}'}, stop_signal: INT, live: {tcp: '{host}:{port}'}}\n"
        "  two: {<<: *base, command: other}\n"
    )
    profiles = load_profiles(path)
    assert profiles["two"].command == ("other",) and profiles["two"].stop_signal == "SIGINT"
    live = profiles["two"].live
    assert live is not None and live.interval_s == 1.0  # the slower default of liveness probes


def test_render(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "profiles": {
                    "srv": {
                        "command": ["{python}", "serve", "{model}", '--config={{"port": {port}}}', "--grpc={port2}"],
                        "env": {"SERVER_HOME": "{model_dir}/home", "NAME": "{profile}"},
                        "ports": 2,
                        "endpoint": "{host}:{port2}",
                        "ready": {"grpc": "{host}:{port2}", "service": "inference"},
                        "stop_command": ["stopper", "{port}"],
                    }
                }
            }
        )
    )
    profile = load_profiles(path)["srv"]
    assert profile.placeholders() == {"python", "model", "port", "port2", "model_dir", "profile", "host"}
    values = {**port_values([5000, 5001]), "model": "org/model-1.5B:q4", "model_dir": "/models"}
    launch = render(profile, values)
    assert launch.argv == (sys.executable, "serve", "org/model-1.5B:q4", '--config={"port": 5000}', "--grpc=5001")
    assert launch.env["SERVER_HOME"] == "/models/home" and launch.env["NAME"] == "srv"
    assert launch.env["PATH"] == os.environ["PATH"]
    assert launch.cwd is None
    assert launch.endpoint == "127.0.0.1:5001"
    assert launch.ready == Probe("grpc", "127.0.0.1:5001", "inference")
    assert launch.live is None
    assert launch.stop_argv == ("stopper", "5000")

    for model in ("--trust-remote-code", "a;rm -rf /", "../../etc/passwd", ""):
        with pytest.raises(InvalidArgument) as caught:
            render(profile, {**values, "model": model})
        assert caught.value.violations[0].field == "model"
    with pytest.raises(FailedPrecondition, match=r"needs a value for \{model_dir\}"):
        render(profile, {**port_values([5000, 5001]), "model": "m"})


def test_allocate_ports_are_distinct_and_free() -> None:
    ports = allocate_ports(4, "127.0.0.1")
    assert len(set(ports)) == 4
    for port in ports:
        socket.create_server(("127.0.0.1", port)).close()


def test_example_profiles_load() -> None:
    profiles = load_profiles(REPO / "examples" / "servers.yaml")
    assert {"vllm", "ollama", "llama-cpp", "tgi", "triton", "mecbench-model-server"} <= profiles.keys()
    assert profiles["ollama"].server_type == "ollama"
    assert profiles["triton"].server_type == "kserve_v2_grpc"
    values = {**port_values([8000, 8001, 8002]), "model": "Qwen/Qwen2.5-0.5B-Instruct", "model_dir": "/models"}
    vllm = render(profiles["vllm"], values)
    assert vllm.argv == ("vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct", "--host", "127.0.0.1", "--port", "8000")
    assert vllm.ready == Probe("http", "http://127.0.0.1:8000/health", interval_s=0.5)
    ollama = render(profiles["ollama"], values)
    assert ollama.env["OLLAMA_HOST"] == "127.0.0.1:8000"
    assert ollama.ready.target == "http://127.0.0.1:8000/api/version"
    triton = render(profiles["triton"], values)
    assert triton.endpoint == "127.0.0.1:8001"
    assert "--grpc-port=8001" in triton.argv
    model_server = render(profiles["mecbench-model-server"], values)
    assert model_server.argv[:3] == (sys.executable, "-m", "model_server")
