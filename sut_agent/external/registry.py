"""Moved to `mecbench.servers.registry` (shared by the SUT agent and the LoadGen side); kept so that
plugins importing it from here still work."""

from mecbench.servers.registry import (
    BUILT_IN,
    ENTRY_POINT_GROUP,
    load_server_type,
    server_types,
)

__all__ = ["BUILT_IN", "ENTRY_POINT_GROUP", "load_server_type", "server_types"]
