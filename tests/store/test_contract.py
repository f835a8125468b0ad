"""One contract, every backend: the local directory and S3 (a real server on loopback)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from mecbench.core.errors import NotFound
from store.base import ObjectStore, ObjectTooLarge, StoreError
from store.local import LocalDirStore


def test_init_reports_created_then_already_there(object_store: ObjectStore) -> None:
    first = object_store.init_buckets()
    assert [(b.name, b.created) for b in first] == [(object_store.results_bucket, True), (object_store.blobs_bucket, True)]
    assert [b.created for b in object_store.init_buckets()] == [False, False]


def test_objects_round_trip_byte_for_byte(object_store: ObjectStore) -> None:
    object_store.init_buckets()
    bucket = object_store.results_bucket
    payload = os.urandom(3 * 1024 * 1024 + 17)
    object_store.put(bucket, "exp/sel/run-1/repeat-1/mlperf_log_detail.txt", payload, "text/plain")
    object_store.put(bucket, "exp/sel/run-1/repeat-1/result.json", b"{}", "application/json")
    object_store.put(bucket, "exp/other/run-2/repeat-1/result.json", b"[]", "application/json")
    assert object_store.get(bucket, "exp/sel/run-1/repeat-1/mlperf_log_detail.txt") == payload
    assert object_store.size(bucket, "exp/sel/run-1/repeat-1/mlperf_log_detail.txt") == len(payload)
    assert object_store.list(bucket, "exp/sel/") == [
        "exp/sel/run-1/repeat-1/mlperf_log_detail.txt", "exp/sel/run-1/repeat-1/result.json"
    ]
    assert len(object_store.list(bucket)) == 3
    object_store.put(bucket, "exp/sel/run-1/repeat-1/result.json", b'{"v": 2}')
    assert object_store.get(bucket, "exp/sel/run-1/repeat-1/result.json") == b'{"v": 2}'
    assert object_store.exists(bucket, "exp/sel/run-1/repeat-1/result.json")
    object_store.delete(bucket, "exp/sel/run-1/repeat-1/result.json")
    object_store.delete(bucket, "exp/sel/run-1/repeat-1/result.json")  # missing is not an error
    assert not object_store.exists(bucket, "exp/sel/run-1/repeat-1/result.json")


def test_missing_objects_and_buckets_are_not_found_by_name(object_store: ObjectStore) -> None:
    with pytest.raises(NotFound, match=object_store.results_bucket):
        object_store.put(object_store.results_bucket, "a/b.json", b"{}")
    with pytest.raises(NotFound, match=object_store.results_bucket):
        object_store.get(object_store.results_bucket, "a/b.json")
    object_store.init_buckets()
    with pytest.raises(NotFound, match=r"a/b\.json"):
        object_store.get(object_store.results_bucket, "a/b.json")
    with pytest.raises(NotFound, match=r"a/b\.json"):
        object_store.size(object_store.results_bucket, "a/b.json")


@pytest.mark.parametrize("key", ["", "/abs", "dir/", "../escape", "a/../../b"])
def test_bad_keys_are_refused(object_store: ObjectStore, key: str) -> None:
    object_store.init_buckets()
    with pytest.raises(StoreError):
        object_store.put(object_store.results_bucket, key, b"x")
    assert object_store.list(object_store.results_bucket) == []


def test_uri_names_the_object(object_store: ObjectStore) -> None:
    uri = object_store.uri(object_store.results_bucket, "e/s/r/repeat-1/")
    assert uri.endswith(f"{object_store.results_bucket}/e/s/r/repeat-1/")
    assert uri.startswith(("s3://", "file://"))


def test_a_read_with_a_byte_limit_refuses_an_object_over_it(object_store: ObjectStore) -> None:
    object_store.init_buckets()
    bucket = object_store.blobs_bucket
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several of the S3 reader's chunks
    object_store.put(bucket, "datasets/big.bin", payload)
    object_store.put(bucket, "datasets/empty.bin", b"")
    assert object_store.get(bucket, "datasets/big.bin", max_bytes=len(payload)) == payload
    assert object_store.get(bucket, "datasets/empty.bin", max_bytes=0) == b""
    for limit in (len(payload) - 1, 1024, 0):
        with pytest.raises(ObjectTooLarge, match=r"datasets/big\.bin.* larger than") as error:
            object_store.get(bucket, "datasets/big.bin", max_bytes=limit)
        assert error.value.limit == limit
    with pytest.raises(NotFound, match=r"datasets/none\.bin"):
        object_store.get(bucket, "datasets/none.bin", max_bytes=10)


def test_the_local_store_counts_the_bytes_it_reads_not_the_size_reported(tmp_path: Path) -> None:
    """An object whose reported size (0: a pipe's) is under the limit while its content is over it,
    as a file that grows while it is read: the count refuses it."""
    store = LocalDirStore(tmp_path / "store")
    store.init_buckets()
    store.put(store.blobs_bucket, "datasets/growing.bin", b"")
    path = tmp_path / "store" / store.blobs_bucket / "datasets" / "growing.bin"
    path.unlink()
    os.mkfifo(path)

    def write(count: int) -> None:
        with path.open("wb") as pipe:
            pipe.write(b"x" * count)

    for count, limit in ((2000, 1000), (1000, 1000)):
        writer = threading.Thread(target=write, args=(count,), daemon=True)  # never blocks the exit
        writer.start()
        try:
            if count > limit:
                with pytest.raises(ObjectTooLarge, match="larger than 1000 bytes"):
                    store.get(store.blobs_bucket, "datasets/growing.bin", max_bytes=limit)
            else:
                assert store.get(store.blobs_bucket, "datasets/growing.bin", max_bytes=limit) == b"x" * count
        finally:
            writer.join(10)
