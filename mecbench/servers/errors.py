"""Failed requests by kind: every failure is counted under a short kind ("timeout",
"connection", "http_503", ...), the first messages are kept word for word, and the first
failure of each kind is logged, so a run's log names every kind of failure it met, not only
the first failure."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from mecbench.core.logging import get_logger

log = get_logger("mecbench.servers.errors")

DEFAULT_KEPT_MESSAGES = 10
MESSAGE_LIMIT = 1000

_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")
# Checked in order: the first pattern found in the message names the kind.
_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("timeout", re.compile(r"time(d)?[ -]?out|deadline|DEADLINE_EXCEEDED", re.IGNORECASE)),
    ("server_stopped", re.compile(r"backend (was )?stopped|server (has )?(exited|died|stopped)", re.IGNORECASE)),
    # The LoadGen side's own abort ("aborted: <why>"); "Connection aborted." is a connection.
    ("aborted", re.compile(r"^aborted:|\bcancell?ed\b", re.IGNORECASE)),
    (
        "connection",
        re.compile(
            r"connection|refused|reset by peer|BadStatusLine|RemoteDisconnected|unreachable|UNAVAILABLE|"
            r"ServerDisconnected|ClientConnector|broken pipe",
            re.IGNORECASE,
        ),
    ),
    ("stream", re.compile(r"stream|not JSON|incomplete|chunk", re.IGNORECASE)),
)


def error_kind(message: str) -> str:
    """The kind of a failure, from its message: `http_<status>` when the server answered with an
    HTTP error status, else timeout, server_stopped, aborted, connection, stream or other."""
    status = _HTTP_STATUS.search(message)
    if status:
        return f"http_{status.group(1)}"
    for kind, pattern in _KINDS:
        if pattern.search(message):
            return kind
    return "other"


@dataclass
class ErrorTally:
    """Failures of one test (or one backend's life): counts by kind, the first messages, and a
    log line the first time each kind is seen. Thread-safe."""

    component: str
    kept_messages: int = DEFAULT_KEPT_MESSAGES
    by_kind: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, message: str, count: int = 1, kind: str | None = None) -> str:
        """Count `count` failures with this message; returns their kind."""
        kind = kind or error_kind(message)
        with self._lock:
            first_of_kind = kind not in self.by_kind
            self.by_kind[kind] = self.by_kind.get(kind, 0) + count
            if len(self.messages) < self.kept_messages:
                self.messages.append(message[:MESSAGE_LIMIT])
        if first_of_kind:
            log.warning("request_failures_of_a_new_kind", component=self.component, kind=kind, first_error=message)
        return kind

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_kind.values())

    def snapshot(self) -> tuple[dict[str, int], list[str]]:
        with self._lock:
            return dict(self.by_kind), list(self.messages)

    def reset(self) -> None:
        with self._lock:
            self.by_kind.clear()
            self.messages.clear()
