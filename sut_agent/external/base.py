"""Moved to `mecbench.servers.base` (shared by the SUT agent and the LoadGen side); kept so that
plugins importing it from here still work."""

from mecbench.servers.base import (
    FirstTokenCallback,
    InferenceResult,
    Options,
    ServerError,
    ServerType,
    request_fields,
)

__all__ = ["FirstTokenCallback", "InferenceResult", "Options", "ServerError", "ServerType", "request_fields"]
