"""The plain-TCP data plane: StreamInfer's messages, length-prefixed, over a TCP connection.

gRPC's Python runtime puts HTTP/2 framing and hand-offs between its own threads on every
message; this transport carries the same StreamInferRequest / StreamInferResponse messages
(mecbench.core.framing) with nothing in between, over the same InferStream logic as StreamInfer:
a reader thread submits what arrives, the connection's thread sends what completed. One thread
per connection, like the gRPC server's thread per stream. A client half-closes (shutdown for
writing) when it has nothing more to send; the server answers what is in flight and closes.

With TLS (mecbench.core.tls.TlsStream) each connection's handshake is done on the connection's
own thread, so a slow or silent client cannot hold up the accept loop; a client certificate that
names none of the allowed identities gets the connection closed. TLS has no half-close, so a TLS
client ends its requests with an empty frame instead; the server takes an empty frame as the end
of requests on either transport (no request message serializes to nothing). Without TLS the
connection is used as before, with nothing in between.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence

from mecbench.core.errors import MecbenchError
from mecbench.core.framing import FrameError, FrameReader, FrameWriter, read_frame, write_frame
from mecbench.core.logging import get_logger
from mecbench.core.tls import TlsStream, certificate_identities, is_allowed
from mecbench.v1 import sut_agent_pb2
from sut_agent.dataplane import DataPlane

log = get_logger("sut_agent.tcp_dataplane")


class TcpDataPlaneServer:
    def __init__(
        self,
        dataplane: DataPlane,
        host: str,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        allowed_clients: Sequence[str] = (),
    ) -> None:
        self._dataplane = dataplane
        self._ssl_context = ssl_context
        self._allowed_clients = tuple(allowed_clients)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()
        self.accepted = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="tcp-dataplane-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                connection, peer = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    connection.close()
                    return
                self._connections.add(connection)
                self.accepted += 1
            threading.Thread(
                target=self._serve, args=(connection, peer), name="tcp-dataplane-stream", daemon=True
            ).start()

    def _secure(self, connection: socket.socket, peer: object) -> TlsStream | None:
        """The connection's TLS session once the handshake is done and the client is allowed;
        None (the connection closed) when it is not."""
        assert self._ssl_context is not None
        try:
            tls = TlsStream(connection, self._ssl_context, server_side=True)
            tls.handshake()
        except OSError as exc:  # ssl.SSLError included
            log.info("tcp_data_plane_handshake_failed", peer=str(peer), reason=f"{type(exc).__name__}: {exc}")
            self._release(connection)
            return None
        identities = certificate_identities(tls.getpeercert())
        if not is_allowed(identities, self._allowed_clients):
            log.warning(
                "tcp_data_plane_client_refused", peer=str(peer), identities=identities,
                allowed=list(self._allowed_clients),
            )
            self._release(connection)
            return None
        return tls

    def _release(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        connection.close()

    def _serve(self, connection: socket.socket, peer: object) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader: FrameReader
        writer: FrameWriter
        if self._ssl_context is None:
            reader, writer = connection.makefile("rb"), connection
        else:
            tls = self._secure(connection, peer)
            if tls is None:
                return
            reader = writer = tls

        def requests() -> Iterator[sut_agent_pb2.StreamInferRequest]:
            # None: the client half-closed; b"": a TLS client's end of requests (see above).
            while frame := read_frame(reader):
                yield sut_agent_pb2.StreamInferRequest.FromString(frame)

        incoming = requests()
        stream = None
        try:
            stream = self._dataplane.stream(incoming)
            for response in self._dataplane.serve_stream(incoming, stream):
                write_frame(writer, response.SerializeToString())
        except (OSError, FrameError, MecbenchError) as exc:
            # The client sees the connection close; its own side says what that means for a test.
            log.info("tcp_data_plane_stream_ended", peer=str(peer), reason=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("tcp_data_plane_stream_failed", peer=str(peer))
        finally:
            if stream is not None:
                stream.close()
            self._release(connection)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        self._listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
