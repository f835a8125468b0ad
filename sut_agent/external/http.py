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

from sut_agent.external.base import ServerError

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

    def stream_lines(self, path: str, payload: Any) -> Iterator[bytes]:
        """POST `payload` and yield the answer's lines (without line ends) as they arrive."""
        body = json.dumps(payload).encode()
        try:
            response = self._pool.urlopen(
                "POST", self._prefix + path, body=body, headers={**self._headers, **JSON_HEADERS},
                preload_content=False,
            )
        except HTTPError as exc:
            raise ServerError(f"POST {path}: {_reason(exc)}") from None
        try:
            if response.status >= 300:
                response.read()
                check_status(response, f"POST {path}")
            pending = b""
            while True:
                try:
                    # read1: what has arrived, not a full buffer, so a token is seen when it lands.
                    data = response.read1(65536)
                except HTTPError as exc:
                    raise ServerError(f"POST {path}: the stream broke: {_reason(exc)}") from None
                if not data:
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.rstrip(b"\r")
            if pending:
                yield pending.rstrip(b"\r")
        finally:
            response.release_conn()

    def close(self) -> None:
        self._pool.close()


def check_status(response: urllib3.BaseHTTPResponse, what: str) -> None:
    if response.status < 300:
        return
    text = response.data.decode("utf-8", "replace").strip()
    try:
        decoded = json.loads(text)
        error = decoded.get("error", decoded) if isinstance(decoded, dict) else decoded
        if isinstance(error, dict):
            error = error.get("message", error)
        text = str(error)
    except ValueError:
        pass
    raise ServerError(f"{what}: HTTP {response.status}: {text[:500]}")


def _reason(exc: HTTPError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)
