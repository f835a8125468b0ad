"""Shared fixtures. Servers are real and bind port 0 on loopback."""

from __future__ import annotations

import os

import pytest

from mecbench.core.logging import configure_logging

configure_logging(level=os.environ.get("MECBENCH_TEST_LOG_LEVEL", "warning"), json_output=True)


def is_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not is_root(), reason="needs root for network namespaces and qdiscs")
