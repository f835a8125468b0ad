"""HTTP/1.1 to an external server: one keep-alive connection pool shared by the backend's worker
threads (urllib3's pools are thread-safe), JSON bodies, and line-by-line streaming that hands
each line over as soon as its bytes arrive (Server-Sent Events, NDJSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError

from mecbench.servers.base import AnswerDecoder, FirstTokenCallback, HttpCall, ServerError

JSON_HEADERS = {"Content-Type": "application/json"}


def base_url(endpoint: str) -> str:
    """`host:port` or a URL, as a URL without a trailing slash."""
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return endpoint.rstrip("/")


class HttpClient:
    def __init__(self, endpoint: str, timeout_s: float, maxsize: int, headers: Mapping[str, str] | None = None) -> None:
        url = base_url(endpoint)
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"{endpoint!r} is not an http(s) URL or host:port")
        self.url = url
        self._prefix = parts.path
        self._headers = dict(headers or {})
        # No retries: a failed request is a failed sample, measured as such, never silently resent.
        self._pool = urllib3.connection_from_url(
            url,
            maxsize=max(maxsize, 1),
            retries=False,
            timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """The whole response, whatever its status; ServerError when the server is unreachable."""
        try:
            return self._pool.urlopen(
                method, self._prefix + path, body=body, headers={**self._headers, **(headers or {})},
                timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s) if timeout_s else None,
            )
        except HTTPError as exc:
            raise ServerError(f"{method} {path}: {_reason(exc)}") from None

    def json(
        self, method: str, path: str, payload: Any = None, timeout_s: float | None = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON body or None)."""
        body = None if payload is None else json.dumps(payload).encode()
        response = self.request(method, path, body, JSON_HEADERS if body is not None else None, timeout_s)
        try:
            return response.status, json.loads(response.data) if response.data else None
        except ValueError:
            return response.status, None

    def json_ok(self, method: str, path: str, payload: Any = None, timeout_s: float | None = None) -> Any:
        """The decoded JSON body of a 2xx answer; ServerError with the server's words otherwise."""
        body = None if payload is None else json.dumps(payload).encode()
        response = self.request(method, path, body, JSON_HEADERS if body is not None else None, timeout_s)
        check_status(response, f"{method} {path}")
        try:
            return json.loads(response.data)
        except ValueError:
            raise ServerError(f"{method} {path}: the answer is not JSON") from None

    def exchange(
        self, call: HttpCall, decoder: AnswerDecoder, position: int = 0,
        on_first_token: FirstTokenCallback | None = None,
    ) -> tuple[str, int]:
        """Send one `call` and decode its answer; the first text of a streamed answer goes to
        `on_first_token` (with `position`) as soon as it arrives."""
        if not call.streamed:
            response = self.request(call.method, call.path, call.body, call.headers)
            check_status(response, f"{call.method} {call.path}")
            decoder.whole(response.data, response.headers)
            return decoder.result()
        first = True
        for line in self.stream_raw(call.method, call.path, call.body, call.headers):
            text = decoder.line(line)
            if text and first:
                first = False
                if on_first_token is not None:
                    on_first_token(position, text.encode())
            if decoder.done:
                break
        return decoder.result()

    def stream_lines(self, path: str, payload: Any) -> Iterator[bytes]:
        """POST `payload` as JSON and yield the answer's lines (see `stream_raw`)."""
        return self.stream_raw("POST", path, json.dumps(payload).encode(), JSON_HEADERS)

    def stream_raw(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> Iterator[bytes]:
        """Send `body` and yield the answer's lines (without line ends) as they arrive.

        Keep-alive: a connection goes back to the pool only once its answer was read to the end
        (for a chunked answer, the terminating `0\\r\\n\\r\\n` too); otherwise the next request on it
        would read that rest as its status line (`BadStatusLine('0\\r\\n')`). A consumer that stops
        early (an `[DONE]` or `"done": true` before the body ends, an error event) makes the rest
        be read here when it is already on its way (a short wait), else the connection closed."""
        try:
            response = self._pool.urlopen(
                method, self._prefix + path, body=body, headers={**self._headers, **headers},
                preload_content=False,
            )
        except HTTPError as exc:
            raise ServerError(f"{method} {path}: {_reason(exc)}") from None
        complete = False
        try:
            if response.status >= 300:
                # read() hands the body over without keeping it in `data`: pass it on.
                error_body = response.read()
                complete = True
                check_status(response, f"{method} {path}", error_body)
            pending = b""
            while True:
                try:
                    # read1: what has arrived, not a full buffer, so a token is seen when it lands.
                    data = response.read1(65536)
                except HTTPError as exc:
                    raise ServerError(f"{method} {path}: the stream broke: {_reason(exc)}") from None
                if not data:
                    complete = True
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.rstrip(b"\r")
            if pending:
                yield pending.rstrip(b"\r")
        finally:
            if not complete:
                complete = _finish_body(response)
            if not complete:
                # Never pooled half-read: closed, so the pool opens a fresh one in its place.
                response.close()
            response.release_conn()

    def close(self) -> None:
        self._pool.close()


def check_status(response: urllib3.BaseHTTPResponse, what: str, body: bytes | None = None) -> None:
    if response.status < 300:
        return
    text = (response.data if body is None else body).decode("utf-8", "replace").strip()
    try:
        decoded = json.loads(text)
        error = decoded.get("error", decoded) if isinstance(decoded, dict) else decoded
        if isinstance(error, dict):
            error = error.get("message", error)
        text = str(error)
    except ValueError:
        pass
    raise ServerError(f"{what}: HTTP {response.status}: {text[:500]}")


_DRAIN_TIMEOUT_S = 0.25
_DRAIN_LIMIT_BYTES = 64 * 1024


def _finish_body(response: urllib3.BaseHTTPResponse) -> bool:
    """Read what is left of an answer whose consumer stopped early, if it ends soon (a stream's
    last event is followed at once by the end of the body); True when it was read to its end."""
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    try:
        if sock is not None:
            sock.settimeout(_DRAIN_TIMEOUT_S)
        left = _DRAIN_LIMIT_BYTES
        while left > 0:
            data = response.read1(min(left, 65536))
            if not data:
                return True
            left -= len(data)
    except (HTTPError, OSError, ValueError):
        return False
    return False


def _reason(exc: HTTPError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)
