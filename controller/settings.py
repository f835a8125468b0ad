"""Controller settings: `MECBENCH_CONTROLLER_*` environment variables override the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mecbench.core.settings import from_env


@dataclass
class ControllerSettings:
    # Where the registry database, the store's local root and the spool live.
    data_dir: Path = field(default_factory=lambda: Path("mecbench-data"))
    # "local": agents are child processes on this machine.
    backend: str = "local"
    # Host the local backend binds agents on.
    agent_host: str = "127.0.0.1"
    agent_start_timeout_s: float = 30.0
    max_workers: int = 32
    # Runs executing at once; more wait in PENDING.
    max_concurrent_runs: int = 4
    # Longest a single LoadGen test may take before the run fails (guards stuck SUTs).
    max_test_duration_s: float = 3600.0
    # A result file's LoadGen log chunks are kept in memory up to this size per file.
    max_log_bytes: int = 512 * 1024 * 1024

    @classmethod
    def load(cls, **overrides: object) -> ControllerSettings:
        return from_env(cls, "MECBENCH_CONTROLLER_", None, **overrides)
