"""Local files a request names (`file:///path` or a bare path), read only where the operator says.

A request is untrusted: its path is resolved (symbolic links and `..` followed, as the kernel
would) and must then lie under one of the roots the service's operator configured; `/proc`,
`/sys` and `/dev` never, whatever the roots. Only regular files are read, and never more than a
limit, counted while reading (a file's reported size is not trusted: `/proc` files report 0). A
path outside the roots is refused with the same words whether it exists or not, so a caller
learns nothing of files it may not read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from mecbench.core.errors import InvalidArgument, NotFound, PermissionDenied
from store.uris import local_path

# Kernel and device file systems: never data, whatever the operator's roots say.
FORBIDDEN_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))
_CHUNK = 1024 * 1024
_DIRECTORY = "is a directory, not a file (pack a directory as a tar archive)"


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_allowed(uri: str, roots: Sequence[Path], *, field: str, setting: str) -> Path:
    """The real path of the local file `uri` names, checked against `roots`.

    InvalidArgument on `field` (naming the `setting` that configures the roots) when it lies
    outside them, with no word on whether it exists."""
    if not roots:
        raise InvalidArgument(
            f"this service reads no local files (its operator has set no {setting}); "
            "upload the data to the store and name it as s3://bucket/key",
            field=field,
        )
    requested = local_path(uri)
    if not requested.is_absolute():
        raise InvalidArgument("a local path must be absolute (or use s3://bucket/key)", field=field)
    resolved = Path(os.path.realpath(requested))
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    allowed = any(_under(resolved, root) for root in real_roots) and not any(
        _under(resolved, tree) for tree in FORBIDDEN_TREES
    )
    if not allowed:
        raise InvalidArgument(f"{requested} is not under the directories this service may read ({setting})",
                              field=field)
    return resolved


@contextlib.contextmanager
def open_allowed(uri: str, roots: Sequence[Path], *, field: str, setting: str) -> Iterator[IO[bytes]]:
    """The regular file `uri` names, opened for reading, when it lies under `roots`."""
    resolved = resolve_allowed(uri, roots, field=field, setting=setting)
    try:
        # O_NOFOLLOW: a link swapped in after the check is refused; O_NONBLOCK: a FIFO does not
        # hang the open (it is refused below as not a regular file).
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFound(f"{field}: no such file {uri}") from None
    except IsADirectoryError:
        raise InvalidArgument(_DIRECTORY, field=field) from None
    except OSError as exc:
        raise PermissionDenied(f"{field}: cannot read {resolved}: {exc.strerror or exc}") from None
    # What was opened, whatever a directory on the way was swapped for after the check: the
    # kernel's name for the descriptor must still lie where the check said.
    opened = Path(os.path.realpath(f"/proc/self/fd/{descriptor}"))
    if opened != resolved:
        os.close(descriptor)
        raise InvalidArgument(f"{uri} changed while it was opened", field=field)
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise InvalidArgument(_DIRECTORY if stat.S_ISDIR(mode) else f"{uri} is not a regular file", field=field)
    with os.fdopen(descriptor, "rb") as handle:
        yield handle


def copy_limited(source: IO[bytes], out: IO[bytes] | None, max_bytes: int, *, field: str) -> tuple[str, int]:
    """Copy `source` into `out` (or only hash it), stopping with InvalidArgument as soon as more
    than `max_bytes` came; the SHA-256 and size of what was copied."""
    hasher = hashlib.sha256()
    size = 0
    while chunk := source.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise InvalidArgument(f"larger than this service's limit of {max_bytes} bytes", field=field)
        hasher.update(chunk)
        if out is not None:
            out.write(chunk)
    return hasher.hexdigest(), size


def read_allowed(uri: str, roots: Sequence[Path], max_bytes: int, *, field: str, setting: str) -> bytes:
    """The whole content of the local file `uri` names, at most `max_bytes` of it."""
    with open_allowed(uri, roots, field=field, setting=setting) as source:
        data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidArgument(f"larger than this service's limit of {max_bytes} bytes", field=field)
    return data
