"""The HTTP front end: a threading HTTP/1.1 server (keep-alive; chunked transfer encoding for
streams) whose one handler class routes every request to the KServe v2, OpenAI and Ollama APIs."""

from __future__ import annotations

import itertools
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from mecbench.core.logging import get_logger
from model_server import SERVER_NAME, SERVER_VERSION, kserve_rest, ollama_api, openai_api
from model_server.models import ModelRepository
from model_server.routing import (
    Handler,
    Request,
    Response,
    Route,
    Router,
    RouteResult,
    StreamingResponse,
    json_response,
)

log = get_logger("model_server")

MAX_BODY_BYTES = 512 * 1024 * 1024
# An idle keep-alive connection is closed after this long, so abandoned clients do not pin threads.
IDLE_CONNECTION_TIMEOUT_S = 300.0


class BodyError(ValueError):
    """The request body cannot be read as its headers describe it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# The generation endpoints a fault injection fails (OpenAI's and Ollama's).
GENERATION_PATHS = frozenset({r"/v1/completions", r"/v1/chat/completions", r"/api/generate", r"/api/chat"})


class FailEvery:
    """Fault injection for tests of the clients' failure accounting: every `every`-th generation
    request (counted over all of them, 1-based) is answered HTTP `status` with an error body in
    the OpenAI shape, which Ollama's clients read too (`error`)."""

    def __init__(self, every: int, status: int = 500) -> None:
        self.every = every
        self.status = status
        self._count = itertools.count(1)
        self._lock = threading.Lock()

    def wrap(self, handler: Handler) -> Handler:
        def failing(request: Request) -> RouteResult:
            with self._lock:
                number = next(self._count)
            if number % self.every == 0:
                error = {"message": f"injected failure of request {number}", "type": "server_error", "code": None}
                return json_response({"error": error}, status=self.status)
            return handler(request)

        return failing


class RequestCounters:
    """Prometheus counters of the generation requests (OpenAI, Ollama), served at GET /metrics as
    vLLM and TGI serve theirs (so a SUT agent's metrics scrape has a real page to read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    def wrap(self, pattern: str, handler: Handler) -> Handler:
        def counted(request: Request) -> RouteResult:
            result = handler(request)
            with self._lock:
                self.requests[pattern] = self.requests.get(pattern, 0) + 1
                if isinstance(result, Response) and result.status >= 400:
                    self.failures[pattern] = self.failures.get(pattern, 0) + 1
            return result

        return counted

    def page(self, _request: Request) -> Response:
        lines = []
        with self._lock:
            for name, values in (("model_server_requests", self.requests), ("model_server_failures", self.failures)):
                lines.append(f"# TYPE {name} counter")
                lines += [f'{name}_total{{path="{path}"}} {count}' for path, count in sorted(values.items())]
        body = ("\n".join(lines) + "\n").encode()
        return Response(status=200, body=body, content_type="text/plain; version=0.0.4")


def build_router(repository: ModelRepository, fail_every: FailEvery | None = None) -> Router:
    def health(_request: Request) -> Response:
        # vLLM, TGI and llama.cpp all answer GET /health with 200 once the model is loaded.
        if repository.ready:
            return json_response({"status": "ok"})
        return json_response({"status": "loading"}, status=503)

    routes = [
        Route("GET", r"/health", health),
        *kserve_rest.routes(repository),
        *openai_api.routes(repository),
        *ollama_api.routes(repository),
    ]
    if fail_every is not None:
        routes = [
            Route(r.method, r.pattern, fail_every.wrap(r.handler))
            if r.method == "POST" and r.pattern in GENERATION_PATHS else r
            for r in routes
        ]
    # Counted outermost, so injected failures count too.
    counters = RequestCounters()
    routes = [
        Route(r.method, r.pattern, counters.wrap(r.pattern, r.handler))
        if r.method == "POST" and r.pattern in GENERATION_PATHS else r
        for r in routes
    ]
    routes.append(Route("GET", r"/metrics", counters.page))
    return Router(routes)


class ModelHttpServer(ThreadingHTTPServer):
    """One thread per connection. Counts requests in flight, so a shutdown can let them finish."""

    daemon_threads = True
    # Threads of idle keep-alive connections would hold a join in server_close() forever.
    block_on_close = False
    # Benchmarks open many connections at once; the default backlog of 5 would drop SYNs.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], router: Router) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RequestHandler)
        self.router = router
        self._in_flight = 0
        self._in_flight_changed = threading.Condition()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a host without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = self.port

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def request_started(self) -> None:
        with self._in_flight_changed:
            self._in_flight += 1

    def request_finished(self) -> None:
        with self._in_flight_changed:
            self._in_flight -= 1
            self._in_flight_changed.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The base class prints a traceback on stderr; a client that hung up is routine.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("http_connection_lost", client=client_address[0], error=str(error))
        else:
            log.exception("http_connection_failed", client=client_address[0])

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if some still are after `timeout` seconds."""
        with self._in_flight_changed:
            return self._in_flight_changed.wait_for(lambda: self._in_flight == 0, timeout)


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"{SERVER_NAME}/{SERVER_VERSION}"
    # Each streamed event is a small write that must leave at once: that is what TTFT measures.
    disable_nagle_algorithm = True
    timeout = IDLE_CONNECTION_TIMEOUT_S
    server: ModelHttpServer

    def version_string(self) -> str:
        # The Server header names this server, not the Python it runs on.
        return self.server_version

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.server.request_started()
        try:
            self._handle()
        finally:
            self.server.request_finished()

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except BodyError as exc:
            # What is left of the body cannot be told from the next request: drop the connection.
            self.close_connection = True
            self._send(json_response({"error": str(exc)}, status=exc.status))
            return
        path = urlsplit(self.path).path
        method = "GET" if self.command == "HEAD" else self.command
        found = self.server.router.match(method, path)
        if isinstance(found, list):
            if found:
                allow = ", ".join(sorted(set(found)))
                self._send(json_response({"error": f"method {self.command} not allowed"}, 405, (("Allow", allow),)))
            else:
                self._send(json_response({"error": f"no route for {path}"}, status=404))
            return
        handler, params = found
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = Request(method=method, path=path, headers=headers, body=body, params=params)
        try:
            result = handler(request)
        except Exception:
            log.exception("request_failed", method=self.command, path=path)
            self._send(json_response({"error": "internal server error"}, status=500))
            return
        if isinstance(result, StreamingResponse):
            self._stream(result)
        else:
            self._send(result)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        if not length_header.strip().isdigit():
            raise BodyError(400, f"bad Content-Length {length_header!r}")
        length = int(length_header)
        if length > MAX_BODY_BYTES:
            raise BodyError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        body = self.rfile.read(length)
        if len(body) != length:
            raise BodyError(400, "request body shorter than its Content-Length")
        return body

    def _read_chunked_body(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BodyError(400, "malformed chunk size in request body") from None
            if size == 0:
                # Skip trailers up to the blank line that ends the body.
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise BodyError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(8) not in (b"\r\n", b"\n"):
                raise BodyError(400, "truncated chunk in request body")
            parts.append(chunk)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    def _stream(self, response: StreamingResponse) -> None:
        # An HTTP/1.0 client knows no chunked encoding: its stream ends when the connection does.
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        chunks: Iterator[bytes] = iter(response.chunks)
        try:
            for chunk in chunks:
                # An empty chunk would end a chunked body early.
                if chunk:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client_disconnected", path=self.path)
            self.close_connection = True
        except Exception:
            # The headers are gone already: cut the connection so the client sees a truncated
            # stream rather than one that looks complete.
            log.exception("stream_failed", path=self.path)
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("http_request", method=self.command, path=self.path, status=code)

    def log_message(self, format: str, *args: Any) -> None:
        log.warning("http_server", message=format % args, client=self.client_address[0])
