"""Blobs (datasets, LoadGen configurations) in the blob bucket, uploaded through the controller
so users need no store credentials of their own: the controller already has them.

A blob is taken whole, its size bounded and its SHA-256 checked, before anything is written: a
failed or mismatched upload stores nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from mecbench.core.errors import AlreadyExists, InvalidArgument, Violations
from mecbench.v1 import controller_pb2
from store.base import ObjectStore
from store.layout import check_segment, content_type_for

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_blob_key(key: str, field: str = "header.key") -> str:
    if not key:
        raise InvalidArgument("must not be empty", field=field)
    for segment in key.split("/"):
        check_segment(segment, field)
    return key


def check_header(header: controller_pb2.BlobHeader) -> None:
    violations = Violations()
    try:
        check_blob_key(header.key)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    violations.check(not header.sha256 or bool(_SHA256.match(header.sha256)), "header.sha256",
                     "must be 64 lowercase hex digits")
    violations.check(len(header.content_type) <= 255 and "\n" not in header.content_type, "header.content_type",
                     "must be one line of at most 255 characters")
    violations.raise_if_any()


def receive(
    parts: Iterable[controller_pb2.UploadBlobRequest], max_bytes: int
) -> tuple[controller_pb2.BlobHeader, bytes]:
    """The header, then the chunks, of an upload stream; nothing is kept beyond `max_bytes`."""
    iterator = iter(parts)
    first = next(iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message of an upload must be the header", field="header")
    header = first.header
    check_header(header)
    data = bytearray()
    for part in iterator:
        if part.WhichOneof("part") != "chunk":
            raise InvalidArgument("only the first message may be a header", field="header")
        data += part.chunk
        if len(data) > max_bytes:
            raise InvalidArgument(
                f"the blob exceeds the limit of {max_bytes} bytes (MECBENCH_CONTROLLER_MAX_BLOB_BYTES)", field="chunk"
            )
    return header, bytes(data)


def upload(store: ObjectStore, header: controller_pb2.BlobHeader, data: bytes) -> controller_pb2.Blob:
    digest = hashlib.sha256(data).hexdigest()
    if header.sha256 and header.sha256 != digest:
        raise InvalidArgument(f"the blob received has SHA-256 {digest}, not {header.sha256}: nothing stored",
                              field="header.sha256")
    bucket = store.blobs_bucket
    if not header.overwrite and store.exists(bucket, header.key):
        raise AlreadyExists(f"blob {header.key!r} is already stored at {store.uri(bucket, header.key)};"
                            " set overwrite to replace it")
    content_type = header.content_type or content_type_for(header.key)
    store.put(bucket, header.key, data, content_type)
    return controller_pb2.Blob(key=header.key, uri=store.uri(bucket, header.key), size_bytes=len(data),
                               sha256=digest, content_type=content_type)


def list_blobs(store: ObjectStore, prefix: str) -> list[controller_pb2.Blob]:
    bucket = store.blobs_bucket
    return [
        controller_pb2.Blob(
            key=key, uri=store.uri(bucket, key), size_bytes=store.size(bucket, key), content_type=content_type_for(key)
        )
        for key in store.list(bucket, prefix)
    ]
