"""What an HTTP route sees and returns, kept free of sockets so each API is plain logic."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    # Header names are lower-cased.
    headers: Mapping[str, str]
    body: bytes
    # The named groups of the route's pattern.
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StreamingResponse:
    """A response sent chunk by chunk as the iterator yields, each chunk flushed on its own."""

    chunks: Iterable[bytes]
    content_type: str
    status: int = 200


RouteResult = Response | StreamingResponse
Handler = Callable[[Request], RouteResult]


@dataclass(frozen=True)
class Route:
    method: str
    # Matched against the whole path; named groups become Request.params.
    pattern: str
    handler: Handler


class InvalidJson(ValueError):
    """The request body is not the JSON object the route wants."""


def dump_json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def json_response(payload: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status=status, body=dump_json(payload), headers=headers)


def json_object(body: bytes | memoryview) -> dict[str, Any]:
    """The body as a JSON object (an empty body is an empty object, as several APIs allow)."""
    if not body:
        return {}
    try:
        payload = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"malformed JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidJson("the JSON body must be an object")
    return payload


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = [(route.method, re.compile(route.pattern), route.handler) for route in routes]

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | list[str]:
        """The handler and path parameters for the request, or, when no route takes the method,
        the methods the path allows (empty: no such path)."""
        allowed: list[str] = []
        for route_method, pattern, handler in self._routes:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            if route_method == method:
                return handler, found.groupdict()
            allowed.append(route_method)
        return allowed
