"""Moved to `mecbench.servers.kserve` (shared by the SUT agent and the LoadGen side); kept so that
plugins importing it from here still work."""

from mecbench.servers.kserve import (
    DATATYPES,
    HEADER_LENGTH,
    KServeGrpcServer,
    KServeHttpServer,
    TensorPlan,
)

__all__ = ["DATATYPES", "HEADER_LENGTH", "KServeGrpcServer", "KServeHttpServer", "TensorPlan"]
