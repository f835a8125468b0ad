"""Moved to `mecbench.servers.ollama` (shared by the SUT agent and the LoadGen side); kept so that
plugins importing it from here still work."""

from mecbench.servers.ollama import (
    OllamaServer,
)

__all__ = ["OllamaServer"]
