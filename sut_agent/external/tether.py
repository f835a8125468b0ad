"""Runs a command tied to the SUT agent that started it: when the agent is gone, even killed with
SIGKILL, so is everything the command started.

    python -m sut_agent.external.tether [--remove DIR] COMMAND [ARG...]

The agent holds this process's stdin open and never writes to it; the kernel closes it when the
agent dies, and then the tether kills its whole session with SIGKILL (the command's process group
and whatever moved to a group of its own in it, as Ray's workers do) and itself. It leads the
session and the process group (the agent starts it with start_new_session) and the command runs
in both, so the agent's stop signal reaches the two: the tether lets it pass and waits for the
command, then exits as the command did (the same code, or killed by the same signal). With
`--remove DIR` the folder the agent gave the command (a runtime's own files) goes too when the
agent is gone, as the agent would have removed it. Only the standard library: it starts in
milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes of `session` (or of the process group it names), this one
    excepted, from /proc (the agent's stop reads them too)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # After "pid (command)" come state, ppid, pgrp and session; the command may hold spaces and ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if len(fields) > 3 and fields[0] != "Z" and session in (int(fields[2]), int(fields[3])):
            found.append(int(entry.name))
    return found


# Set once the agent is gone: the session is being ended, and this process ends it last.
_ENDING = threading.Event()


def _end_session_when_stdin_closes(remove: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.buffer.read(4096):
            pass
    _ENDING.set()
    session = os.getsid(0)
    if session != os.getpid():  # never: main() made it so; never anyone else's session either
        os._exit(1)
    # Until none is left (a SIGKILL takes effect when its target next leaves the kernel, and what a
    # dying process forks meanwhile is caught by the next sweep), at most ten seconds.
    for _ in range(200):
        members = session_members(session)
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if remove:
        shutil.rmtree(remove, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    remove = ""
    if argv[:1] == ["--remove"] and len(argv) >= 2:
        remove, argv = argv[1], argv[2:]
    if not argv:
        sys.stderr.write("usage: python -m sut_agent.external.tether [--remove DIR] COMMAND [ARG...]\n")
        return 2
    if os.getsid(0) != os.getpid():
        # Whatever the stdin's close kills is this session: it must be one of its own.
        try:
            os.setsid()
        except OSError as error:
            sys.stderr.write(f"tether: cannot lead a session of its own: {error.strerror}\n")
            return 2
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # The command gets the agent's stop signal too; the tether waits for it. A handler (not
        # SIG_IGN, which exec would pass on) is reset to the default in the command.
        signal.signal(signum, lambda *_: None)
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as error:
        sys.stderr.write(f"tether: cannot execute {argv[0]!r}: {error.strerror or error}\n")
        return 127
    threading.Thread(target=_end_session_when_stdin_closes, args=(remove,), name="tether", daemon=True).start()
    code = child.wait()
    if _ENDING.is_set():
        threading.Event().wait()  # the session's end is under way on the other thread, which ends this one
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP take no handler
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    # Not through the interpreter's shutdown: the stdin reader is blocked in a read it would abort on.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
