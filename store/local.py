"""The embedded default: buckets are folders under a root directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mecbench.core.errors import NotFound
from store.base import BucketInit, ObjectStore, ObjectTooLarge, StoreError


def _too_large(bucket: str, key: str, max_bytes: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"object {key!r} in bucket {bucket!r} is larger than {max_bytes} bytes", max_bytes)


class LocalDirStore(ObjectStore):
    backend_name = "local"

    def __init__(self, root: Path, results_bucket: str = "mecbench-results", blobs_bucket: str = "mecbench-blobs"):
        super().__init__(results_bucket, blobs_bucket)
        self.root = Path(root).resolve()

    def _path(self, bucket: str, key: str) -> Path:
        path = (self.root / bucket / key).resolve()
        if not path.is_relative_to(self.root / bucket) or not key or key.endswith("/"):
            raise StoreError(f"invalid key {key!r} in bucket {bucket!r}")
        return path

    def _bucket_dir(self, bucket: str) -> Path:
        directory = self.root / bucket
        if not directory.is_dir():
            raise NotFound(f"bucket {bucket!r} does not exist under {self.root} (run InitStorage)")
        return directory

    def init_buckets(self) -> list[BucketInit]:
        report = []
        for bucket in self.buckets:
            directory = self.root / bucket
            created = not directory.is_dir()
            directory.mkdir(parents=True, exist_ok=True)
            report.append(BucketInit(bucket, created))
        return report

    def put(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._bucket_dir(bucket)
        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: readers see the old object or the new one, whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
        self._bucket_dir(bucket)
        path = self._path(bucket, key)
        try:
            with path.open("rb") as source:
                if max_bytes is None:
                    return source.read()
                if os.fstat(source.fileno()).st_size > max_bytes:
                    raise _too_large(bucket, key, max_bytes)
                data = source.read(max_bytes + 1)  # one byte more than allowed: it tells
        except FileNotFoundError:
            raise NotFound(f"no object {key!r} in bucket {bucket!r}") from None
        if len(data) > max_bytes:
            raise _too_large(bucket, key, max_bytes)
        return data

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        directory = self._bucket_dir(bucket)
        keys = []
        for path in directory.rglob("*"):
            if path.is_file() and not path.name.endswith(".part"):
                key = path.relative_to(directory).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def size(self, bucket: str, key: str) -> int:
        self._bucket_dir(bucket)
        try:
            return self._path(bucket, key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no object {key!r} in bucket {bucket!r}") from None

    def delete(self, bucket: str, key: str) -> None:
        self._bucket_dir(bucket)
        self._path(bucket, key).unlink(missing_ok=True)

    def uri(self, bucket: str, key: str) -> str:
        uri = (self.root / bucket / key).as_uri() if key else (self.root / bucket).as_uri()
        return uri + "/" if key.endswith("/") else uri  # a prefix stays a prefix
