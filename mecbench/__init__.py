"""MECBench: MLPerf-grade benchmarks of AI inference at the network edge.

The Python SDK is exported here: `mecbench.Client` (sync), `mecbench.AsyncClient` (asyncio),
`mecbench.ResultTable` and the typed errors (`mecbench.ClientError` and its subclasses). They are
loaded on first use, so `import mecbench` stays cheap for the services and the CLI (no gRPC, no
grpc.aio until a client is asked for).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mecbench.aio import AsyncClient
    from mecbench.client import Client, ResultTable, result_rows
    from mecbench.client_errors import (
        AlreadyExistsError,
        CallCancelledError,
        ClientError,
        DeadlineExceededError,
        FailedPreconditionError,
        InternalError,
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnauthenticatedError,
        UnavailableError,
        UnimplementedError,
    )

# Exported name -> the module that defines it.
_LAZY = {
    "Client": "mecbench.client",
    "ResultTable": "mecbench.client",
    "result_rows": "mecbench.client",
    "AsyncClient": "mecbench.aio",
    **{
        name: "mecbench.client_errors"
        for name in (
            "ClientError",
            "AlreadyExistsError",
            "CallCancelledError",
            "DeadlineExceededError",
            "FailedPreconditionError",
            "InternalError",
            "InvalidArgumentError",
            "NotFoundError",
            "PermissionDeniedError",
            "ResourceExhaustedError",
            "UnauthenticatedError",
            "UnavailableError",
            "UnimplementedError",
        )
    },
}

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "CallCancelledError",
    "Client",
    "ClientError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ResultTable",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "result_rows",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mecbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
