"""Datasets referenced by URI: local paths, file:// and s3:// (a real S3 server), the cache, the
sample formats, and a LoadGen session that runs on one."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from loadgen_agent import datasets
from loadgen_agent.datasets import load_samples, uri_problem
from mecbench.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from mecbench.v1 import common_pb2
from store.s3 import S3Store
from store.settings import StoreSettings
from tests.conftest import field_violations
from tests.loadgen_agent.conftest import Agent, run_test, short_settings, start_stand_in_sut
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server

MEMBERS = {
    "b/2.bin": b"second sample",
    "a/deeper/1.bin": b"first",
    "c.bin": b"\x00\x01\x02third",
    "../evil": b"stays in memory",
}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    """A tar archive of `members`, with a directory entry and a symlink that are not samples."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        directory = tarfile.TarInfo("a")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        link = tarfile.TarInfo("link-to-c")
        link.type = tarfile.SYMTYPE
        link.linkname = "c.bin"
        archive.addfile(link)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def in_name_order(members: dict[str, bytes]) -> list[bytes]:
    return [members[name] for name in sorted(members)]


def fetch(uri: str, sha256: str, cache: Path, s3: StoreSettings | None = None) -> Path:
    """`datasets.fetch` as an operator who lets local datasets come from the temporary directory."""
    return datasets.fetch(uri, sha256, cache, s3, local_roots=(Path(tempfile.gettempdir()),))


def cached_files(cache: Path) -> list[Path]:
    """Everything in the cache, temporary files included."""
    return [path for path in cache.rglob("*") if path.is_file()] if cache.exists() else []


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A gzipped tar of MEMBERS in a directory of its own."""
    directory = tmp_path / "data"
    directory.mkdir()
    path = directory / "samples.tar.gz"
    path.write_bytes(tar_bytes(MEMBERS))
    return path


# --- URIs and fetching ---------------------------------------------------------------------------


def test_local_path_is_copied_into_the_cache_under_its_digest(source: Path, cache: Path) -> None:
    fetched = fetch(str(source), "", cache)
    assert fetched.read_bytes() == source.read_bytes()
    assert fetched.name == digest(source.read_bytes())
    assert fetched.is_relative_to(cache)
    assert cached_files(cache) == [fetched]  # no temporary file left


def test_file_uri(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "with space" / "one sample.bin"
    path.parent.mkdir()
    path.write_bytes(b"payload")
    assert path.as_uri().startswith("file:///") and "%20" in path.as_uri()
    assert load_samples(fetch(path.as_uri(), "", cache)) == [b"payload"]
    assert load_samples(fetch(f"file://localhost{path}", "", cache)) == [b"payload"]


def test_sha256_match_in_any_case(source: Path, cache: Path) -> None:
    expected = digest(source.read_bytes())
    assert fetch(str(source), expected.upper(), cache).name == expected


def test_sha256_mismatch_names_both_digests_and_caches_nothing(source: Path, cache: Path) -> None:
    actual = digest(source.read_bytes())
    wrong = digest(b"something else")
    with pytest.raises(InvalidArgument) as mismatch:
        fetch(str(source), wrong, cache)
    assert [v.field for v in mismatch.value.violations] == ["dataset.sha256"]
    assert wrong in str(mismatch.value) and actual in str(mismatch.value)
    assert cached_files(cache) == []


def test_a_cached_digest_is_not_fetched_again(source: Path, cache: Path) -> None:
    expected = digest(source.read_bytes())
    first = fetch(source.as_uri(), expected, cache)
    source.unlink()  # a second read of the source would now fail
    assert fetch(source.as_uri(), expected, cache) == first
    assert load_samples(first) == in_name_order(MEMBERS)
    # Without the digest nothing says the cached copy is still what the URI holds: fetched again.
    with pytest.raises(NotFound):
        fetch(source.as_uri(), "", cache)


def test_missing_file_is_not_found(tmp_path: Path, cache: Path) -> None:
    missing = tmp_path / "nowhere.tar"
    for uri in (str(missing), missing.as_uri()):
        with pytest.raises(NotFound) as error:
            fetch(uri, "", cache)
        assert uri in str(error.value)
    assert cached_files(cache) == []


def test_a_directory_is_not_a_dataset(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(InvalidArgument) as error:
        fetch(str(tmp_path), "", cache)
    assert "tar" in str(error.value)


def test_bad_uris_are_invalid_arguments(cache: Path) -> None:
    bad = {
        "http://example.com/data.tar": "unsupported scheme",
        "s3://bucket-only": "bucket and a key",
        "s3://bucket/dir/": "invalid S3 key",
        "s3://bucket/a/../b": "invalid S3 key",
        "file://elsewhere/data.tar": "not host",
        " ": "must not be empty",
    }
    for uri, reason in bad.items():
        problem = uri_problem(uri)
        assert problem is not None and reason in problem, uri
        with pytest.raises(InvalidArgument) as error:
            fetch(uri, "", cache)
        assert [v.field for v in error.value.violations] == ["dataset.uri"]
    for good in ("s3://bucket/datasets/a.tar", "file:///data/a.npy", "relative/a.bin", "/abs/a.bin"):
        assert uri_problem(good) is None, good


# --- samples -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_members_are_samples_in_name_order(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "archive"
    path.write_bytes(tar_bytes(MEMBERS, mode))
    # Work from a directory where `../evil` would land if anything were extracted.
    workdir = tmp_path / "work"
    workdir.mkdir()
    before = set(tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        samples = load_samples(path)
    finally:
        os.chdir(cwd)
    assert samples == in_name_order(MEMBERS)  # no directory entry, no symlink
    assert set(tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil").exists()


def test_a_later_member_replaces_an_earlier_one_of_the_same_name(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for data in (b"old", b"new"):
            info = tarfile.TarInfo("x.bin")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path = tmp_path / "dup.tar"
    path.write_bytes(buffer.getvalue())
    assert load_samples(path) == [b"new"]


def test_an_archive_without_files_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "empty.tar"
    path.write_bytes(tar_bytes({}))
    with pytest.raises(InvalidArgument) as error:
        load_samples(path)
    assert [v.field for v in error.value.violations] == ["dataset.uri"]


def test_npy_rows_are_samples(tmp_path: Path, cache: Path) -> None:
    array = np.arange(15, dtype=np.float32).reshape(5, 3)
    path = tmp_path / "rows.npy"
    np.save(path, array)
    # Through the cache, where the file has lost its suffix: recognised by its magic bytes.
    samples = load_samples(fetch(str(path), "", cache))
    assert samples == [row.tobytes() for row in array]
    assert np.frombuffer(samples[2], dtype=np.float32).tolist() == [6.0, 7.0, 8.0]

    fortran = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    np.save(path, fortran)
    assert load_samples(path) == [np.array([0, 1, 2]).tobytes(), np.array([3, 4, 5]).tobytes()]


@pytest.mark.parametrize(
    "array",
    [np.float32(1.0), np.zeros((0, 4), dtype=np.uint8), np.array([{"a": 1}], dtype=object)],
    ids=["scalar", "no-rows", "objects"],
)
def test_unusable_npy_is_invalid(tmp_path: Path, array: np.ndarray[Any, Any]) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(InvalidArgument) as error:
        load_samples(path)
    assert [v.field for v in error.value.violations] == ["dataset.uri"]


def test_any_other_file_is_one_sample(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x1f\x8b not really gzip")
    assert load_samples(path) == [b"\x1f\x8b not really gzip"]
    path.write_bytes(b"")
    assert load_samples(path) == [b""]


def test_samples_over_the_limit_are_refused(source: Path, tmp_path: Path) -> None:
    total = sum(len(data) for data in MEMBERS.values())
    assert len(load_samples(source, max_bytes=total)) == len(MEMBERS)
    with pytest.raises(InvalidArgument, match="over the agent's limit"):
        load_samples(source, max_bytes=total - 1)
    path = tmp_path / "big.npy"
    np.save(path, np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(InvalidArgument, match="over the agent's limit"):
        load_samples(path, max_bytes=15)


# --- s3:// against a real S3 server -----------------------------------------------------------------


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Store]:
    store = s3_server.store()
    store.init_buckets()
    yield store
    store.close()


def s3_settings(s3_server: S3Server, secret_key: str = SECRET_KEY) -> StoreSettings:
    return StoreSettings(endpoint=s3_server.endpoint, access_key=ACCESS_KEY, secret_key=secret_key, secure=False)


def test_s3_uri_is_downloaded_once(
    s3: S3Store, s3_server: S3Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tar_bytes(MEMBERS)
    s3.put(s3.blobs_bucket, "datasets/test-fetch.tar.gz", data)
    uri = f"s3://{s3.blobs_bucket}/datasets/test-fetch.tar.gz"
    # The settings come from the MECBENCH_STORE_* environment, as in a session process.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    fetched = fetch(uri, digest(data), cache)
    assert load_samples(fetched) == in_name_order(MEMBERS)

    s3.delete(s3.blobs_bucket, "datasets/test-fetch.tar.gz")
    assert fetch(uri, digest(data), cache) == fetched  # from the cache: the object is gone
    with pytest.raises(NotFound):
        fetch(uri, "", cache)


def test_an_s3_object_over_the_agents_limit_is_refused_and_nothing_cached(
    s3: S3Store, s3_server: S3Server, cache: Path
) -> None:
    s3.put(s3.blobs_bucket, "datasets/too-big.bin", b"y" * 1001)
    uri = f"s3://{s3.blobs_bucket}/datasets/too-big.bin"
    with pytest.raises(InvalidArgument) as error:
        datasets.fetch(uri, "", cache, s3_settings(s3_server), max_bytes=1000)
    assert [(v.field, v.description) for v in error.value.violations] == [
        ("dataset.uri", "larger than the LoadGen agent's limit of 1000 bytes")]
    assert cached_files(cache) == []
    assert load_samples(datasets.fetch(uri, "", cache, s3_settings(s3_server), max_bytes=1001)) == [b"y" * 1001]


def test_s3_missing_key_is_not_found(s3: S3Store, s3_server: S3Server, cache: Path) -> None:
    uri = f"s3://{s3.blobs_bucket}/datasets/no-such-object.tar"
    with pytest.raises(NotFound) as error:
        fetch(uri, "", cache, s3_settings(s3_server))
    assert "datasets/no-such-object.tar" in str(error.value)
    assert cached_files(cache) == []


def test_s3_wrong_credentials_are_permission_denied(s3: S3Store, s3_server: S3Server, cache: Path) -> None:
    s3.put(s3.blobs_bucket, "datasets/secret.bin", b"x")
    with pytest.raises(PermissionDenied) as error:
        fetch(f"s3://{s3.blobs_bucket}/datasets/secret.bin", "", cache, s3_settings(s3_server, "not-the-secret"))
    assert ACCESS_KEY in str(error.value) and "not-the-secret" not in str(error.value)


def test_s3_without_an_endpoint_says_what_to_set(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MECBENCH_STORE_"):
            monkeypatch.delenv(name)
    with pytest.raises(FailedPrecondition) as error:
        fetch("s3://mecbench-blobs/datasets/a.tar", "", cache)
    for variable in ("MECBENCH_STORE_ENDPOINT", "MECBENCH_STORE_ACCESS_KEY", "MECBENCH_STORE_SECRET_KEY"):
        assert variable in str(error.value)


# --- through the LoadGen agent ---------------------------------------------------------------------



def test_session_on_a_file_uri_tar(agent: Agent, source: Path) -> None:
    recording = start_stand_in_sut(0.001)
    assert recording.stand_in is not None
    expected = in_name_order(MEMBERS)
    dataset = common_pb2.DatasetSpec(uri=source.as_uri(), sha256=digest(source.read_bytes()))
    try:
        opened = agent.open(recording.address, dataset=dataset)
        assert opened.sample_count == len(MEMBERS)
        outcome = run_test(agent, opened.session_id, short_settings(common_pb2.SCENARIO_OFFLINE))
        assert outcome.finished is not None and not outcome.finished.cancelled
        assert outcome.result.sample_count > 0
        received = recording.stand_in.received
        assert received and all(payload == expected[index] for index, payload in received)
        assert {index for index, _ in received} == set(range(len(MEMBERS)))
        agent.close(opened.session_id)

        # The same dataset again, its source gone: the agent's cache has it under its digest.
        source.unlink()
        again = agent.open(recording.address, dataset=dataset)
        assert again.sample_count == len(MEMBERS)
        agent.close(again.session_id)

        with pytest.raises(grpc.RpcError) as mismatch:
            agent.open(recording.address, dataset=common_pb2.DatasetSpec(uri=source.as_uri(), sha256="0" * 64))
        assert mismatch.value.code() == grpc.StatusCode.NOT_FOUND  # not cached, and the source is gone
        with pytest.raises(grpc.RpcError) as scheme:
            agent.open(recording.address, dataset=common_pb2.DatasetSpec(uri="ftp://host/data.tar"))
        assert scheme.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(scheme.value).keys() == {"dataset.uri"}
    finally:
        recording.stop()


def test_session_on_an_s3_uri_with_a_wrong_digest(
    agent: Agent, s3: S3Store, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = start_stand_in_sut(0.001)
    data = tar_bytes(MEMBERS, "w:xz")
    s3.put(s3.blobs_bucket, "datasets/session.tar.xz", data)
    uri = f"s3://{s3.blobs_bucket}/datasets/session.tar.xz"
    # Session processes inherit the agent's environment when they start.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(grpc.RpcError) as mismatch:
            agent.open(recording.address, dataset=common_pb2.DatasetSpec(uri=uri, sha256="ab" * 32))
        assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(mismatch.value).keys() == {"dataset.sha256"}
        assert digest(data) in (mismatch.value.details() or "")

        opened = agent.open(recording.address, dataset=common_pb2.DatasetSpec(uri=uri, sha256=digest(data)))
        assert opened.sample_count == len(MEMBERS)
        agent.close(opened.session_id)
    finally:
        recording.stop()
