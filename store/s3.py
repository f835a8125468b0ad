"""S3 and MinIO through the `minio` SDK.

The SDK's own HTTP retries are turned off: a store that is down must be reported promptly as
`StoreUnavailable`, so that the caller's retry with backoff, and then the spool, take over.
Secrets are never put in messages or logs; the access key id is, since it names who was refused.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error, ServerError
from urllib3.exceptions import HTTPError

from mecbench.core.errors import NotFound, PermissionDenied
from store.base import BucketInit, ObjectStore, ObjectTooLarge, StoreError, StoreUnavailable

T = TypeVar("T")

_CREDENTIAL_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "ExpiredToken"}
# Error codes S3 documents as worth retrying: the server is up but cannot answer now.
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"}
_READ_CHUNK = 1024 * 1024


class S3Store(ObjectStore):
    backend_name = "s3"

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = True,
        region: str | None = None,
        ca_file: str = "",
        verify_tls: bool = True,
        results_bucket: str = "mecbench-results",
        blobs_bucket: str = "mecbench-blobs",
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(results_bucket, blobs_bucket)
        self.endpoint = endpoint
        self.access_key = access_key
        self.secure = secure
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=False,
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if verify_tls else "CERT_NONE",
            ca_certs=ca_file or certifi.where(),
        )
        self._client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
            http_client=http, cert_check=verify_tls,
        )

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, access_key={self.access_key!r}, secure={self.secure})"

    def _where(self, bucket: str, key: str = "") -> str:
        scheme = "https" if self.secure else "http"
        return f"s3://{bucket}/{key} at {scheme}://{self.endpoint}"

    def _call(self, action: Callable[[], T], bucket: str, key: str = "") -> T:
        """Run one SDK call, translating its failures into the store's errors."""
        try:
            return action()
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise NotFound(f"bucket {bucket!r} does not exist at {self.endpoint} (run InitStorage)") from None
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"no object {self._where(bucket, key)}") from None
            if exc.code in _CREDENTIAL_CODES:
                raise PermissionDenied(
                    f"the S3 server at {self.endpoint} refused access key {self.access_key!r} for "
                    f"{self._where(bucket, key)}: {exc.code} (check the access key and secret)"
                ) from None
            if exc.code in _TRANSIENT_CODES:
                # The server is there but not able to answer now (starting, overloaded): as
                # good as away, so the caller retries or spools rather than failing.
                raise StoreUnavailable(
                    f"the S3 server at {self.endpoint} cannot serve {self._where(bucket, key)} now: {exc.code}"
                ) from None
            raise StoreError(
                f"S3 refused an operation on {self._where(bucket, key)}: {exc.code}: {exc.message}"
            ) from None
        except ServerError as exc:
            raise StoreUnavailable(f"the S3 server at {self.endpoint} failed (HTTP {exc.status_code})") from None
        except (HTTPError, OSError) as exc:
            raise StoreUnavailable(f"cannot reach the S3 server at {self.endpoint}: {type(exc).__name__}") from None

    def init_buckets(self) -> list[BucketInit]:
        report = []
        for bucket in self.buckets:
            if self._call(functools.partial(self._client.bucket_exists, bucket), bucket):
                report.append(BucketInit(bucket, created=False))
                continue
            try:
                self._call(functools.partial(self._client.make_bucket, bucket), bucket)
            except StoreError as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc):
                    raise
            report.append(BucketInit(bucket, created=True))
        return report

    def put(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._check_key(bucket, key)
        self._call(
            lambda: self._client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type),
            bucket, key,
        )

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
        self._check_key(bucket, key)

        def too_large() -> ObjectTooLarge:
            return ObjectTooLarge(f"{self._where(bucket, key)} is larger than {max_bytes} bytes", max_bytes or 0)

        def read() -> bytes:
            # One GET: its Content-Length refuses an object over the limit before its body is
            # read, and the count of what arrives holds even where the length was not sent.
            response = self._client.get_object(bucket, key)
            try:
                if max_bytes is None:
                    return bytes(response.read())
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise too_large()
                chunks, count = [], 0
                for chunk in response.stream(_READ_CHUNK):
                    count += len(chunk)
                    if count > max_bytes:
                        raise too_large()
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                response.close()
                response.release_conn()

        return self._call(read, bucket, key)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(
            self._call(
                lambda: [str(o.object_name) for o in self._client.list_objects(bucket, prefix=prefix, recursive=True)],
                bucket, prefix,
            )
        )

    def delete(self, bucket: str, key: str) -> None:
        self._check_key(bucket, key)
        self._call(lambda: self._client.remove_object(bucket, key), bucket, key)

    def exists(self, bucket: str, key: str) -> bool:
        self._check_key(bucket, key)
        try:
            self._call(lambda: self._client.stat_object(bucket, key), bucket, key)
        except NotFound as exc:
            if "bucket" in str(exc) and "does not exist" in str(exc):
                raise
            return False
        return True

    def size(self, bucket: str, key: str) -> int:
        self._check_key(bucket, key)
        stat = self._call(lambda: self._client.stat_object(bucket, key), bucket, key)
        return int(stat.size or 0)

    def content_type(self, bucket: str, key: str) -> str:
        stat = self._call(lambda: self._client.stat_object(bucket, key), bucket, key)
        return str(stat.content_type or "")

    def uri(self, bucket: str, key: str) -> str:
        return f"s3://{bucket}/{key}"

    @staticmethod
    def _check_key(bucket: str, key: str) -> None:
        if not key or key.startswith("/") or key.endswith("/") or "//" in key or ".." in key.split("/"):
            raise StoreError(f"invalid key {key!r} in bucket {bucket!r}")
