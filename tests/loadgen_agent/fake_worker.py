"""A fake LoadGen session process: it speaks loadgen_agent/protocol.py over the same pipes as
loadgen_agent/worker.py, without LoadGen or a SUT, and answers commands as a script says.

A fake, and why: it stands in for the real worker only where the session manager's handling of
a worker's behaviour is under test, for what a real LoadGen process cannot be made to do on
demand (crash at a chosen moment, hang and ignore a cancel, put garbage or another protocol
version on the pipe). What LoadGen itself does is tested with the real worker (test_agent.py).

Run as `python fake_worker.py SCRIPT_JSON` (SessionManager(worker_command=fake_command(...))):
- open: the answer to OpenSession: "ready", "fail" (OpenFailed with an InvalidArgument),
  "fatal" (WorkerFatal, exit 1), "hang" (never answers), or a BAD_FRAMES name (then hangs);
- tests: the behaviour of each RunTest, counted over every fake of the script (`counter`), the
  last repeating: "ok", "until_cancel", "late_cancel", "hang", "crash", "abort", "abort_hang",
  "error", or a BAD_FRAMES name (after TestStarted, then hangs);
- pids: a file each fake appends its pid to; counter: the file counting RunTests;
  summary: a LoadGen summary copied into the test's outdir by "ok"; marker: see BAD_FRAMES.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import shlex
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

# Run by path: the repository's packages wherever the project is (installed or not).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loadgen_agent import protocol

# Domain errors by name, as they cross the pipe (mecbench.core.errors would import grpc: slower).
OPEN_ERROR = protocol.WireError(
    "InvalidArgument", "dataset.uri: scripted: no such object", (("dataset.uri", "scripted: no such object"),)
)
TEST_ERROR = protocol.WireError("FailedPrecondition", "scripted: the SUT agent serves no external server")
ABORT_ERROR = protocol.WireError("DeadlineExceeded", "scripted: no response from the SUT agent for 1s; test aborted")

# A scripted "ok" test: this many progress events of this many samples each.
OK_PROGRESS = 3
OK_STEP = 10
LATE_CANCEL_S = 0.05


class _RunsACommand:
    """Pickles as a call of os.system: what a plain unpickler would run."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


def _pickled(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# Frames that are not events of this protocol, each (marker path) -> the bytes put on the pipe.
BAD_FRAMES: dict[str, Callable[[str], bytes]] = {
    # Not a pickle at all.
    "bytes": lambda _: _frame(b"\x00\x01 this is not a pickle"),
    # The untyped protocol's dict message.
    "dict": lambda _: _frame(_pickled({"ev": "ready", "setup_time_s": 0.1, "sample_count": 64, "pid": 1})),
    # A well-formed event of the next protocol version.
    "version": lambda _: _frame(_pickled((protocol.PROTOCOL_VERSION + 1, protocol.SessionReady(0.1, 64, 1)))),
    # The right class with a field of the wrong type.
    "field": lambda _: _frame(_pickled((protocol.PROTOCOL_VERSION, protocol.SessionReady(0.1, "64", 1)))),  # type: ignore[arg-type]
    # A command where an event belongs.
    "command": lambda _: _frame(_pickled((protocol.PROTOCOL_VERSION, protocol.CancelTest("t")))),
    # A frame that would run a shell command (touching `marker`) if it were unpickled naively.
    "foreign": lambda marker: _frame(
        _pickled((protocol.PROTOCOL_VERSION, _RunsACommand(f"touch {shlex.quote(marker)}")))
    ),
    # A length over the protocol's limit.
    "oversize": lambda _: struct.pack(">I", protocol.MAX_MESSAGE_BYTES + 1),
}


class FakeWorker:
    def __init__(self, script: dict[str, object], events: protocol.EventWriter, raw: IO[bytes]) -> None:
        self.script = script
        self.events = events
        self.raw = raw
        self.runs: queue.SimpleQueue[protocol.RunTest] = queue.SimpleQueue()
        self.cancelled: set[str] = set()
        self.cond = threading.Condition()

    def _text(self, key: str) -> str:
        return str(self.script.get(key) or "")

    def bad_frame(self, name: str) -> None:
        # No event is being written meanwhile: only this thread writes.
        self.raw.write(BAD_FRAMES[name](self._text("marker")))
        self.raw.flush()
        hang()

    def read_commands(self, stream: IO[bytes]) -> None:
        """Like the real worker's command reader: a cancel gets through while a test runs."""
        while True:
            command = protocol.read_command(stream)
            if command is None or isinstance(command, protocol.CloseSession):
                os._exit(0)
            if isinstance(command, protocol.RunTest):
                self.runs.put(command)
            elif isinstance(command, protocol.CancelTest):
                with self.cond:
                    self.cancelled.add(command.test_id)
                    self.cond.notify_all()

    def is_cancelled(self, test_id: str) -> bool:
        with self.cond:
            return test_id in self.cancelled

    def wait_cancel(self, test_id: str, step_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: test_id in self.cancelled, step_s)

    def behaviour(self) -> str:
        tests = self.script.get("tests") or ["ok"]
        assert isinstance(tests, list)
        counter = Path(self._text("counter"))
        done = int(counter.read_text() or 0) if counter.is_file() else 0
        counter.write_text(str(done + 1))
        return str(tests[min(done, len(tests) - 1)])

    def serve(self) -> None:
        while True:
            self.run(self.runs.get())

    def run(self, command: protocol.RunTest) -> None:
        test_id = command.test_id
        behaviour = self.behaviour()
        if self.is_cancelled(test_id):
            self.events.send(protocol.TestFinished(test_id, ran=False, cancelled=True))
            return
        if behaviour == "error":
            self.events.send(protocol.TestFinished(test_id, ran=False, error=TEST_ERROR))
            return
        started = time.monotonic()
        self.events.send(protocol.TestStarted(test_id, started, "scripted settings"))
        if behaviour in BAD_FRAMES:
            self.bad_frame(behaviour)
        completed = 0
        if behaviour == "ok":
            for _ in range(OK_PROGRESS):
                time.sleep(0.01)
                completed += OK_STEP
                self.events.send(protocol.TestProgress(test_id, time.monotonic(), completed, completed))
            summary = self._text("summary")
            if summary:
                Path(command.outdir).mkdir(parents=True, exist_ok=True)
                shutil.copy(summary, Path(command.outdir) / "mlperf_log_summary.txt")
            self.events.send(
                protocol.TestFinished(
                    test_id,
                    ran=True,
                    wall_s=time.monotonic() - started,
                    batches_sent=OK_PROGRESS,
                    samples_sent=completed,
                    failed_samples_by_kind=(("timeout", 0),),
                    llm_metrics=(("scripted_metric", 1.5),),
                    issued=completed,
                    completed=completed,
                )
            )
        elif behaviour in ("until_cancel", "late_cancel"):
            while not self.wait_cancel(test_id, 0.02):
                completed += 1
                self.events.send(protocol.TestProgress(test_id, time.monotonic(), completed, completed))
            if behaviour == "late_cancel":
                time.sleep(LATE_CANCEL_S)
            self.events.send(protocol.TestFinished(test_id, ran=True, cancelled=True, completed=completed))
        elif behaviour == "crash":
            # What LoadGen had written so far stays behind in the outdir for the agent to clear.
            Path(command.outdir).mkdir(parents=True, exist_ok=True)
            (Path(command.outdir) / "mlperf_log_detail.txt").write_text(":::MLLOG {}\n")
            self.events.send(protocol.TestProgress(test_id, time.monotonic(), 5, 5))
            sys.stderr.flush()
            os._exit(7)
        elif behaviour in ("abort", "abort_hang"):
            self.events.send(protocol.TestAborting(test_id, ABORT_ERROR))
            if behaviour == "abort_hang":
                hang()
            self.events.send(protocol.TestFinished(test_id, ran=True, cancelled=False, completed=0))
        else:  # "hang": LoadGen busy to the end of its min_duration, deaf to the cancel
            hang()


def hang() -> None:
    while True:
        time.sleep(3600)


def main() -> None:
    script = json.loads(sys.argv[1])
    raw = sys.stdout.buffer
    events = protocol.EventWriter(raw)
    if script.get("pids"):
        with open(script["pids"], "a") as pids:
            pids.write(f"{os.getpid()}\n")
    stdin = sys.stdin.buffer
    command = protocol.read_command(stdin)
    if not isinstance(command, protocol.OpenSession):
        os._exit(2)
    worker = FakeWorker(script, events, raw)
    # Like the real worker: commands are read from before the answer to OpenSession.
    threading.Thread(target=worker.read_commands, args=(stdin,), daemon=True).start()
    opening = str(script.get("open", "ready"))
    if opening == "ready":
        events.send(protocol.SessionReady(0.01, int(script.get("sample_count", 64)), os.getpid()))
    elif opening == "fail":
        events.send(protocol.OpenFailed(OPEN_ERROR))
        os._exit(3)
    elif opening == "fatal":
        events.send(protocol.WorkerFatal("RuntimeError: scripted failure", "Traceback (scripted)"))
        os._exit(1)
    elif opening in BAD_FRAMES:
        worker.bad_frame(opening)
    else:
        hang()
    worker.serve()


if __name__ == "__main__":
    main()
