"""Results and blobs: an object-store interface with a local-directory backend (the embedded
default) and an S3/MinIO backend."""

from store.base import BucketInit, ObjectStore, StoreError
from store.layout import repeat_prefix

__all__ = ["BucketInit", "ObjectStore", "StoreError", "repeat_prefix"]
