"""Store settings: `MECBENCH_STORE_*` environment variables override the defaults, e.g.
`MECBENCH_STORE_BACKEND=s3 MECBENCH_STORE_ENDPOINT=minio.example:9000
MECBENCH_STORE_ACCESS_KEY=... MECBENCH_STORE_SECRET_KEY=...`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mecbench.core.errors import InvalidArgument, Violations
from mecbench.core.settings import from_env
from store.base import ObjectStore


@dataclass
class StoreSettings:
    # "local": buckets are folders under local_root (the embedded default). "s3": S3 or MinIO.
    backend: Literal["local", "s3"] = "local"
    # "" = <controller data dir>/store.
    local_root: str = ""
    # host:port of the S3 API, without a scheme.
    endpoint: str = ""
    access_key: str = ""
    # Never logged, never in a repr.
    secret_key: str = field(default="", repr=False)
    # TLS to the S3 endpoint; `ca_file` adds a private CA, `verify_tls=false` is for tests only.
    secure: bool = True
    ca_file: str = ""
    verify_tls: bool = True
    region: str = ""
    results_bucket: str = "mecbench-results"
    blobs_bucket: str = "mecbench-blobs"
    # Uploads that fail are retried this many times with exponential backoff, then spooled.
    upload_attempts: int = 4
    upload_backoff_s: float = 0.25
    # How often spooled files are offered to the store again.
    spool_flush_interval_s: float = 2.0

    @classmethod
    def load(cls, **overrides: object) -> StoreSettings:
        return from_env(cls, "MECBENCH_STORE_", None, **overrides)


def open_store(settings: StoreSettings, default_root: Path) -> ObjectStore:
    """The configured backend, not yet initialised (InitStorage creates the buckets)."""
    if settings.backend == "local":
        from store.local import LocalDirStore

        root = Path(settings.local_root) if settings.local_root else default_root
        return LocalDirStore(root, settings.results_bucket, settings.blobs_bucket)
    if settings.backend == "s3":
        violations = Violations()
        for name in ("endpoint", "access_key", "secret_key"):
            if not getattr(settings, name):
                violations.add(f"store.{name}", f"required for the s3 backend (MECBENCH_STORE_{name.upper()})")
        if "://" in settings.endpoint:
            violations.add("store.endpoint", "host:port without a scheme; TLS is `secure`")
        violations.raise_if_any()
        from store.s3 import S3Store

        return S3Store(
            settings.endpoint, settings.access_key, settings.secret_key, secure=settings.secure,
            region=settings.region or None, ca_file=settings.ca_file, verify_tls=settings.verify_tls,
            results_bucket=settings.results_bucket, blobs_bucket=settings.blobs_bucket,
        )
    raise InvalidArgument(f"unknown store backend {settings.backend!r} (known: local, s3)", field="store.backend")
