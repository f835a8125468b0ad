"""Entering a named network namespace (`ip netns` convention: /var/run/netns/NAME)."""

from __future__ import annotations

import ctypes
import os

NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling thread into a named network namespace.

    A namespace is per thread: call this before any other thread starts, so that every thread
    created afterwards inherits it.
    """
    if "/" in name or name in {"", ".", ".."}:
        raise ValueError(f"not a namespace name: {name!r}")
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({name}) failed: {os.strerror(errno)}")
    finally:
        os.close(fd)
