"""TLS and mutual TLS for every MECBench connection, configured from the environment.

One identity per process: `MECBENCH_TLS_CERT` / `MECBENCH_TLS_KEY` are the process's server
certificate and, when it calls another service, its client certificate; `MECBENCH_TLS_CA` is the
CA it checks peers against. Agents the local backend starts inherit the controller's environment,
and so its identity, unless their own environment says otherwise.

Who may call a server is per service: `MECBENCH_TLS_CLIENT_AUTH` and
`MECBENCH_TLS_ALLOWED_CLIENTS` may be overridden for one service by
`MECBENCH_<SERVICE>_TLS_CLIENT_AUTH` / `..._ALLOWED_CLIENTS` (SERVICE: the service's own
settings prefix: CONTROLLER, SUT, LOADGEN, NODE_AGENT), so a controller can take token-only
users while the agents it starts, sharing its environment, accept only certificates.

The same settings give gRPC credentials (`server_credentials`, `channel_credentials`) and
`ssl.SSLContext`s for the plain-TCP data plane (`ssl_server_context`, `ssl_client_context`).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mecbench.core.settings import SettingsError, from_env

ENV_PREFIX = "MECBENCH_TLS_"
# Fields a service may override under MECBENCH_<SERVICE>_TLS_: who may call it, not who it is.
SCOPED_FIELDS = ("client_auth", "allowed_clients")
# A TLS handshake on the TCP data plane must finish within this, so a peer that connects and
# sends nothing holds a thread for no longer.
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TlsSettings:
    # PEM certificate (chain) and private key: this process's identity, as server and as client.
    cert: Path | None = None
    key: Path | None = None
    # PEM CA bundle peers are checked against; unset: the system's roots (clients only).
    ca: Path | None = None
    # Require a client certificate signed by `ca` (mutual TLS).
    client_auth: bool = False
    # Certificate identities (CN or a subject alternative name) allowed to call this service;
    # empty: any client with a certificate from `ca`. Needs client_auth.
    allowed_clients: tuple[str, ...] = ()
    # Name checked in servers' certificates instead of the dialled host (addresses that are IPs
    # the certificates do not name, e.g. network-namespace addresses).
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        """TLS is on: this process has an identity, or at least a CA to check servers with."""
        return self.cert is not None or self.key is not None or self.ca is not None

    @classmethod
    def load(cls, service: str = "", environ: Mapping[str, str] | None = None) -> TlsSettings:
        """From `MECBENCH_TLS_*`; with `service` (e.g. "SUT"), `MECBENCH_<SERVICE>_TLS_CLIENT_AUTH`
        and `..._ALLOWED_CLIENTS` override the shared values for that service's server."""
        env = dict(os.environ if environ is None else environ)
        if service:
            scoped = f"MECBENCH_{service.upper()}_TLS_"
            for name in SCOPED_FIELDS:
                if f"{scoped}{name.upper()}" in env:
                    env[f"{ENV_PREFIX}{name.upper()}"] = env[f"{scoped}{name.upper()}"]
        settings = from_env(cls, ENV_PREFIX, env)
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations that would silently give less security than asked for."""
        if (self.cert is None) != (self.key is None):
            raise SettingsError(f"{ENV_PREFIX}CERT and {ENV_PREFIX}KEY must be set together")
        for name, path in (("CERT", self.cert), ("KEY", self.key), ("CA", self.ca)):
            if path is not None and not path.is_file():
                raise SettingsError(f"{ENV_PREFIX}{name}={path}: no such file")
        if self.client_auth and (self.cert is None or self.ca is None):
            raise SettingsError(
                f"{ENV_PREFIX}CLIENT_AUTH needs {ENV_PREFIX}CERT, {ENV_PREFIX}KEY and {ENV_PREFIX}CA"
            )
        if self.allowed_clients and not self.client_auth:
            # Without client certificates no caller has an identity to match: all would be refused.
            raise SettingsError(f"{ENV_PREFIX}ALLOWED_CLIENTS needs {ENV_PREFIX}CLIENT_AUTH=true")

    def require_server_identity(self) -> tuple[Path, Path]:
        if self.cert is None or self.key is None:
            raise SettingsError(
                f"TLS is configured ({ENV_PREFIX}CA is set) but a server needs {ENV_PREFIX}CERT and {ENV_PREFIX}KEY"
            )
        return self.cert, self.key


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """gRPC server credentials, or None when TLS is off (the server listens in plaintext)."""
    if not settings.enabled:
        return None
    cert, key = settings.require_server_identity()
    root = settings.ca.read_bytes() if settings.client_auth and settings.ca is not None else None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=root, require_client_auth=settings.client_auth
    )


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """gRPC channel credentials presenting this process's certificate when it has one; None when
    TLS is off."""
    if not settings.enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.ca.read_bytes() if settings.ca is not None else None,
        private_key=settings.key.read_bytes() if settings.key is not None else None,
        certificate_chain=settings.cert.read_bytes() if settings.cert is not None else None,
    )


def channel_options(settings: TlsSettings) -> list[tuple[str, int | str]]:
    """Channel options TLS needs: the server-name override, when one is set."""
    if settings.enabled and settings.server_name:
        return [("grpc.ssl_target_name_override", settings.server_name)]
    return []


def ssl_server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The TCP data plane's server side, like `server_credentials`; None when TLS is off."""
    if not settings.enabled:
        return None
    cert, key = settings.require_server_identity()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Connections are long-lived and never resumed: no session tickets to make and send.
    context.num_tickets = 0
    context.load_cert_chain(cert, key)
    if settings.client_auth and settings.ca is not None:
        context.load_verify_locations(cafile=settings.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def ssl_client_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The TCP data plane's client side, like `channel_credentials`; None when TLS is off."""
    if not settings.enabled:
        return None
    context = ssl.create_default_context(cafile=settings.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert is not None and settings.key is not None:
        context.load_cert_chain(settings.cert, settings.key)
    return context


def peer_identities(context: grpc.ServicerContext) -> list[str]:
    """The caller's certificate identities (its CN, then its subject alternative names); empty
    for a plaintext caller or one that presented no certificate."""
    # Each key maps to a list of values (types-grpcio says bytes: it is wrong there).
    auth: Mapping[str, Iterable[bytes]] = context.auth_context() or {}  # type: ignore[assignment]
    found: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if text not in found:
                found.append(text)
    return found


def certificate_identities(peer_cert: Mapping[str, Any] | None) -> list[str]:
    """The same identities from `ssl.SSLSocket.getpeercert()` (the TCP data plane)."""
    if not peer_cert:
        return []
    found: list[str] = []
    for rdn in peer_cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and value not in found:
                found.append(str(value))
    for _kind, value in peer_cert.get("subjectAltName", ()):
        if value not in found:
            found.append(str(value))
    return found


def is_allowed(identities: Iterable[str], allowed: Iterable[str]) -> bool:
    """Whether a caller with these identities may call a service that allows `allowed` (empty:
    anyone who got through the handshake)."""
    allowed_set = set(allowed)
    return not allowed_set or any(identity in allowed_set for identity in identities)


READ_CHUNK = 64 * 1024


class TlsStream:
    """TLS over a connected socket for the TCP data plane, safe for one thread reading while
    another writes.

    `ssl.SSLSocket` is not: OpenSSL forbids using one SSL object from two threads at once, and
    concurrent SSL_read / SSL_write on one SSLSocket is a known crash (CPython issue 143756),
    while both ends of the data plane read and write the same connection from two threads. So
    the TLS session works on memory buffers under a lock that is never held across network I/O:
    a reader never blocks the writer while it waits for data, nor the writer a reader while its
    send waits for the peer. One sender at a time puts the session's output on the wire, in order.

    `read(n)` and `sendall(data)` are what mecbench.core.framing needs. TLS has no half-close
    (a close_notify ends the session both ways), so the data plane's client ends its requests
    with an empty frame instead of shutting down for writing.
    """

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self.socket = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._eof = False

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Complete the handshake within `timeout` (ssl.SSLError, an OSError, when it fails)."""
        previous = self.socket.gettimeout()
        self.socket.settimeout(timeout)
        try:
            while True:
                try:
                    with self._ssl_lock:
                        self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush(block=True)
                    self._receive()
            self._flush(block=True)
        finally:
            self.socket.settimeout(previous)

    def getpeercert(self) -> dict[str, Any] | None:
        cert = self._ssl.getpeercert()
        return dict(cert) if cert else None

    def sendall(self, data: bytes) -> None:
        with self._ssl_lock:
            self._ssl.write(data)
        self._flush(block=True)

    def read(self, size: int) -> bytes:
        """`size` bytes, or fewer when the stream ends first (as a buffered file's read)."""
        while len(self._buffer) < size and not self._eof:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def shutdown(self, how: int) -> None:
        self.socket.shutdown(how)

    def close(self) -> None:
        self.socket.close()

    def _fill(self) -> None:
        chunk: bytes | None
        with self._ssl_lock:
            try:
                chunk = self._ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                chunk = None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or the peer closed without one: the frame reader sees whether
                # that was between frames.
                chunk = b""
        # Reading can make the session answer (alerts); whoever is sending sends that too.
        self._flush(block=False)
        if chunk is None:
            self._receive()
        elif chunk:
            self._buffer += chunk
        else:
            self._eof = True

    def _receive(self) -> None:
        raw = self.socket.recv(READ_CHUNK)
        with self._ssl_lock:
            if raw:
                self._incoming.write(raw)
            else:
                self._incoming.write_eof()

    def _flush(self, block: bool) -> None:
        """Send what the session produced. A caller that does not block leaves it to the thread
        sending now, which looks again after it lets go of the send lock."""
        while self._outgoing.pending:
            if not self._send_lock.acquire(blocking=block):
                return
            try:
                while True:
                    with self._ssl_lock:
                        data = self._outgoing.read()
                    if not data:
                        break
                    self.socket.sendall(data)
            finally:
                self._send_lock.release()
