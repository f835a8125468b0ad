"""The local stack: `mecbench up` / `down` (a controller in the background), the embedded
controller of `run` and `quickstart`, `quickstart` itself and `storage init`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mecbench.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    env_client,
    err,
    format_results_table,
    out,
    pid_alive,
    print_json,
    read_stack_state,
    state_file,
    state_name,
)
from mecbench.client_errors import ClientError
from mecbench.core import durations
from mecbench.core.channels import open_channel, wait_until_serving
from mecbench.core.errors import Unavailable
from mecbench.v1 import common_pb2, controller_pb2, sut_agent_pb2

LISTENING = "listening on "
# The local backend starts agents with this set and their stdin a pipe; a controller started
# with it and stdin from /dev/null would read end-of-file and stop at once.
EXIT_WITH_PARENT_ENV = "MECBENCH_EXIT_WITH_PARENT"


# --- services -----------------------------------------------------------------------------------


def _serve_controller(address: str) -> None:
    from controller.server import serve

    serve(address)


def _serve_sut_agent(address: str) -> None:
    from sut_agent.server import serve

    serve(address)


def _serve_loadgen_agent(address: str) -> None:
    from loadgen_agent.server import serve

    serve(address)


def _serve_node_agent(address: str) -> None:
    from node_agent.server import serve

    serve(address)


SERVICES: dict[str, Callable[[str], None]] = {
    "controller": _serve_controller,
    "sut-agent": _serve_sut_agent,
    "loadgen-agent": _serve_loadgen_agent,
    "node-agent": _serve_node_agent,
}


# --- up / down ----------------------------------------------------------------------------------


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mecbench"


def _client_address(listening: str) -> str:
    """Where a client connects to a controller listening on `listening`: a wildcard bind is
    reached on loopback."""
    host, _, port = listening.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "::") else listening


def _listening_address(log: Path, offset: int) -> str:
    """The address the controller announced in its log (after `offset`), or ""."""
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(LISTENING):
            return line.removeprefix(LISTENING).strip()
    return ""


def _log_tail(log: Path, offset: int, lines: int = 20) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            return "\n".join(handle.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _write_state(state: dict[str, Any]) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    # Atomic: a `down` or a client reading it never sees half a file.
    temporary.replace(path)


def _agents(address: str) -> list[common_pb2.NodeInfo]:
    """The node agents the controller lists (it starts its local one on the first ask)."""
    try:
        with env_client(address, retries=0, timeout_s=30.0) as client:
            return client.list_nodes()
    except ClientError:
        return []


def up(args: argparse.Namespace) -> int:
    running = read_stack_state()
    if running:
        if args.json:
            print_json({**running, "already_up": True})
        else:
            out(f"already up: controller at {running['address']} (pid {running['pid']})")
            out(f"data in {running['data_dir']}, log {running['log']}")
        return EXIT_OK
    data_dir = Path(args.data_dir or default_data_dir()).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "controller.log"
    env = {k: v for k, v in os.environ.items() if k != EXIT_WITH_PARENT_ENV}
    env["MECBENCH_CONTROLLER_DATA_DIR"] = str(data_dir)
    with log.open("ab") as handle:
        # Appended to, so the log of an earlier session is kept; read from here on.
        offset = handle.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "mecbench", "--log-level", args.log_level, "controller", "--listen", args.listen],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=data_dir,
            # Its own session: Ctrl-C in this terminal, or the terminal closing, does not reach it.
            start_new_session=True,
        )
    try:
        listening = _await_listening(process, log, offset, args.timeout)
    except KeyboardInterrupt:
        process.kill()
        raise
    if not listening:
        code = process.poll()
        if code is None:
            process.kill()
        err(f"error: the controller did not start{f' (exit status {code})' if code is not None else ''}; log {log}:")
        err(_log_tail(log, offset))
        return EXIT_FAILED
    address = _client_address(listening)
    try:
        with open_channel(address) as channel:
            wait_until_serving(channel, timeout=args.timeout)
    except Unavailable as exc:
        process.kill()
        err(f"error: {exc}; log {log}")
        return EXIT_UNAVAILABLE
    state: dict[str, Any] = {
        "address": address,
        "listen": listening,
        "pid": process.pid,
        "data_dir": str(data_dir),
        "log": str(log),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_state(state)
    with env_client(address) as client:
        storage = client.init_storage()
    agents = [] if args.no_agents else _agents(address)
    state["agents"] = [{"kind": "node-agent", "name": a.name, "address": a.agent_address} for a in agents]
    _write_state(state)
    if args.json:
        print_json(state)
        return EXIT_OK
    out(f"controller at {address} (pid {process.pid})")
    for agent in agents:
        out(f"node agent {agent.name} at {agent.agent_address}")
    out("SUT and LoadGen agents start with each run, as children of the controller")
    buckets = ", ".join(
        f"{b.name} {controller_pb2.BucketState.Name(b.state).removeprefix('BUCKET_STATE_').lower()}"
        for b in storage.buckets
    )
    out(f"storage ({storage.backend}): {buckets}")
    out(f"data in {data_dir}, log {log}")
    out(f"state in {state_file()}: `mecbench` commands use this controller until `mecbench down`")
    return EXIT_OK


def _await_listening(process: subprocess.Popen[bytes], log: Path, offset: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = _listening_address(log, offset)
        if listening:
            return listening
        if process.poll() is not None:
            return ""
        time.sleep(0.05)
    return ""


def _is_controller(pid: int) -> bool:
    """Guard against a recycled pid: only signal a process that is a mecbench controller."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no procfs to ask: trust the state file
    return b"mecbench" in b" ".join(argv) and b"controller" in argv


def down(args: argparse.Namespace) -> int:
    path = state_file()
    try:
        state = json.loads(path.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        _say(args, {"stopped": False}, "nothing is up")
        return EXIT_OK
    if not pid_alive(pid) or not _is_controller(pid):
        path.unlink(missing_ok=True)
        _say(args, {"stopped": False, **state}, f"nothing is up (controller pid {pid} had already exited)")
        return EXIT_OK
    # SIGTERM: the controller stops its runs and agents and releases its shaping, then exits.
    os.kill(pid, signal.SIGTERM)
    forced = not _wait_gone(pid, args.timeout)
    if forced:
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    path.unlink(missing_ok=True)
    how = f"killed (it did not stop within {args.timeout:g}s of SIGTERM)" if forced else "stopped"
    _say(args, {"stopped": True, "forced": forced, **state}, f"{how} controller at {state.get('address')} (pid {pid})")
    return EXIT_OK


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _say(args: argparse.Namespace, state: dict[str, Any], text: str) -> None:
    if args.json:
        print_json(state)
    else:
        out(text)


# --- embedded controller and quickstart ---------------------------------------------------------


@contextlib.contextmanager
def embedded_controller(data_dir: str, prefix: str) -> Iterator[tuple[int, Path]]:
    """A controller in this process on an ephemeral loopback port, its agents local processes:
    (port, data directory), stopped on leaving. With no `data_dir`, a new temporary folder."""
    from controller.server import create_server
    from controller.settings import ControllerSettings

    directory = Path(data_dir or tempfile.mkdtemp(prefix=prefix)).resolve()
    running, port = create_server("127.0.0.1:0", ControllerSettings.load(data_dir=directory))
    try:
        yield port, directory
    finally:
        running.stop(grace=2.0)


def quickstart_specs(experiment_id: str) -> list[tuple[str, controller_pb2.RunSpec]]:
    """A short Server test at a modest QPS and a SingleStream test against the synthetic SUT."""
    common = {"experiment_id": experiment_id, "sut_id": "quickstart-synthetic"}
    server = controller_pb2.RunSpec(
        selector="server-qps200",
        settings=common_pb2.LoadGenSettings(
            scenario=common_pb2.SCENARIO_SERVER,
            server_target_qps=200,
            # A bound a 2 ms SUT meets with room for the stalls of a busy machine, and enough
            # queries for LoadGen's early stopping to accept a few over it (601 queries did not:
            # it asked for about 1000 once a handful exceeded a 10 ms bound; with 50 ms, 1 run
            # in 20 on a 2-core VM loaded by other test suites still had too many over it).
            server_target_latency=durations.from_seconds(0.100),
            min_duration=durations.from_seconds(5),
            min_query_count=1000,
        ),
        **common,  # type: ignore[arg-type]
    )
    single = controller_pb2.RunSpec(
        selector="singlestream",
        settings=common_pb2.LoadGenSettings(
            scenario=common_pb2.SCENARIO_SINGLE_STREAM,
            min_duration=durations.from_seconds(2),
            min_query_count=100,
            # LoadGen sizes a SingleStream test as min_duration / expected latency queries up
            # front: expecting the SUT's 2 ms makes the test last at least min_duration.
            single_stream_expected_latency=durations.from_seconds(0.002),
        ),
        **common,  # type: ignore[arg-type]
    )
    return [("Server @200 QPS", server), ("SingleStream", single)]


def quickstart(args: argparse.Namespace) -> int:
    with embedded_controller(args.data_dir, "mecbench-quickstart-") as (port, data_dir), env_client(
        f"127.0.0.1:{port}"
    ) as client:
        out(f"controller on 127.0.0.1:{port}, data in {data_dir}")
        storage = client.init_storage()
        for bucket in storage.buckets:
            state = controller_pb2.BucketState.Name(bucket.state).removeprefix("BUCKET_STATE_").lower()
            out(f"storage ({storage.backend}): bucket {bucket.name} {state}")
        sut = client.deploy_sut(
            "quickstart-synthetic",
            sut_agent_pb2.SutConfig(
                synthetic=sut_agent_pb2.SyntheticBackendConfig(
                    distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT,
                    mean=durations.from_seconds(0.002),
                )
            ),
        )
        out(f"SUT agent {sut.sut_id} (synthetic, 2 ms constant service time) at {sut.endpoint.address}")
        finished: list[tuple[str, controller_pb2.Run]] = []
        for label, spec in quickstart_specs(args.experiment):
            run = client.start_run(spec)
            out(f"{label}: run {run.run_id} started", flush=True)
            finished.append((label, client.wait_run(run.run_id)))
        out()
        out(format_results_table(finished))
        out()
        for label, run in finished:
            if run.error:
                out(f"{label}: {run.error}")
            for repeat in run.results:
                out(f"{label}: files at {repeat.result_uri}")
        if args.json:
            print_json([run for _, run in finished])
        ok = all(run.state == common_pb2.RUN_STATE_SUCCEEDED for _, run in finished)
        if not ok:
            err(", ".join(f"{label}: {state_name(run.state)}" for label, run in finished))
        return EXIT_OK if ok else EXIT_FAILED
