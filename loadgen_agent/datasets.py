"""Datasets referenced by `DatasetSpec.uri`: fetched once into a local cache, then split into samples.

Plain Python, no gRPC: every failure is a `mecbench.core.errors` exception.

A URI is `s3://bucket/key` (read through the project's S3 store, configured by the
`MECBENCH_STORE_*` variables of the LoadGen agent's environment), `file:///abs/path`, or a plain
local path. Whatever the source, the object is copied into the cache under its SHA-256, so:

- a session that names the expected `sha256` finds the object already there and fetches nothing
  (the cache is content-addressed, so a hit is a match by construction);
- a session without `sha256` fetches again each time: nothing else tells us the object behind the
  URI is unchanged, and serving a stale copy would be silently wrong. It is still stored under its
  digest, which is logged so a caller can pin it;
- an object is written to a temporary file and renamed into place only once its digest has been
  checked, so a crash, or a mismatch, never leaves a file that looks complete. Sessions run in
  parallel processes share the cache safely: each writes its own temporary file and the rename
  is atomic.

Samples: a tar archive (any compression `tarfile` opens) gives one sample per regular member,
ordered by member name; members are read in memory, never extracted, so no member name (`../x`,
absolute paths, links) can write outside anything. A `.npy` array (recognised by its magic bytes,
since cached files are named by digest) gives one sample per entry along its first axis. Any
other file is one sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import lzma
import os
import re
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from mecbench.core.errors import FailedPrecondition, InvalidArgument, NotFound
from mecbench.core.logging import get_logger
from store.base import ObjectTooLarge
from store.local_files import copy_limited, open_allowed
from store.settings import StoreSettings, open_store
from store.uris import object_uri_problem, s3_location

log = get_logger("mecbench.loadgen.datasets")

URI_FIELD = "dataset.uri"
SHA256_FIELD = "dataset.sha256"

_NPY_MAGIC = b"\x93NUMPY"
# The setting that names the directories local dataset paths may lie under.
ROOTS_SETTING = "MECBENCH_LOADGEN_DATASET_ROOTS"
DEFAULT_MAX_OBJECT_BYTES = 4 * 1024 * 1024 * 1024
# Prefix of the temporary files objects are written to before the rename.
_PARTIAL_PREFIX = ".partial-"
_PARTIAL_MAX_AGE_S = 24 * 3600.0


def default_cache_dir() -> Path:
    """The user's cache directory (XDG), `mecbench/datasets` under it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mecbench" / "datasets"


# --- URIs --------------------------------------------------------------------------------------


def uri_problem(uri: str) -> str | None:
    """Why `uri` cannot name a dataset, or None; checked when a session is opened, before any
    process starts, and again when it is fetched."""
    return object_uri_problem(uri, "the LoadGen agent's machine")


def _check_uri(uri: str) -> None:
    problem = uri_problem(uri)
    if problem is not None:
        raise InvalidArgument(problem, field=URI_FIELD)


# --- fetching into the cache ---------------------------------------------------------------------


def _objects_dir(cache_dir: Path) -> Path:
    return cache_dir / "sha256"


def _cached_path(cache_dir: Path, digest: str) -> Path:
    return _objects_dir(cache_dir) / digest


def _remove_abandoned_partials(objects: Path) -> None:
    """Temporary files a crashed fetch left behind; old enough that no live fetch still writes them."""
    cutoff = time.time() - _PARTIAL_MAX_AGE_S
    for partial in objects.glob(f"{_PARTIAL_PREFIX}*"):
        with contextlib.suppress(OSError):
            if partial.stat().st_mtime < cutoff:
                partial.unlink()


def fetch(
    uri: str,
    sha256: str,
    cache_dir: Path,
    s3_settings: StoreSettings | None = None,
    *,
    local_roots: Sequence[Path] = (),
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
) -> Path:
    """The local, verified copy of the object at `uri`, fetched into `cache_dir` unless the cache
    already holds the expected `sha256` (hex, any case; empty = not checked).

    `s3_settings` defaults to `StoreSettings.load()` (the `MECBENCH_STORE_*` environment), read
    only for an s3:// URI. A local path is read only under `local_roots` (the operator's
    MECBENCH_LOADGEN_DATASET_ROOTS; store.local_files), and no object over `max_bytes` is
    copied: the count stops the copy, not a size reported beforehand.
    """
    _check_uri(uri)
    expected = sha256.strip().lower()
    if expected and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise InvalidArgument("must be 64 hex digits", field=SHA256_FIELD)
    if expected:
        cached = _cached_path(cache_dir, expected)
        if cached.is_file():
            log.info("dataset_cache_hit", uri=uri, sha256=expected)
            return cached

    started = time.monotonic()
    objects = _objects_dir(cache_dir)
    try:
        objects.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_partials(objects)
        descriptor, partial_name = tempfile.mkstemp(prefix=_PARTIAL_PREFIX, dir=objects)
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot write to the dataset cache {objects}: {exc.strerror or exc} "
            "(set MECBENCH_LOADGEN_DATASET_CACHE_DIR to a writable directory)"
        ) from None
    partial = Path(partial_name)
    try:
        with os.fdopen(descriptor, "wb") as out:
            if uri.lower().startswith("s3://"):
                digest, size = _download_s3(uri, out, s3_settings, max_bytes)
            else:
                with open_allowed(uri, local_roots, field=URI_FIELD, setting=ROOTS_SETTING) as source:
                    digest, size = copy_limited(source, out, max_bytes, field=URI_FIELD)
            out.flush()
            os.fsync(out.fileno())
        if expected and digest != expected:
            raise InvalidArgument(
                f"the object at {uri} has SHA-256 {digest}, expected {expected}; it was not cached",
                field=SHA256_FIELD,
            )
        cached = _cached_path(cache_dir, digest)
        os.replace(partial, cached)
    finally:
        # Gone already after the rename; anything else (an error, a mismatch) leaves nothing behind.
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    log.info(
        "dataset_fetched",
        uri=uri,
        sha256=digest,
        bytes=size,
        seconds=round(time.monotonic() - started, 3),
        verified=bool(expected),
    )
    return cached


def _download_s3(uri: str, out: IO[bytes], s3_settings: StoreSettings | None, max_bytes: int) -> tuple[str, int]:
    """Download the S3 object into `out`; its SHA-256 and size."""
    settings = s3_settings if s3_settings is not None else _load_store_settings()
    missing = [name for name in ("endpoint", "access_key", "secret_key") if not getattr(settings, name)]
    if missing:
        variables = ", ".join(f"MECBENCH_STORE_{name.upper()}" for name in missing)
        raise FailedPrecondition(
            f"dataset {uri}: the LoadGen agent has no S3 store configured; set {variables} in its environment "
            "(and MECBENCH_STORE_SECURE=false for an endpoint without TLS)"
        )
    try:
        # The backend setting chooses where the controller keeps results; an s3:// URI is read
        # from S3 whatever it says.
        store = open_store(_with_s3_backend(settings), default_root=Path())
    except InvalidArgument as exc:
        # The agent's own configuration is wrong, not the caller's request.
        raise FailedPrecondition(f"dataset {uri}: the LoadGen agent's S3 settings are invalid: {exc}") from None
    bucket, key = s3_location(uri)
    try:
        data = store.get(bucket, key, max_bytes=max_bytes)
    except ObjectTooLarge:
        raise InvalidArgument(f"larger than the LoadGen agent's limit of {max_bytes} bytes", field=URI_FIELD) from None
    except NotFound as exc:
        raise NotFound(f"dataset {uri}: {exc}") from None
    finally:
        store.close()
    out.write(data)
    return hashlib.sha256(data).hexdigest(), len(data)


def _load_store_settings() -> StoreSettings:
    try:
        return StoreSettings.load()
    except ValueError as exc:  # SettingsError: a MECBENCH_STORE_* value that does not parse
        raise FailedPrecondition(f"the LoadGen agent's MECBENCH_STORE_* settings are invalid: {exc}") from None


def _with_s3_backend(settings: StoreSettings) -> StoreSettings:
    return dataclasses.replace(settings, backend="s3")


# --- samples ---------------------------------------------------------------------------------------


def load_samples(path: Path, max_bytes: int | None = None) -> list[bytes]:
    """The samples of the dataset file at `path` (see the module's docstring for the formats);
    InvalidArgument(field="dataset.uri") when it holds none or more than `max_bytes` of samples."""
    with path.open("rb") as probe:
        is_npy = probe.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    if is_npy:
        return _npy_samples(path, max_bytes)
    if tarfile.is_tarfile(path):
        return _tar_samples(path, max_bytes)
    size = path.stat().st_size
    _check_size(size, max_bytes)
    return [path.read_bytes()]


def _check_size(total: int, max_bytes: int | None) -> None:
    if max_bytes is not None and total > max_bytes:
        raise InvalidArgument(
            f"the dataset's samples are {total} bytes, over the agent's limit of {max_bytes}", field=URI_FIELD
        )


def _npy_samples(path: Path, max_bytes: int | None) -> list[bytes]:
    try:
        # Memory-mapped, so the size is checked before the array is read.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # a corrupt header, or an object array (which would need pickle)
        raise InvalidArgument(f"not a usable .npy array: {exc}", field=URI_FIELD) from None
    if array.ndim == 0 or array.shape[0] == 0:
        raise InvalidArgument(
            f"the .npy array of shape {array.shape} has no entries along its first axis", field=URI_FIELD
        )
    _check_size(int(array.nbytes), max_bytes)
    return [row.tobytes() for row in array]


def _tar_samples(path: Path, max_bytes: int | None) -> list[bytes]:
    try:
        with tarfile.open(path) as archive:
            # A later member of the same name replaces an earlier one, as extraction would.
            members = {member.name: member for member in archive.getmembers() if member.isfile()}
            if not members:
                raise InvalidArgument("the tar archive holds no regular files", field=URI_FIELD)
            _check_size(sum(member.size for member in members.values()), max_bytes)
            return list(_read_members(archive, [members[name] for name in sorted(members)]))
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        # OSError: gzip's BadGzipFile and bz2's errors for a damaged compressed stream.
        raise InvalidArgument(f"cannot read the tar archive: {exc}", field=URI_FIELD) from None


def _read_members(archive: tarfile.TarFile, members: list[tarfile.TarInfo]) -> Iterator[bytes]:
    for member in members:
        reader = archive.extractfile(member)
        if reader is None:  # not a regular file after all
            continue
        with reader:
            yield reader.read()
