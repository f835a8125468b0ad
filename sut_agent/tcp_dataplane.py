"""The plain-TCP data plane: StreamInfer's messages, length-prefixed, over a TCP connection.

gRPC's Python runtime puts HTTP/2 framing and hand-offs between its own threads on every
message; this transport carries the same StreamInferRequest / StreamInferResponse messages
(mecbench.core.framing) with nothing in between, over the same InferStream logic as StreamInfer:
a reader thread submits what arrives, the connection's thread sends what completed. One thread
per connection, like the gRPC server's thread per stream. A client half-closes (shutdown for
writing) when it has nothing more to send; the server answers what is in flight and closes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from mecbench.core.errors import MecbenchError
from mecbench.core.framing import FrameError, read_frame, write_frame
from mecbench.core.logging import get_logger
from mecbench.v1 import sut_agent_pb2
from sut_agent.dataplane import DataPlane

log = get_logger("sut_agent.tcp_dataplane")


class TcpDataPlaneServer:
    def __init__(self, dataplane: DataPlane, host: str, port: int = 0) -> None:
        self._dataplane = dataplane
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

    def _serve(self, connection: socket.socket, peer: object) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = connection.makefile("rb")

        def requests() -> Iterator[sut_agent_pb2.StreamInferRequest]:
            while (frame := read_frame(reader)) is not None:
                yield sut_agent_pb2.StreamInferRequest.FromString(frame)

        incoming = requests()
        stream = None
        try:
            stream = self._dataplane.stream(incoming)
            for response in self._dataplane.serve_stream(incoming, stream):
                write_frame(connection, response.SerializeToString())
        except (OSError, FrameError, MecbenchError) as exc:
            # The client sees the connection close; its own side says what that means for a test.
            log.info("tcp_data_plane_stream_ended", peer=str(peer), reason=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("tcp_data_plane_stream_failed", peer=str(peer))
        finally:
            if stream is not None:
                stream.close()
            with self._lock:
                self._connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        self._listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
