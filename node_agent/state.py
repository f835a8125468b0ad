"""Leases and the record of what MECBench installed, in a small sqlite database.

Every shaping and every GPU allocation is held by a lease (owner, expiry). The database is the
source of truth, so a restarted agent, or several agents sharing the state directory, see the
same leases: a renewal through any of them counts, and whichever notices a lapsed lease removes
what it held. Shaping is recorded *before* it is installed ("installing") and marked "installed"
after, so a crash in between leaves a record for the reconcile to clean up, never an unknown qdisc.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mecbench.core.logging import get_logger

log = get_logger("mecbench.node_agent.state")

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    expires_at REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shapings (
    shaping_id TEXT PRIMARY KEY,
    lease_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    interface TEXT NOT NULL,
    ifindex INTEGER NOT NULL,
    netns_kind TEXT NOT NULL,
    netns_ref TEXT NOT NULL,
    netns_path TEXT NOT NULL,
    netns_identity TEXT NOT NULL,
    egress INTEGER NOT NULL,
    ingress INTEGER NOT NULL,
    ifb_name TEXT NOT NULL,
    ifb_ifindex INTEGER NOT NULL,
    request BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_allocations (
    gpu_uuid TEXT PRIMARY KEY,
    gpu_index INTEGER NOT NULL,
    lease_id TEXT NOT NULL,
    owner TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    placement_id TEXT PRIMARY KEY,
    lease_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER NOT NULL,
    cpus TEXT NOT NULL,
    exclusive INTEGER NOT NULL,
    return_to TEXT NOT NULL,
    request BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    owner: str
    kind: str  # "shaping", "gpus" or "placement"
    expires_at: float  # unix time

    def live(self, now: float | None = None) -> bool:
        return self.expires_at > (time.time() if now is None else now)


@dataclass(frozen=True)
class ShapingRecord:
    shaping_id: str
    lease_id: str
    owner: str
    state: str  # "installing" or "installed"
    interface: str
    ifindex: int
    netns_kind: str
    netns_ref: str
    netns_path: str
    netns_identity: str
    egress: bool
    ingress: bool
    ifb_name: str
    ifb_ifindex: int
    request: bytes  # the ApplyShapingRequest, serialized
    created_at: float


@dataclass(frozen=True)
class GpuAllocationRecord:
    gpu_uuid: str
    gpu_index: int
    lease_id: str
    owner: str


@dataclass(frozen=True)
class PlacementRecord:
    placement_id: str  # also the name of its cgroup
    lease_id: str
    owner: str
    state: str  # "placing" (recorded before the group is made) or "placed"
    pid: int
    cpus: str  # the cores it is pinned to ("0,1"), "" = not pinned
    exclusive: bool  # the cores are reserved: no other placement may use them
    return_to: str  # JSON {hierarchy: group} the process came from, where it goes back on release
    request: bytes  # the PlaceProcessRequest, serialized
    created_at: float


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class StateStore:
    """Thread-safe access to the state database (one connection, one lock)."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- leases --------------------------------------------------------------------------------

    def create_lease(self, owner: str, kind: str, duration_s: float) -> LeaseRecord:
        now = time.time()
        lease = LeaseRecord(new_id("lease"), owner, kind, now + duration_s)
        with self._lock:
            self._db.execute(
                "INSERT INTO leases (lease_id, owner, kind, expires_at, created_at) VALUES (?, ?, ?, ?, ?)",
                (lease.lease_id, owner, kind, lease.expires_at, now),
            )
        return lease

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
        return _lease(row) if row else None

    def renew_lease(self, lease_id: str, duration_s: float) -> LeaseRecord | None:
        """Extend a live lease; None if it is unknown or has lapsed (what it held is going away)."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
            if row is None or row["expires_at"] <= now:
                return None
            db.execute("UPDATE leases SET expires_at = ? WHERE lease_id = ?", (now + duration_s, lease_id))
        return LeaseRecord(lease_id, row["owner"], row["kind"], now + duration_s)

    def delete_lease(self, lease_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))

    def lapsed_leases(self, now: float | None = None) -> list[LeaseRecord]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT * FROM leases WHERE expires_at <= ?", (now,)).fetchall()
        return [_lease(r) for r in rows]

    def leases(self) -> list[LeaseRecord]:
        with self._lock:
            return [_lease(r) for r in self._db.execute("SELECT * FROM leases").fetchall()]

    # --- shaping -------------------------------------------------------------------------------

    def add_shaping(self, record: ShapingRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO shapings (shaping_id, lease_id, owner, state, interface, ifindex, netns_kind, "
                "netns_ref, netns_path, netns_identity, egress, ingress, ifb_name, ifb_ifindex, request, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.shaping_id, record.lease_id, record.owner, record.state, record.interface,
                    record.ifindex, record.netns_kind, record.netns_ref, record.netns_path, record.netns_identity,
                    int(record.egress), int(record.ingress), record.ifb_name, record.ifb_ifindex, record.request,
                    record.created_at,
                ),
            )

    def mark_installed(self, shaping_id: str, ifb_ifindex: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE shapings SET state = 'installed', ifb_ifindex = ? WHERE shaping_id = ?",
                (ifb_ifindex, shaping_id),
            )

    def delete_shaping(self, shaping_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM shapings WHERE shaping_id = ?", (shaping_id,))

    def shapings(self) -> list[ShapingRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM shapings ORDER BY created_at").fetchall()
        return [_shaping(r) for r in rows]

    def shaping(self, shaping_id: str) -> ShapingRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM shapings WHERE shaping_id = ?", (shaping_id,)).fetchone()
        return _shaping(row) if row else None

    def shapings_of_lease(self, lease_id: str) -> list[ShapingRecord]:
        return [s for s in self.shapings() if s.lease_id == lease_id]

    # --- GPUs ----------------------------------------------------------------------------------

    def allocate_gpus(self, records: list[GpuAllocationRecord]) -> None:
        with self.transaction() as db:
            for r in records:
                db.execute(
                    "INSERT INTO gpu_allocations (gpu_uuid, gpu_index, lease_id, owner) VALUES (?, ?, ?, ?)",
                    (r.gpu_uuid, r.gpu_index, r.lease_id, r.owner),
                )

    def gpu_allocations(self) -> list[GpuAllocationRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM gpu_allocations ORDER BY gpu_index").fetchall()
        return [GpuAllocationRecord(r["gpu_uuid"], r["gpu_index"], r["lease_id"], r["owner"]) for r in rows]

    def release_gpus(self, lease_id: str) -> list[GpuAllocationRecord]:
        with self.transaction() as db:
            rows = db.execute("SELECT * FROM gpu_allocations WHERE lease_id = ?", (lease_id,)).fetchall()
            db.execute("DELETE FROM gpu_allocations WHERE lease_id = ?", (lease_id,))
        return [GpuAllocationRecord(r["gpu_uuid"], r["gpu_index"], r["lease_id"], r["owner"]) for r in rows]


    # --- placements ----------------------------------------------------------------------------

    def add_placement(self, record: PlacementRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO placements (placement_id, lease_id, owner, state, pid, cpus, exclusive, return_to, "
                "request, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.placement_id, record.lease_id, record.owner, record.state, record.pid, record.cpus,
                    int(record.exclusive), record.return_to, record.request, record.created_at,
                ),
            )

    def mark_placed(self, placement_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE placements SET state = 'placed' WHERE placement_id = ?", (placement_id,))

    def delete_placement(self, placement_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM placements WHERE placement_id = ?", (placement_id,))

    def placements(self) -> list[PlacementRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM placements ORDER BY created_at").fetchall()
        return [
            PlacementRecord(
                placement_id=r["placement_id"], lease_id=r["lease_id"], owner=r["owner"], state=r["state"],
                pid=r["pid"], cpus=r["cpus"], exclusive=bool(r["exclusive"]), return_to=r["return_to"],
                request=bytes(r["request"]), created_at=r["created_at"],
            )
            for r in rows
        ]


def _lease(row: sqlite3.Row) -> LeaseRecord:
    return LeaseRecord(row["lease_id"], row["owner"], row["kind"], row["expires_at"])


def _shaping(row: sqlite3.Row) -> ShapingRecord:
    return ShapingRecord(
        shaping_id=row["shaping_id"],
        lease_id=row["lease_id"],
        owner=row["owner"],
        state=row["state"],
        interface=row["interface"],
        ifindex=row["ifindex"],
        netns_kind=row["netns_kind"],
        netns_ref=row["netns_ref"],
        netns_path=row["netns_path"],
        netns_identity=row["netns_identity"],
        egress=bool(row["egress"]),
        ingress=bool(row["ingress"]),
        ifb_name=row["ifb_name"],
        ifb_ifindex=row["ifb_ifindex"],
        request=bytes(row["request"]),
        created_at=row["created_at"],
    )


class Reaper:
    """A background thread that calls `reap()` every `interval_s` (and when woken), so what a
    lapsed lease held is removed within about one interval of its expiry."""

    def __init__(self, reap: Callable[[], None], interval_s: float) -> None:
        self._reap = reap
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
            except Exception:
                log.exception("reap_failed")
            self._wake.wait(self._interval_s)
            self._wake.clear()
