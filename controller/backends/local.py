"""Local backend: each agent is a child process on this machine, bound to an ephemeral port.

Children get PR_SET_PDEATHSIG so they die with the controller even after a kill -9, and are
stopped with SIGTERM (graceful) then SIGKILL. Each agent's stderr (its JSON logs) goes to a file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from controller.backends.base import AgentHandle, AgentKind, DeploymentBackend
from mecbench.core.channels import open_channel, wait_until_serving
from mecbench.core.errors import AlreadyExists, Unavailable
from mecbench.core.logging import get_logger

log = get_logger("mecbench.controller.local")

_LISTENING = re.compile(r"listening on (\S+:\d+)")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGTERM it when the controller dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Child:
    handle: AgentHandle
    process: subprocess.Popen[str]


class LocalProcessBackend(DeploymentBackend):
    name = "local"

    def __init__(self, log_dir: Path, host: str = "127.0.0.1", start_timeout: float = 30.0) -> None:
        self.log_dir = log_dir
        self.host = host
        self.start_timeout = start_timeout
        self._children: dict[str, _Child] = {}
        self._lock = threading.Lock()
        self.node_name = os.uname().nodename

    def start_agent(self, kind: AgentKind, name: str, env: dict[str, str] | None = None) -> AgentHandle:
        with self._lock:
            if name in self._children and self._children[name].process.poll() is None:
                raise AlreadyExists(f"agent {name!r} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        command = [sys.executable, "-m", "mecbench", kind.value, "--listen", f"{self.host}:0"]
        child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                env=child_env,
                text=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, safe before exec
                start_new_session=True,
            )
        address = self._read_address(process, name, log_path)
        handle = AgentHandle(
            name=name, kind=kind, address=address, node=self.node_name, pid=process.pid, log_path=log_path
        )
        with self._lock:
            self._children[name] = _Child(handle, process)
        channel = open_channel(address)
        try:
            wait_until_serving(channel, timeout=self.start_timeout)
        except Unavailable:
            self.stop_agent(name)
            raise
        finally:
            channel.close()
        log.info("agent_started", agent=name, kind=kind.value, address=address, pid=process.pid)
        return handle

    def _read_address(self, process: subprocess.Popen[str], name: str, log_path: Path) -> str:
        assert process.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                match = _LISTENING.search(line)
                if match and not found:
                    found.append(match.group(1))
                    break
            # Keep draining so the child never blocks on a full pipe.
            for _ in process.stdout:
                pass

        reader = threading.Thread(target=read, name=f"stdout-{name}", daemon=True)
        reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not found and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        if not found:
            self._terminate(process)
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise Unavailable(f"agent {name} did not start (exit code {process.poll()}): {tail.strip()}")
        return found[0]

    @staticmethod
    def _terminate(process: subprocess.Popen[str], grace: float = 5.0) -> None:
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def stop_agent(self, name: str) -> None:
        with self._lock:
            child = self._children.pop(name, None)
        if child is not None:
            self._terminate(child.process)
            log.info("agent_stopped", agent=name, exit_code=child.process.returncode)

    def agents(self) -> list[AgentHandle]:
        with self._lock:
            return [c.handle for c in self._children.values() if c.process.poll() is None]

    def is_alive(self, name: str) -> bool:
        with self._lock:
            child = self._children.get(name)
        return child is not None and child.process.poll() is None

    def close(self) -> None:
        with self._lock:
            names = list(self._children)
        for name in names:
            self.stop_agent(name)
