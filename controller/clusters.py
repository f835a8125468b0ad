"""A cluster SUT (SutConfig.cluster) during a repeat: its members watched, their runtime logs kept
and the cluster recorded with the result. The deployment itself (start in order, stop in
reverse) is the agent pool's (controller/agents.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

from controller.agents import AgentPool, MemberHandle, SutHandle
from mecbench.core.logging import get_logger
from mecbench.core.sut_config import HEAD_MEMBER
from mecbench.v1 import controller_pb2

log = get_logger("mecbench.controller.clusters")

WATCH_INTERVAL_S = 0.5


class ClusterWatch:
    """While a repeat runs, polls every member of a cluster SUT (its agent alive, its runtime
    process READY); the first failure goes to `on_failure` once, naming the member. A no-op for a
    SUT that is no cluster."""

    def __init__(self, pool: AgentPool, sut: SutHandle, on_failure: Callable[[str], None],
                 interval_s: float = WATCH_INTERVAL_S) -> None:
        self._pool = pool
        self._sut = sut
        self._on_failure = on_failure
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure = ""

    def __enter__(self) -> ClusterWatch:
        if self._sut.is_cluster:
            self._thread = threading.Thread(target=self._watch, name=f"cluster-watch-{self._sut.sut_id}", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            failure = self._pool.cluster_failure(self._sut)
            if failure:
                self.failure = failure
                log.error("cluster_member_failed", sut_id=self._sut.sut_id, reason=failure)
                self._on_failure(failure)
                return

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


class ClusterLogs:
    """Where each member's runtime log stood when a repeat began; `files` gives what each wrote
    since, as `logs/member-NAME.log` (the head's is `member-head`), for every member and every
    repeat (empty when it wrote nothing). The first repeat of a run also keeps the runtime's
    start-up (the end of its log, up to half the limit, as for the server's log)."""

    def __init__(self, pool: AgentPool, sut: SutHandle, first_repeat: bool, limit: int) -> None:
        self._pool = pool
        self._members: list[tuple[str, MemberHandle | SutHandle]] = (
            [(HEAD_MEMBER, sut), *((m.name, m) for m in sut.workers)] if sut.is_cluster else []
        )
        sizes = [pool.member_log_size(member) for _, member in self._members]
        self._offsets = [max(0, size - limit // 2) if first_repeat else size for size in sizes]

    def files(self, limit: int) -> dict[str, bytes]:
        return {
            f"logs/member-{name}.log": self._pool.member_log(member, offset, limit)
            for (name, member), offset in zip(self._members, self._offsets, strict=True)
        }


def cluster_record(pool: AgentPool, sut: SutHandle) -> controller_pb2.SutClusterRecord | None:
    """The cluster as it stood at the end of a repeat: each member, its node, address, status and
    placement; None for a SUT that is no cluster."""
    if not sut.is_cluster:
        return None
    return controller_pb2.SutClusterRecord(
        runtime=sut.config.cluster.runtime, members=pool.cluster_members(sut, placements=True)
    )
