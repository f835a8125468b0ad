"""`buf curl` (what grpcurl users reach for) drives a running controller through server
reflection alone: it lists the services, starts a run and watches it to the end, with no
.proto file in sight."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controller.conftest import Stack, start_stack, stop_stack

ROOT = Path(__file__).resolve().parents[2]
BUF = shutil.which("buf", path=str(ROOT / "node_modules" / ".bin")) or shutil.which("buf")

pytestmark = pytest.mark.skipif(BUF is None, reason="buf is not installed (scripts/setup installs it with npm)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("controller"))
    yield running
    stop_stack(running)


def buf_curl(stack: Stack, *args: str, method: str = "", data: dict[str, Any] | None = None) -> list[Any]:
    """Run `buf curl` against the controller; every JSON message it printed."""
    assert BUF is not None
    url = f"http://127.0.0.1:{stack.server.port}" + (f"/{method}" if method else "")
    command = [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args]
    if data is not None:
        command += ["--data", json.dumps(data)]
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if "--list-services" in args or "--list-methods" in args:
        return result.stdout.split()
    decoder = json.JSONDecoder()
    messages, text = [], result.stdout.strip()
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages


def test_reflection_lists_every_service(stack: Stack) -> None:
    services = buf_curl(stack, "--list-services")
    assert {"mecbench.v1.Controller", "grpc.health.v1.Health"} <= set(services)
    methods = buf_curl(stack, "--list-methods")
    assert {"mecbench.v1.Controller/StartRun", "mecbench.v1.Controller/WatchRun"} <= set(methods)


def test_start_run_and_watch_it_to_the_end(stack: Stack) -> None:
    buf_curl(stack, method="mecbench.v1.Controller/InitStorage", data={})
    buf_curl(stack, method="mecbench.v1.Controller/DeploySut", data={
        "sut_id": "curl-sut",
        "config": {"synthetic": {"distribution": "SERVICE_TIME_DISTRIBUTION_CONSTANT", "mean": "0.001s"}},
    })
    [started] = buf_curl(stack, method="mecbench.v1.Controller/StartRun", data={"spec": {
        "experiment_id": "curl",
        "sut_id": "curl-sut",
        "settings": {"scenario": "SCENARIO_SERVER", "server_target_qps": 100, "min_duration": "1s",
                     "min_query_count": "50", "server_target_latency": "0.05s"},
    }})
    run_id = started["run"]["runId"]
    events = buf_curl(stack, method="mecbench.v1.Controller/WatchRun", data={"run_id": run_id})
    states = [event.get("state") for event in events]
    assert states[-1] == "RUN_STATE_SUCCEEDED", events[-1]
    assert "RUN_STATE_RUNNING" in states
    final = events[-1]["run"]
    assert final["results"][0]["aggregate"]["scenario"] == "SCENARIO_SERVER"
    assert float(final["results"][0]["aggregate"]["samplesPerSecond"]) > 0
