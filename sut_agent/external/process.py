"""An external inference server's process: started from a rendered launch profile, probed until
it is ready, watched while benchmarks run, and stopped (its whole process group) afterwards.

The server's stdout and stderr go straight to a log file (no pipe the agent must keep draining);
the controller copies that file into each run's logs. The server runs in a session of its own,
so the stop signal and the final SIGKILL reach every process it spawned (vLLM's workers, a shell
script's children), which would otherwise keep holding the GPU and the port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mecbench.core.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument
from mecbench.core.logging import get_logger
from sut_agent.external.probes import probe_once
from sut_agent.external.profiles import LaunchProfile, RenderedLaunch
from sut_agent.external.tether import session_members

log = get_logger("sut_agent.external.process")

# How much of the log's end `log_tail` reads: enough for 20 long lines (tracebacks, JSON logs).
_TAIL_BYTES = 64 * 1024
# After SIGKILL a process only lingers in uninterruptible sleep (a GPU driver call); waiting
# longer than this would hang the agent's stop for a process it can do nothing more about.
_REAP_TIMEOUT_S = 10.0
_GROUP_POLL_S = 0.05
_MIN_PROBE_TIMEOUT_S = 0.05


class ServerProcess:
    """One run of a server process. Thread-safe; `start` once, `stop` any number of times."""

    def __init__(
        self,
        launch: RenderedLaunch,
        profile: LaunchProfile,
        log_path: Path,
        on_failure: Callable[[str], None] | None = None,
        tethered: bool = False,
        tether_remove: Path | None = None,
    ) -> None:
        # Tethered: started through sut_agent.external.tether, which ends the process's whole
        # session should this agent die without stopping it (even by SIGKILL), and then removes
        # `tether_remove` (a folder the process was given) as the agent would have.
        self._tethered = tethered
        self._tether_argv = ["--remove", str(tether_remove)] if tether_remove is not None else []
        self._launch = launch
        self._profile = profile
        self._log_path = log_path
        self._on_failure = on_failure
        # Guards _process, _log_file and _failure, and orders a stop request against a failure
        # report: a failure is reported only if it came before the stop was requested.
        self._lock = threading.Lock()
        # Serialises stop() calls: the second waits for the first and returns its exit code.
        self._stop_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._stopped = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: io.FileIO | None = None
        self._log_start = 0  # where this start's output begins in the (appended) log
        self._failure: str | None = None
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int:
        process = self._process
        return process.pid if process is not None else 0

    @property
    def endpoint(self) -> str:
        return self._launch.endpoint

    def failure(self) -> str | None:
        """Why the server failed after it was ready (exit or hang), with its last log lines; None if it has not."""
        with self._lock:
            return self._failure

    def running(self) -> bool:
        """Started, not asked to stop, its process alive and no failure seen."""
        with self._lock:
            process = self._process
            healthy = self._failure is None and not self._stop_requested.is_set()
        return process is not None and healthy and process.poll() is None

    # --- Start ---------------------------------------------------------------------------------

    def start(self, ready_timeout_s: float | None = None) -> None:
        """Start the server and return once its ready probe passes.

        FailedPrecondition: the command cannot be executed, or the server exits before it is ready.
        DeadlineExceeded: not ready within `ready_timeout_s` (default: the profile's); it is stopped.
        Cancelled: stop() was called meanwhile.
        """
        name = self._profile.name
        timeout_s = self._profile.ready_timeout_s if ready_timeout_s is None else ready_timeout_s
        process = self._launch_process()
        log.info(
            "server_starting", profile=name, pid=process.pid, argv=list(self._launch.argv), log_path=str(self._log_path)
        )
        started = time.monotonic()
        try:
            self._wait_ready(process, started + timeout_s, timeout_s)
        except BaseException:
            self.stop()  # idempotent: a no-op where the failure already stopped it
            raise
        log.info(
            "server_ready",
            profile=name,
            pid=process.pid,
            endpoint=self.endpoint,
            seconds=round(time.monotonic() - started, 3),
        )
        watcher = threading.Thread(target=self._watch, args=(process,), name=f"server-watch-{name}", daemon=True)
        self._watcher = watcher
        watcher.start()

    def _launch_process(self) -> subprocess.Popen[bytes]:
        name = self._profile.name
        argv = self._launch.argv
        with self._lock:
            if self._process is not None or self._stopped:
                raise FailedPrecondition(f"server {name} was already started; start a new ServerProcess")
            if self._stop_requested.is_set():
                raise Cancelled(f"server {name} was stopped before it started")
            try:
                self._log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = io.FileIO(self._log_path, "ab")
            except OSError as error:
                raise FailedPrecondition(f"cannot open the log file of server {name}: {error}") from error
            log_file.write(f"--- mecbench: starting server {name}: {shlex.join(argv)} ---\n".encode())
            self._log_start = os.fstat(log_file.fileno()).st_size
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "sut_agent.external.tether", *self._tether_argv, *argv]
                    if self._tethered else argv,
                    env=self._launch.env,
                    cwd=self._launch.cwd,
                    # Tethered: the pipe's far end is only ever this process's; its close ends the server.
                    stdin=subprocess.PIPE if self._tethered else subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as error:
                log_file.write(f"--- mecbench: cannot start server {name}: {error} ---\n".encode())
                log_file.close()
                self._stopped = True
                if error.filename is not None and error.filename == self._launch.cwd:
                    why = f"cannot change to its directory {self._launch.cwd}: {error.strerror}"
                else:
                    why = f"cannot execute {argv[0]!r}: {error.strerror or error}"
                raise FailedPrecondition(f"server {name}: {why}") from error
            self._process = process
            self._log_file = log_file
            return process

    def _wait_ready(self, process: subprocess.Popen[bytes], deadline: float, timeout_s: float) -> None:
        name = self._profile.name
        ready = self._launch.ready
        reason = "no probe was answered"
        while True:
            if self._stop_requested.is_set():
                raise Cancelled(f"server {name} was stopped before it was ready")
            if process.poll() is not None:
                self._exited_before_ready(process)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # One probe may not outlast the deadline.
            probe = dataclasses.replace(ready, timeout_s=max(_MIN_PROBE_TIMEOUT_S, min(ready.timeout_s, remaining)))
            outcome = probe_once(probe)
            if outcome is None:
                # Another process could be answering on the port this one failed to bind.
                if process.poll() is not None:
                    self._exited_before_ready(process)
                return
            reason = outcome
            self._stop_requested.wait(max(0.0, min(ready.interval_s, deadline - time.monotonic())))
        self.stop()
        log.warning("server_not_ready", profile=name, seconds=timeout_s, reason=reason)
        raise DeadlineExceeded(
            f"server {name} was not ready within {timeout_s:g}s ({reason}); last log lines:\n{self._tail_text()}"
        )

    def _exited_before_ready(self, process: subprocess.Popen[bytes]) -> None:
        tail = self._tail_text()
        self.stop()  # leaves nothing of the server's process group behind
        code = _describe_exit(process.returncode)
        log.warning("server_exited_before_ready", profile=self._profile.name, code=code)
        raise FailedPrecondition(
            f"server {self._profile.name} exited with code {code} before it was ready; last log lines:\n{tail}"
        )

    # --- Watch ---------------------------------------------------------------------------------

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        name = self._profile.name
        live = self._launch.live
        if live is None:
            self._report(f"server {name} exited with code {_describe_exit(process.wait())}")
            return
        failures = 0
        while not self._stop_requested.is_set():
            try:
                code = process.wait(timeout=live.interval_s)
            except subprocess.TimeoutExpired:
                pass
            else:
                self._report(f"server {name} exited with code {_describe_exit(code)}")
                return
            if self._stop_requested.is_set():
                return
            reason = probe_once(live)
            if reason is None:
                failures = 0
            elif process.poll() is None:  # an exit is reported as such at the next wait
                failures += 1
                log.info("server_liveness_probe_failed", profile=name, reason=reason, failures=failures)
                if failures >= self._profile.live_failures:
                    self._report(f"server {name} stopped answering its liveness probe ({reason})")
                    return

    def _report(self, message: str) -> None:
        with self._lock:
            if self._stop_requested.is_set() or self._failure is not None:
                return
            self._failure = f"{message}; last log lines:\n{self._tail_text()}"
            failure = self._failure
        log.warning("server_failed", profile=self._profile.name, pid=self.pid, reason=message)
        if self._on_failure is not None:
            try:
                self._on_failure(failure)
            except Exception:
                log.exception("server_failure_callback_failed", profile=self._profile.name)

    # --- Stop ----------------------------------------------------------------------------------

    def stop(self) -> int | None:
        """Stop the server and everything it spawned; its exit code (None if it never started).

        The profile's stop command or stop signal first, SIGKILL to the process group after
        `stop_timeout_s`. Idempotent and thread-safe; no failure is reported for this exit.
        """
        with self._lock:
            self._stop_requested.set()
            process = self._process
        with self._stop_lock:
            if not self._stopped:
                try:
                    if process is not None:
                        self._terminate(process)
                finally:
                    self._stopped = True
                    self._close_log()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            live = self._launch.live
            watcher.join(timeout=(live.timeout_s if live is not None else 0.0) + 1.0)
        return process.returncode if process is not None else None

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        name = self._profile.name
        group = process.pid  # start_new_session: the server leads its own process group
        deadline = time.monotonic() + self._profile.stop_timeout_s
        if process.poll() is None:
            self._write_log(f"--- mecbench: stopping server {name} ---\n")
            log.info("server_stopping", profile=name, pid=process.pid)
            if not (self._launch.stop_argv and self._run_stop_command(deadline)):
                _signal_group(group, signal.Signals[self._profile.stop_signal])
        elif _group_alive(group):
            # The server itself is gone, but what it spawned may still hold the GPU.
            _signal_group(group, signal.Signals[self._profile.stop_signal])
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        while process.returncode is not None and _group_alive(group) and time.monotonic() < deadline:
            time.sleep(_GROUP_POLL_S)
        if process.returncode is None or _group_alive(group):
            log.warning("server_stop_escalated", profile=name, pid=process.pid, grace_s=self._profile.stop_timeout_s)
            self._write_log(f"--- mecbench: server {name} did not stop within its grace period; SIGKILL ---\n")
            _signal_group(group, signal.SIGKILL)
        try:
            code = process.wait(timeout=_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("server_unkillable", profile=name, pid=process.pid)
            return
        self._write_log(f"--- mecbench: server {name} exited with code {_describe_exit(code)} ---\n")
        log.info("server_stopped", profile=name, pid=process.pid, code=code)

    def _run_stop_command(self, deadline: float) -> bool:
        """Run the profile's stop command; False if it failed (then the stop signal is sent)."""
        name = self._profile.name
        argv = self._launch.stop_argv
        self._write_log(f"--- mecbench: stop command: {shlex.join(argv)} ---\n")
        try:
            completed = subprocess.run(
                argv,
                env=self._launch.env,
                cwd=self._launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                timeout=max(_MIN_PROBE_TIMEOUT_S, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired:
            # The grace period is spent: the caller goes straight on to SIGKILL.
            log.warning("server_stop_command_timed_out", profile=name, argv=list(argv))
            return True
        except OSError as error:
            log.warning("server_stop_command_failed", profile=name, argv=list(argv), error=str(error))
            return False
        if completed.returncode != 0:
            log.warning("server_stop_command_failed", profile=name, argv=list(argv), code=completed.returncode)
            return False
        return True

    def _write_log(self, text: str) -> None:
        log_file = self._log_file
        if log_file is not None and not log_file.closed:
            try:
                log_file.write(text.encode())
            except OSError as error:
                log.warning("server_log_write_failed", profile=self._profile.name, error=str(error))

    def _close_log(self) -> None:
        with self._lock:
            log_file, self._log_file = self._log_file, None
        if log_file is not None:
            log_file.close()

    # --- Log -----------------------------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return self._log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_log(self, offset: int, limit: int = 0) -> bytes:
        """The log from byte `offset`, at most `limit` bytes (0: all of it)."""
        if offset < 0:
            raise InvalidArgument("must not be negative", field="offset")
        if limit < 0:
            raise InvalidArgument("must not be negative", field="limit")
        try:
            with self._log_path.open("rb") as log_file:
                log_file.seek(offset)
                return log_file.read(limit or -1)
        except FileNotFoundError:
            return b""

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines this start wrote (earlier starts' output in the same file excluded)."""
        if lines <= 0:
            return ""
        start = max(self._log_start, self.log_size() - _TAIL_BYTES)
        text = self.read_log(start).decode("utf-8", errors="replace")
        found = text.splitlines()
        if start > self._log_start and found:
            found = found[1:]  # the first line was cut by the byte limit
        return "\n".join(found[-lines:])

    def _tail_text(self) -> str:
        return self.log_tail() or "(the server wrote nothing)"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def _signal_group(group: int, signum: signal.Signals) -> None:
    """Signal the server's process group and whatever else of its session moved to a group of its
    own (Ray's worker processes do): the server leads both, so neither holds anyone else's."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass
    except PermissionError as error:
        log.warning("server_signal_refused", group=group, signal=signum.name, error=str(error))
    for pid in session_members(group):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _group_alive(group: int) -> bool:
    """Whether any process of the group (or of the session it leads) can still run. killpg(0)
    also counts zombies, which no signal ends (the group's orphans are reaped by init, not by us),
    so /proc tells them apart."""
    return bool(session_members(group))
