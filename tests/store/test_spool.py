"""The write-ahead spool: a store that goes away mid-batch loses nothing; a restart finds and
finishes what was spooled."""

from __future__ import annotations

import os
from pathlib import Path

from store.local import LocalDirStore
from store.spool import PendingObject, UploadSpool
from tests.s3server import S3Server


def _objects(bucket: str, prefix: str, count: int = 5) -> list[PendingObject]:
    return [PendingObject(bucket, f"{prefix}file-{i}.bin", os.urandom(200_000 + i)) for i in range(count)]


def test_everything_arrives_byte_for_byte_after_the_s3_server_comes_back(s3_server: S3Server, tmp_path: Path) -> None:
    store = s3_server.store("spool-results", "spool-blobs")
    store.init_buckets()
    drained: list[str] = []
    spool = UploadSpool(store, tmp_path / "spool", attempts=2, backoff_s=0.05, flush_interval_s=0.2,
                        on_drained=drained.append)
    first = _objects(store.results_bucket, "exp/sel/run-a/repeat-1/")
    assert spool.write("run-a", first) == 0 and not spool.pending()
    assert drained == []  # uploaded directly, nothing waited
    s3_server.stop()
    try:
        second = _objects(store.results_bucket, "exp/sel/run-a/repeat-2/")
        assert spool.write("run-a", second) == len(second)
        assert spool.pending_owners() == {"run-a"} and "Unavailable" in spool.last_error
        assert spool.flush() == len(second)  # still down: nothing lost, nothing dropped
    finally:
        s3_server.start()
    assert spool.flush() == 0
    assert drained == ["run-a"]
    for obj in first + second:
        assert store.get(obj.bucket, obj.key) == obj.data
    assert not any((tmp_path / "spool").iterdir())


def test_a_restarted_writer_finishes_a_spooled_batch_and_drops_unfinished_staging(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "store")  # buckets not created: every put fails
    spool = UploadSpool(store, tmp_path / "spool", attempts=1)
    objects = _objects(store.results_bucket, "e/s/run-b/repeat-1/", 3)
    assert spool.write("run-b", objects) == 3
    (tmp_path / "spool" / ".staging-crashed").mkdir()  # a crash while a batch was being written
    store.init_buckets()
    reopened = UploadSpool(store, tmp_path / "spool", attempts=1, flush_interval_s=0.05)
    assert not (tmp_path / "spool" / ".staging-crashed").exists()
    assert [b.remaining for b in reopened.pending()] == [3]
    assert reopened.flush() == 0
    assert [store.get(o.bucket, o.key) for o in objects] == [o.data for o in objects]


def test_a_later_version_of_an_object_is_never_overwritten_by_an_earlier_spooled_one(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "store")  # buckets not created yet: the store "is down"
    spool = UploadSpool(store, tmp_path / "spool", attempts=1)
    key = "exp/manifest.json"
    assert spool.write("exp", [PendingObject(store.results_bucket, key, b"version 1")]) == 1
    assert spool.write("exp", [PendingObject(store.results_bucket, key, b"version 2")]) == 1
    store.init_buckets()  # the store is back; the next write must not jump the queue
    assert spool.write("exp", [PendingObject(store.results_bucket, key, b"version 3")]) == 0
    assert spool.flush() == 0 and not spool.pending()
    assert store.get(store.results_bucket, key) == b"version 3"
