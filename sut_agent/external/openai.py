"""Moved to `mecbench.servers.openai` (shared by the SUT agent and the LoadGen side); kept so that
plugins importing it from here still work."""

from mecbench.servers.openai import (
    OpenAIServer,
)

__all__ = ["OpenAIServer"]
