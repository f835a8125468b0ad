"""Blobs and datasets uploaded through a real controller (SDK and raw gRPC), and a run that reads
the uploaded dataset through the LoadGen agent."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import grpc
import pytest

from mecbench.client import Client
from mecbench.client_errors import AlreadyExistsError
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2
from tests.conftest import field_violations
from tests.controller.conftest import Stack, short_settings


def _tar(path: Path, samples: int = 24) -> Path:
    with tarfile.open(path, "w") as archive:
        for index in range(samples):
            data = f"sample {index:03d} ".encode() * 8
            info = tarfile.TarInfo(f"samples/{index:03d}.bin")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def client(stack: Stack) -> Client:
    port = stack.server.port
    return Client(f"127.0.0.1:{port}")


def test_a_dataset_uploaded_with_the_sdk_is_what_a_run_reads(stack: Stack, client: Client, tmp_path: Path) -> None:
    archive = _tar(tmp_path / "images-24.tar")
    dataset = client.upload_dataset(archive, "images-24.tar")
    assert dataset.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    listed = {blob.uri: blob for blob in client.list_blobs("datasets/")}
    assert listed[dataset.uri].size_bytes == archive.stat().st_size
    assert listed[dataset.uri].content_type == "application/x-tar"
    stored = stack.app.store.get(stack.app.store.blobs_bucket, "datasets/images-24.tar")
    assert stored == archive.read_bytes()

    spec = controller_pb2.RunSpec(
        experiment_id="blobs",
        selector="uploaded-dataset",
        sut_id="sut-2ms",
        settings=short_settings(
            common_pb2.SCENARIO_SINGLE_STREAM, single_stream_expected_latency=durations.from_seconds(0.002)
        ),
        dataset=dataset,
    )
    run = stack.wait(client.start_run(spec).run_id)
    assert run.state == common_pb2.RUN_STATE_SUCCEEDED, run.error
    assert run.results[0].aggregate.valid


def test_a_checksum_mismatch_stores_nothing(stack: Stack, client: Client) -> None:
    header = controller_pb2.BlobHeader(key="configs/user.conf", sha256=hashlib.sha256(b"other").hexdigest())
    parts = [controller_pb2.UploadBlobRequest(header=header), controller_pb2.UploadBlobRequest(chunk=b"*.Server.x = 1")]
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.UploadBlob(iter(parts))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.sha256" in field_violations(caught.value)
    assert not stack.app.store.exists(stack.app.store.blobs_bucket, "configs/user.conf")


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        ([controller_pb2.UploadBlobRequest(header=controller_pb2.BlobHeader(key="../etc/passwd"))], "header.key"),
        ([controller_pb2.UploadBlobRequest(header=controller_pb2.BlobHeader(key=""))], "header.key"),
        ([controller_pb2.UploadBlobRequest(header=controller_pb2.BlobHeader(key="a", sha256="XYZ"))], "header.sha256"),
        ([controller_pb2.UploadBlobRequest(chunk=b"data first")], "header"),
        ([], "header"),
    ],
)
def test_bad_uploads_name_the_field(stack: Stack, parts: list[controller_pb2.UploadBlobRequest], field: str) -> None:
    before = stack.app.store.list(stack.app.store.blobs_bucket, "")
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.UploadBlob(iter(parts))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert stack.app.store.list(stack.app.store.blobs_bucket, "") == before


def test_an_existing_blob_is_replaced_only_when_asked(stack: Stack, client: Client, tmp_path: Path) -> None:
    first = tmp_path / "user.conf"
    first.write_text("*.Server.target_qps = 100\n")
    client.upload_blob(first, "configs/replace-me.conf")
    second = tmp_path / "user2.conf"
    second.write_text("*.Server.target_qps = 200\n")
    with pytest.raises(AlreadyExistsError) as caught:
        client.upload_blob(second, "configs/replace-me.conf")
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert stack.app.store.get(stack.app.store.blobs_bucket, "configs/replace-me.conf") == first.read_bytes()
    blob = client.upload_blob(second, "configs/replace-me.conf", overwrite=True)
    assert blob.sha256 == hashlib.sha256(second.read_bytes()).hexdigest()
    assert stack.app.store.get(stack.app.store.blobs_bucket, "configs/replace-me.conf") == second.read_bytes()
