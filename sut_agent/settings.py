"""SUT agent settings: `MECBENCH_SUT_*` environment variables override the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mecbench.core.settings import from_env


@dataclass
class SutAgentSettings:
    # gRPC worker threads. Every open StreamInfer holds one for its whole life, and LoadGen
    # agents open several streams per client, so this is well above the CPU count.
    max_workers: int = 256
    # Relative `config.onnxruntime.model_path` values resolve against this directory.
    model_dir: Path = field(default_factory=lambda: Path("."))
    # The synthetic backend sleeps until this long before a completion deadline, then spins
    # (yielding the CPU) to hit it precisely; a condition wait alone overshoots by ~50-100us.
    synthetic_spin_us: int = 200
    # Coalescing caps of one StreamInfer response message.
    max_response_samples: int = 8192
    max_response_bytes: int = 8 * 1024 * 1024
    # The plain-TCP data plane (DATA_PLANE_TRANSPORT_TCP) on the gRPC server's host; port 0
    # picks a free one, reported in SutStatus.tcp_data_plane_port.
    tcp_data_plane: bool = True
    tcp_data_plane_port: int = 0
    # Launch profiles of external inference servers (YAML; examples/servers.yaml shows the
    # format). Requests name a profile; commands only ever come from this file.
    server_profiles: Path | None = None
    # Let requests carry a server command line (config.external.command). Off: only launch
    # profiles start processes, so whoever can call the agent cannot run programs on its node.
    allow_request_commands: bool = False
    # Names (or PREFIX* patterns, e.g. CUDA_*,OMP_*,HF_*,VLLM_*) a request may set in the
    # environment of the server this agent starts (config.env); empty: any name that is not
    # reserved (mecbench.core.request_env.RESERVED, always refused). Never the agent's own.
    env_allowlist: tuple[str, ...] = ()
    # Where an external server's stdout and stderr are written; empty: a fresh temporary folder.
    server_log_dir: Path | None = None
    # Prometheus /metrics on the gRPC server's host: -1 off, 0 any free port (logged as
    # metrics_listening), else that port.
    metrics_port: int = -1

    @property
    def server_log_path(self) -> Path:
        """One log for every external server the agent runs, appended start after start, so a
        byte offset taken at any time stays valid."""
        if self.server_log_dir is None:
            raise ValueError("server_log_dir is not set (the BackendManager sets it)")
        return self.server_log_dir / "server.log"

    @classmethod
    def load(cls, **overrides: object) -> SutAgentSettings:
        return from_env(cls, "MECBENCH_SUT_", None, **overrides)
