"""The store backends under one contract; `s3_server` (tests/conftest.py) is a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.base import ObjectStore
from store.local import LocalDirStore
from tests.s3server import S3Server

_bucket_counter = iter(range(10**6))


@pytest.fixture(params=["local", "s3"])
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Each backend with buckets of its own (not yet created)."""
    n = next(_bucket_counter)
    results, blobs = f"contract-results-{n}", f"contract-blobs-{n}"
    if request.param == "local":
        return LocalDirStore(tmp_path / "store", results, blobs)
    server: S3Server = request.getfixturevalue("s3_server")
    return server.store(results, blobs)
