"""The thread LoadGen issues queries from, in a MECBench client.

LoadGen issues from the thread that called StartTest, or, with server_num_issue_query_threads,
only from threads the SUT registers (RegisterIssueQueryThread): the Python binding cannot
register any, so LoadGen would wait for them for ever, and that setting is refused
(ISSUE_THREADS_RULE).

The calling thread's timer slack is how late the kernel may end its sleeps (prctl(2),
PR_SET_TIMERSLACK / PR_GET_TIMERSLACK; Linux). Why a benchmark sets it: in the Server scenario
LoadGen sleeps until each query's scheduled time on the issuing thread (loadgen.cc,
QueryScheduler<Server>::Wait: sleep_until), so a client process wakes once per query. With a
slack the kernel may end each sleep up to that much late, and every query whose time has passed
by then is issued without sleeping again: one wake-up for all the queries due within a slack.
LoadGen counts latency from the scheduled time, so the later issue is measured, not hidden.
"""

from __future__ import annotations

import ctypes
import os

ISSUE_THREADS_RULE = "must be 0: LoadGen's Python binding cannot register issue threads"

_PR_SET_TIMERSLACK = 29
_PR_GET_TIMERSLACK = 30

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> int:
    result: int = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                              ctypes.c_ulong(0))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def timer_slack_ns() -> int:
    """The calling thread's timer slack, as the kernel reports it."""
    return _prctl(_PR_GET_TIMERSLACK, 0)


def set_timer_slack_ns(slack_ns: int) -> int:
    """Set the calling thread's timer slack (0: back to the thread's default, 50 us unless its
    parent changed it) and return what the kernel reports it now is."""
    _prctl(_PR_SET_TIMERSLACK, slack_ns)
    return timer_slack_ns()
