"""Network namespaces: naming the one a target lives in, checking it still is the same one, and
talking netlink inside it.

A namespace is per thread in Linux. To reach one, a short-lived thread joins it (setns), opens
a netlink socket there and hands the socket back: a socket stays in the namespace it was created
in, so the caller's own threads never change namespace. Identity is the nsfs inode (device and
inode number), recorded with everything installed: a `/proc/<pid>/ns/net` path whose pid was
reused, or a named namespace deleted and created again, is a different namespace and is never
touched in the old one's name.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import IPRoute

from mecbench.core.errors import InvalidArgument, NotFound

T = TypeVar("T")

NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0

# Named namespaces (`ip netns` names) and the namespace paths the agent agrees to open: process
# and thread namespaces, `ip netns` mounts and Docker's sandbox mounts. Anything else (a FIFO, a
# device) is refused before it is opened.
NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NETNS_PATH_RE = re.compile(
    r"^(/proc/[0-9]+(/task/[0-9]+)?/ns/net"
    r"|/(var/)?run/netns/[A-Za-z0-9_.-]{1,64}"
    r"|/(var/)?run/docker/netns/[A-Za-z0-9_.-]{1,64})$"
)

@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _unshare_netns() -> None:
    if _libc().unshare(_CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def valid_netns_name(name: str) -> bool:
    return bool(NETNS_NAME_RE.match(name)) and name not in {".", ".."}


def valid_netns_path(path: str) -> bool:
    return bool(NETNS_PATH_RE.match(path)) and "/../" not in path and "/./" not in path


def identity_of_fd(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def own_identity() -> str:
    """The namespace the agent itself runs in (its main thread's): "the host" to the allowlist."""
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


class NamespaceGone(Exception):
    """The recorded namespace no longer exists (or its path now names a different one)."""


@dataclass(frozen=True)
class Namespace:
    """A network namespace as a target names it.

    kind: "host" (the agent's own), "name" (/var/run/netns/NAME), "path" or "pod".
    ref: the name, the path, or "namespace/name" of the pod.
    path: what is opened to enter it ("" for the agent's own).
    identity: "dev:ino" of the namespace, fixed when resolved.
    """

    kind: str
    ref: str
    path: str
    identity: str
    is_host: bool

    @property
    def label(self) -> str:
        """How reports name it: "" for the agent's own, else the name, path or pod."""
        if self.kind == "host":
            return ""
        if self.kind == "pod":
            return f"pod:{self.ref}"
        return self.ref

    def open_fd(self) -> int:
        """An fd on the namespace, checked to still be the one resolved."""
        if not self.path:
            fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        else:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                raise NamespaceGone(f"network namespace {self.label or 'host'} no longer exists") from None
        if identity_of_fd(fd) != self.identity:
            os.close(fd)
            raise NamespaceGone(f"{self.path} now names a different network namespace")
        return fd

    def run(self, fn: Callable[[], T]) -> T:
        """Call `fn` in a fresh thread that has joined this namespace; return what it returns."""
        fd = self.open_fd()
        try:
            return run_in_namespace_fd(fd, fn)
        finally:
            os.close(fd)

    def netlink(self) -> IPRoute:
        """An rtnetlink socket in this namespace. The caller closes it (use it as a context manager)."""
        if self.kind == "host":
            return IPRoute()
        fileno = self.run(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE).detach())
        return IPRoute(fileno=fileno)


def run_in_namespace_fd(fd: int, fn: Callable[[], T]) -> T:
    """Run `fn` in a new thread that joined the namespace `fd`; the thread ends with the call."""
    result: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            _setns(fd)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised there
            failure.append(exc)

    thread = threading.Thread(target=work, name="netns-join", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def run_in_scratch_namespace(fn: Callable[[], T]) -> T:
    """Run `fn` in a new thread inside a new, unnamed network namespace. Nothing names the
    namespace, so the kernel frees it (and whatever was created in it) once the thread and any
    sockets opened there are gone, even if `fn` fails half-way."""
    result: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            _unshare_netns()
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised there
            failure.append(exc)

    thread = threading.Thread(target=work, name="netns-scratch", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def host_namespace() -> Namespace:
    return Namespace("host", "", "", own_identity(), True)


def _open_checked(path: str, field: str, shown: str) -> str:
    """Open `path`, check it is a network namespace, return its identity."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"network namespace {shown} does not exist") from None
    except PermissionError:
        raise NotFound(f"network namespace {shown} cannot be opened (permission denied)") from None
    try:
        identity = identity_of_fd(fd)
        try:
            run_in_namespace_fd(fd, lambda: None)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise InvalidArgument(f"{path} is not a network namespace", field=field) from None
            if exc.errno == errno.EPERM:
                raise NotFound(f"network namespace {shown} cannot be entered (permission denied)") from None
            raise
        return identity
    finally:
        os.close(fd)


def resolve_named(name: str, field: str = "target.netns_name") -> Namespace:
    path = os.path.join(NETNS_DIR, name)
    identity = _open_checked(path, field, repr(name))
    return Namespace("name", name, path, identity, identity == own_identity())


def resolve_path(path: str, field: str = "target.netns_path", kind: str = "path", ref: str = "") -> Namespace:
    identity = _open_checked(path, field, path)
    return Namespace(kind, ref or path, path, identity, identity == own_identity())


def namespace_from_record(kind: str, ref: str, path: str, identity: str) -> Namespace:
    return Namespace(kind, ref, path, identity, identity == own_identity())
