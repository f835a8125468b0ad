"""Moved to `mecbench.servers.http` (shared by the SUT agent and the LoadGen side); kept so that
plugins importing it from here still work."""

from mecbench.servers.http import (
    JSON_HEADERS,
    HttpClient,
    base_url,
    check_status,
)

__all__ = ["JSON_HEADERS", "HttpClient", "base_url", "check_status"]
