"""What only S3 has: credentials, content types, an endpoint that goes away."""

from __future__ import annotations

import time

import pytest

from mecbench.core.errors import InvalidArgument, PermissionDenied
from store.base import StoreUnavailable
from store.s3 import S3Store
from store.settings import StoreSettings, open_store
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server


def test_wrong_credentials_name_the_key_and_never_the_secret(s3_server: S3Server) -> None:
    store = s3_server.store(secret_key="not-the-secret")
    with pytest.raises(PermissionDenied) as refused:
        store.init_buckets()
    message = str(refused.value)
    assert ACCESS_KEY in message and "not-the-secret" not in message and SECRET_KEY not in message
    assert "not-the-secret" not in repr(store)


def test_content_types_are_set(s3_server: S3Server) -> None:
    store = s3_server.store("ctype-results", "ctype-blobs")
    store.init_buckets()
    store.put(store.results_bucket, "r/result.json", b"{}", "application/json")
    store.put(store.results_bucket, "r/telemetry.csv", b"a,b\n", "text/csv; charset=utf-8")
    assert store.content_type(store.results_bucket, "r/result.json") == "application/json"
    assert store.content_type(store.results_bucket, "r/telemetry.csv").startswith("text/csv")


def test_an_endpoint_nobody_answers_is_unavailable_promptly() -> None:
    store = S3Store("127.0.0.1:9", ACCESS_KEY, SECRET_KEY, secure=False)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:9"):
        store.put(store.results_bucket, "a/b", b"x")
    assert time.monotonic() - started < 10


def test_settings_for_s3_are_checked_as_a_whole() -> None:
    with pytest.raises(InvalidArgument) as refused:
        open_store(StoreSettings(backend="s3", endpoint="http://minio:9000"), default_root=__import__("pathlib").Path("."))
    fields = {v.field for v in refused.value.violations}
    assert fields == {"store.access_key", "store.secret_key", "store.endpoint"}
    assert "hunter2" not in repr(StoreSettings(secret_key="hunter2"))
