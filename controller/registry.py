"""Run registry in sqlite: runs and result records survive a controller restart.

Each run row keeps the whole `Run` message (serialized protobuf) plus indexed columns for
queries; every update is one transaction, so a crash leaves the previous state whole.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mecbench.core.errors import NotFound
from mecbench.v1 import common_pb2, controller_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL,
    selector TEXT NOT NULL,
    state INTEGER NOT NULL,
    created_at REAL NOT NULL,
    run BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_experiment ON runs (experiment_id, created_at);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL,
    repeat INTEGER NOT NULL,
    experiment_id TEXT NOT NULL,
    selector TEXT NOT NULL,
    sut_backend TEXT NOT NULL,
    network_profile TEXT NOT NULL,
    scenario INTEGER NOT NULL,
    created_at REAL NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (run_id, repeat)
);
CREATE INDEX IF NOT EXISTS results_experiment ON results (experiment_id, selector);
CREATE TABLE IF NOT EXISTS experiments (
    experiment_id TEXT PRIMARY KEY,
    state INTEGER NOT NULL,
    created_at REAL NOT NULL,
    experiment BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry (
    run_id TEXT NOT NULL,
    node TEXT NOT NULL,
    time REAL NOT NULL,
    sample BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_run ON telemetry (run_id, time);
CREATE INDEX IF NOT EXISTS telemetry_node ON telemetry (node, time);
"""

ACTIVE_STATES = (
    common_pb2.RUN_STATE_PENDING,
    common_pb2.RUN_STATE_DEPLOYING,
    common_pb2.RUN_STATE_RUNNING,
    common_pb2.RUN_STATE_UPLOADING,
)


class RunRegistry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def save_run(self, run: controller_pb2.Run) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (run_id, experiment_id, selector, state, created_at, run)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id) DO UPDATE SET state = excluded.state, run = excluded.run",
                (
                    run.run_id,
                    run.spec.experiment_id,
                    run.spec.selector,
                    run.state,
                    run.created_at.ToNanoseconds() / 1e9,
                    run.SerializeToString(),
                ),
            )

    def get_run(self, run_id: str) -> controller_pb2.Run:
        with self._lock:
            row = self._db.execute("SELECT run FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run {run_id!r} not found")
        return controller_pb2.Run.FromString(row[0])

    def list_runs(
        self, experiment_id: str = "", state: int = 0, limit: int = 100, offset: int = 0
    ) -> list[controller_pb2.Run]:
        query = "SELECT run FROM runs WHERE 1 = 1"
        args: list[object] = []
        if experiment_id:
            query += " AND experiment_id = ?"
            args.append(experiment_id)
        if state:
            query += " AND state = ?"
            args.append(state)
        query += " ORDER BY created_at DESC, run_id LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [controller_pb2.Run.FromString(r[0]) for r in rows]

    def runs_in_states(self, states: tuple[int, ...]) -> list[controller_pb2.Run]:
        marks = ",".join("?" for _ in states)
        with self._lock:
            rows = self._db.execute(f"SELECT run FROM runs WHERE state IN ({marks})", states).fetchall()
        return [controller_pb2.Run.FromString(r[0]) for r in rows]

    def count_by_state(self, table: str) -> dict[int, int]:
        """Rows of `runs` or `experiments` per state, counted in sqlite (for metrics: no row is
        deserialized)."""
        if table not in ("runs", "experiments"):
            raise ValueError(f"no state column in {table!r}")
        with self._lock:
            rows = self._db.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state").fetchall()
        return {int(state): int(count) for state, count in rows}

    def save_experiment(self, experiment: controller_pb2.Experiment) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO experiments (experiment_id, state, created_at, experiment) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (experiment_id) DO UPDATE SET state = excluded.state,"
                " created_at = excluded.created_at, experiment = excluded.experiment",
                (experiment.experiment_id, experiment.state, experiment.created_at.ToNanoseconds() / 1e9,
                 experiment.SerializeToString()),
            )

    def get_experiment(self, experiment_id: str) -> controller_pb2.Experiment:
        with self._lock:
            row = self._db.execute(
                "SELECT experiment FROM experiments WHERE experiment_id = ?", (experiment_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"experiment {experiment_id!r} not found")
        return controller_pb2.Experiment.FromString(row[0])

    def list_experiments(self, states: tuple[int, ...] = ()) -> list[controller_pb2.Experiment]:
        query = "SELECT experiment FROM experiments"
        if states:
            query += f" WHERE state IN ({','.join('?' for _ in states)})"
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at, experiment_id", states).fetchall()
        return [controller_pb2.Experiment.FromString(r[0]) for r in rows]

    def save_result(self, record: controller_pb2.ResultRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO results (run_id, repeat, experiment_id, selector, sut_backend,"
                " network_profile, scenario, created_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.run_id,
                    record.repeat,
                    record.experiment_id,
                    record.selector,
                    record.sut_backend,
                    record.network_profile,
                    record.scenario,
                    record.created_at.ToNanoseconds() / 1e9,
                    record.SerializeToString(),
                ),
            )

    def list_results(self, request: controller_pb2.ListResultsRequest) -> list[controller_pb2.ResultRecord]:
        query = "SELECT record FROM results WHERE 1 = 1"
        args: list[object] = []
        for column, value in (
            ("experiment_id", request.experiment_id),
            ("selector", request.selector),
            ("sut_backend", request.sut_backend),
            ("network_profile", request.network_profile),
            ("run_id", request.run_id),
        ):
            if value:
                query += f" AND {column} = ?"
                args.append(value)
        if request.scenario:
            query += " AND scenario = ?"
            args.append(request.scenario)
        query += " ORDER BY created_at, run_id, repeat"
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [controller_pb2.ResultRecord.FromString(r[0]) for r in rows]

    def get_result(self, run_id: str, repeat: int) -> controller_pb2.ResultRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM results WHERE run_id = ? AND repeat = ?", (run_id, repeat)
            ).fetchone()
        if row is None:
            raise NotFound(f"no result for run {run_id!r} repeat {repeat}")
        return controller_pb2.ResultRecord.FromString(row[0])

    def save_telemetry(self, run_id: str, samples: list[common_pb2.TelemetrySample]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO telemetry (run_id, node, time, sample) VALUES (?, ?, ?, ?)",
                [(run_id, s.node, s.time.ToNanoseconds() / 1e9, s.SerializeToString()) for s in samples],
            )

    def telemetry(self, run_id: str = "", node: str = "", since: float = 0.0) -> list[common_pb2.TelemetrySample]:
        column, value = ("run_id", run_id) if run_id else ("node", node)
        with self._lock:
            rows = self._db.execute(
                f"SELECT sample FROM telemetry WHERE {column} = ? AND time >= ? ORDER BY time", (value, since)
            ).fetchall()
        return [common_pb2.TelemetrySample.FromString(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
