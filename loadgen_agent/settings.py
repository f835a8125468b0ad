"""LoadGen agent settings: `MECBENCH_LOADGEN_*` environment variables override the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loadgen_agent.datasets import default_cache_dir
from mecbench.core.settings import from_env


@dataclass
class LoadGenAgentSettings:
    max_workers: int = 32
    # Sessions open at once (each is a process holding its dataset in memory).
    max_sessions: int = 16
    # OpenSession waits this long for the session process to load its dataset and connect (below
    # the controller's 60 s RPC deadline, so it hears why).
    open_timeout_s: float = 50.0
    # How long the session process waits for the SUT agent's health check to answer SERVING.
    sut_connect_timeout_s: float = 30.0
    # Interval of TestProgress events.
    progress_interval_s: float = 0.5
    # After CancelTest (or a data-plane abort) LoadGen gets this long to end the test with every
    # query answered at once; past it the session process is replaced by a fresh one.
    cancel_grace_s: float = 3.0
    # Largest dataset a session may hold, in bytes (synthetic, or the samples of a fetched one).
    max_dataset_bytes: int = 4 * 1024 * 1024 * 1024
    # Datasets fetched from `dataset.uri`, kept under their SHA-256 so a session that names the
    # digest fetches nothing; shared safely by the agent's session processes.
    dataset_cache_dir: Path = field(default_factory=default_cache_dir)
    # Directories a request's local dataset path (file:///path or /path) may lie under, comma
    # separated; empty: no local file is read (s3:// is the way to bring data). /proc, /sys and
    # /dev never, whatever this says.
    dataset_roots: tuple[Path, ...] = ()
    # Where each test's LoadGen log directory is created (removed after it was streamed back);
    # empty = the system temporary directory.
    work_dir: Path | None = None
    # Size of the FileChunk messages the log files are streamed back in.
    log_chunk_bytes: int = 1024 * 1024
    # structlog level inside the session processes.
    worker_log_level: str = "info"
    # Prometheus /metrics on the gRPC server's host: -1 off, 0 any free port (logged as
    # metrics_listening), else that port.
    metrics_port: int = -1

    @classmethod
    def load(cls, **overrides: object) -> LoadGenAgentSettings:
        return from_env(cls, "MECBENCH_LOADGEN_", None, **overrides)
