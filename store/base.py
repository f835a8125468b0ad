"""The object-store interface the controller writes results through.

Keys are `/`-separated paths inside a bucket; the results bucket holds
`{experiment}/{selector}/{run}/repeat-{k}/...` (see `store.layout`). Every backend writes an
object whole or not at all, so a reader never sees a half-written file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from mecbench.core.errors import MecbenchError, Unavailable


class StoreError(MecbenchError):
    """The store refused or failed an operation; the message names the bucket and key."""


class StoreUnavailable(Unavailable):
    """The store cannot be reached now; the caller may retry or spool."""


class ObjectTooLarge(StoreError):
    """A read with a byte limit met an object over it; nothing of the object was returned.
    Callers say which limit of theirs it broke (`limit`, bytes)."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class BucketInit:
    name: str
    created: bool
    message: str = ""


class ObjectStore(abc.ABC):
    """A bucketed object store. Implementations: `LocalDirStore`, `S3Store`."""

    backend_name: str = ""

    def __init__(self, results_bucket: str = "mecbench-results", blobs_bucket: str = "mecbench-blobs"):
        self.results_bucket = results_bucket
        self.blobs_bucket = blobs_bucket

    @property
    def buckets(self) -> tuple[str, str]:
        return (self.results_bucket, self.blobs_bucket)

    @abc.abstractmethod
    def init_buckets(self) -> list[BucketInit]:
        """Create the buckets that are missing; report each as created or already there."""

    @abc.abstractmethod
    def put(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write an object whole (replacing any previous one)."""

    @abc.abstractmethod
    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
        """Read an object; NotFound names the bucket and key when it is missing. With `max_bytes`,
        ObjectTooLarge for an object over it: refused on the size the store reports, before
        reading, and the bytes are counted as they are read, so an object that grows (or is
        replaced) meanwhile cannot exceed the limit either."""

    @abc.abstractmethod
    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted."""

    @abc.abstractmethod
    def delete(self, bucket: str, key: str) -> None:
        """Remove an object; missing objects are not an error."""

    @abc.abstractmethod
    def uri(self, bucket: str, key: str) -> str:
        """A location a person can use: file:///... or s3://bucket/key."""

    @abc.abstractmethod
    def size(self, bucket: str, key: str) -> int:
        """An object's size in bytes; NotFound when it is missing."""

    def exists(self, bucket: str, key: str) -> bool:
        return key in self.list(bucket, key)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
