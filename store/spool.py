"""Results go to local disk before they go to the store: a write-ahead spool.

Each batch (one repeat's files) is first written whole into the spool directory (a temporary
folder renamed into place, so a batch is there complete or not at all), and only then uploaded,
object by object, each retried with exponential backoff. An uploaded object's file is removed
from the batch; an emptied batch is removed. What the store did not take stays on disk and a
background flusher offers it again until it does; a controller that crashes or is killed
mid-upload finds the batch on restart and the flusher finishes it. Nothing measured is lost to a
store outage, wrong credentials or a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mecbench.core.logging import get_logger
from store.base import ObjectStore

log = get_logger("mecbench.store.spool")

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PendingObject:
    bucket: str
    key: str
    data: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class SpooledBatch:
    batch_id: str
    owner: str
    remaining: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UploadSpool:
    def __init__(
        self,
        store: ObjectStore,
        directory: Path,
        attempts: int = 4,
        backoff_s: float = 0.25,
        flush_interval_s: float = 2.0,
        on_drained: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.flush_interval_s = flush_interval_s
        self.on_drained = on_drained
        self.last_error = ""
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        # One upload at a time, so objects reach the store in the order they were spooled.
        self._upload_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._discard_incomplete()

    # --- writing ------------------------------------------------------------------------------

    def write(self, owner: str, objects: list[PendingObject]) -> int:
        """Spool `objects` durably, then upload them. Returns how many are still spooled
        (0: all are in the store). Never raises for the store's failures."""
        batch_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.directory))
        entries = []
        for index, obj in enumerate(objects):
            name = f"{index:05d}.data"
            with (staging / name).open("wb") as handle:
                handle.write(obj.data)
                handle.flush()
                os.fsync(handle.fileno())
            entries.append({"file": name, "bucket": obj.bucket, "key": obj.key, "content_type": obj.content_type})
        (staging / MANIFEST).write_text(json.dumps({"owner": owner, "objects": entries}))
        _fsync_dir(staging)
        with self._lock:
            self._claimed.add(batch_id)
        os.rename(staging, self.directory / batch_id)
        _fsync_dir(self.directory)
        try:
            with self._upload_lock:
                # Older spooled batches go first: the store receives objects in the order they
                # were written, so an earlier version of a key (an experiment's manifest) never
                # lands over a later one. If they cannot go, this batch waits behind them.
                if self._flush_locked(before=batch_id):
                    remaining = len(entries)
                    self.last_error = self.last_error or "older spooled batches are still waiting"
                else:
                    remaining = self._upload(batch_id, retries=True, from_spool=False)
        finally:
            with self._lock:
                self._claimed.discard(batch_id)
        if remaining:
            log.warning("results_spooled", owner=owner, batch=batch_id, remaining=remaining, reason=self.last_error)
            self._wake.set()
        return remaining

    # --- uploading ----------------------------------------------------------------------------

    def _upload(self, batch_id: str, retries: bool, from_spool: bool) -> int:
        """Upload what is left of a batch; returns how many objects remain. `on_drained` is
        told when a batch that had to wait in the spool leaves its owner with nothing spooled."""
        folder = self.directory / batch_id
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            return 0
        remaining = 0
        for entry in manifest["objects"]:
            path = folder / entry["file"]
            if not path.exists():
                continue  # uploaded before
            if remaining or not self._put(entry, path.read_bytes(), retries):
                remaining += 1
                continue
            path.unlink()
        if not remaining:
            shutil.rmtree(folder, ignore_errors=True)
            owner = str(manifest["owner"])
            if from_spool and self.on_drained is not None and not any(b.owner == owner for b in self.pending()):
                self.on_drained(owner)
        return remaining

    def _put(self, entry: dict[str, str], data: bytes, retries: bool) -> bool:
        attempts = self.attempts if retries else 1
        for attempt in range(attempts):
            try:
                self.store.put(entry["bucket"], entry["key"], data, entry["content_type"])
                return True
            except Exception as exc:  # noqa: BLE001 - any failure keeps the object spooled, never lost
                self.last_error = f"{type(exc).__name__}: {exc}"
                if attempt + 1 < attempts:
                    time.sleep(self.backoff_s * 2**attempt)
        return False

    def flush(self) -> int:
        """One pass over the spooled batches, oldest first, stopping at the first the store does
        not take; returns how many objects remain spooled."""
        with self._upload_lock:
            return self._flush_locked()

    def _flush_locked(self, before: str | None = None) -> int:
        """Flush batches older than `before` (all when None) that no writer is uploading itself."""
        for batch in self.pending():
            if before is not None and batch.batch_id >= before:
                break
            with self._lock:
                if batch.batch_id in self._claimed:
                    continue
            left = self._upload(batch.batch_id, retries=False, from_spool=True)
            if left:
                break  # the store is still away
            log.info("spool_flushed", owner=batch.owner, batch=batch.batch_id)
        with self._lock:
            claimed = set(self._claimed)
        return sum(b.remaining for b in self.pending()
                   if (before is None or b.batch_id < before) and b.batch_id not in claimed)

    # --- state --------------------------------------------------------------------------------

    def pending(self) -> list[SpooledBatch]:
        batches = []
        for folder in sorted(self.directory.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            left = sum(1 for e in manifest["objects"] if (folder / e["file"]).exists())
            batches.append(SpooledBatch(folder.name, str(manifest["owner"]), left))
        return batches

    def pending_owners(self) -> set[str]:
        return {b.owner for b in self.pending()}

    def _discard_incomplete(self) -> None:
        """Staging folders are batches a crash interrupted before they were whole: their
        objects were never acknowledged to anyone, and the caller re-measured nothing from them."""
        for folder in self.directory.glob(".staging-*"):
            shutil.rmtree(folder, ignore_errors=True)

    # --- background flusher -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-flusher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.pending():
                    self.flush()
            except Exception:
                log.exception("spool_flush_failed")
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
