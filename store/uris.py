"""Object URIs as users write them: `s3://bucket/key`, `file:///abs/path`, or a plain local path.

One reading of them for every place that takes one (datasets, accuracy labels)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def object_uri_problem(uri: str, machine: str) -> str | None:
    """Why `uri` cannot name an object, or None. `machine` says whose file system a local path
    is read from, for the message."""
    if not uri.strip():
        return "must not be empty"
    scheme_match = _SCHEME.match(uri)
    if scheme_match is None:
        return None  # a local path
    scheme = scheme_match.group(1).lower()
    if scheme == "s3":
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket or not key:
            return "an s3 URI must name a bucket and a key: s3://bucket/key"
        # The store's own key rules, reported here as the caller's mistake rather than the store's.
        if key.startswith("/") or key.endswith("/") or "//" in key or ".." in key.split("/"):
            return f"invalid S3 key {key!r}: no leading or trailing '/', no '//' and no '..' segment"
        return None
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            return f"a file URI names a path on {machine} (file:///path), not host {parts.netloc!r}"
        if not parts.path:
            return "a file URI must name a path: file:///path"
        return None
    return f"unsupported scheme {scheme!r}: use s3://bucket/key, file:///path or a local path"


def is_s3(uri: str) -> bool:
    return uri.lower().startswith("s3://")


def local_path(uri: str) -> Path:
    if uri.lower().startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri).expanduser()


def s3_location(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key
