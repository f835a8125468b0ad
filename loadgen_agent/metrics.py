"""The LoadGen agent's own metrics, read from its sessions when Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from loadgen_agent.sessions import SessionManager
from mecbench.v1 import loadgen_agent_pb2

State = loadgen_agent_pb2.SessionState
# Every state a session that is not closed can be in, so one with no sessions reads 0.
SESSION_STATES = [
    (value, name.removeprefix("SESSION_STATE_"))
    for name, value in State.items()
    if value not in (State.SESSION_STATE_UNSPECIFIED, State.SESSION_STATE_CLOSED)
]
_NOT_OPEN = (State.SESSION_STATE_CLOSED, State.SESSION_STATE_FAILED)


class LoadGenCollector:
    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        sessions = self._manager.progress()
        yield GaugeMetricFamily(
            "mecbench_loadgen_sessions_open",
            "Sessions open (opening, idle or running a test).",
            value=sum(1 for s in sessions if s.state not in _NOT_OPEN),
        )
        by_state = GaugeMetricFamily("mecbench_loadgen_sessions", "Sessions not closed, by state.", labels=["state"])
        for value, name in SESSION_STATES:
            by_state.add_metric([name], sum(1 for s in sessions if s.state == value))
        yield by_state
        qps = GaugeMetricFamily(
            "mecbench_loadgen_live_qps",
            "Samples completed per second over the session's last progress interval; 0 between tests.",
            labels=["session", "owner"],
        )
        completed = CounterMetricFamily(
            "mecbench_loadgen_samples_completed",
            "Samples the SUT answered, over every test of the session.",
            labels=["session", "owner"],
        )
        for session in sessions:
            qps.add_metric([session.session_id, session.owner], session.live_qps)
            completed.add_metric([session.session_id, session.owner], session.samples_completed)
        yield qps
        yield completed
