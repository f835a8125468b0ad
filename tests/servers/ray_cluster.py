"""Launch profiles for a real Ray cluster SUT on this machine's CPU: a cluster profile `ray` (the
head's and a worker's `ray start --block`, small: one CPU, a 100 MB object store, no usage stats)
and a server profile `ray-server` (tests/servers/ray_cluster_server.py, an OpenAI face on the head
with a replica on every node).

Ray runs from its own virtual environment, .venv-ray (`scripts/setup --test-servers` makes it), so
its pins never meet MECBench's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_VENV = REPO_ROOT / ".venv-ray"
RAY_PYTHON = RAY_VENV / "bin" / "python"
RAY = RAY_VENV / "bin" / "ray"
SERVER_SCRIPT = Path(__file__).resolve().with_name("ray_cluster_server.py")
SKIP_REASON = ".venv-ray is missing: run scripts/setup --test-servers (it installs Ray there)"

_SMALL = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats", "--temp-dir={member_dir}"]
_MEMBERS = (
    "import ray; ray.init(address='{cluster_address}', logging_level='ERROR', log_to_driver=False); "
    "print(sum(1 for node in ray.nodes() if node['Alive']))"
)


def ray_available() -> bool:
    return RAY_PYTHON.exists() and RAY.exists()


def write_ray_profiles(path: Path) -> Path:
    """The profiles file a SUT agent of a Ray cluster SUT reads (MECBENCH_SUT_SERVER_PROFILES)."""
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    document = {
        "profiles": {
            "ray-server": {
                "command": [str(RAY_PYTHON), str(SERVER_SCRIPT), "--address", "{cluster_address}", "--nodes",
                            "{cluster_size}", "--host", "{host}", "--port", "{port}", "--model", "{model}"],
                "env": env,
                # Every address of the head's node: LoadGen clients reach it over their data links.
                "host": "0.0.0.0",
                "server_type": "openai",
                "ready": {"http": "http://127.0.0.1:{port}/v1/models", "interval_s": 0.2},
                "ready_timeout_s": 120,
                "stop_timeout_s": 5,
            },
        },
        "clusters": {
            "ray": {
                "head": {
                    "command": [str(RAY), "start", "--head", "--block", "--node-ip-address={host}", "--port={port}",
                                "--include-dashboard=false", *_SMALL],
                    "env": env,
                    "ready": {"tcp": "{host}:{port}"},
                    "ready_timeout_s": 120,
                    "stop_timeout_s": 1,
                },
                "worker": {
                    "command": [str(RAY), "start", "--block", "--address={head_address}", "--node-ip-address={host}",
                                "--node-manager-port={port}", *_SMALL],
                    "env": env,
                    "ready": {"tcp": "{host}:{port}"},
                    "ready_timeout_s": 120,
                    "stop_timeout_s": 1,
                },
                "members": {"command": [str(RAY_PYTHON), "-c", _MEMBERS], "interval_s": 1, "timeout_s": 60},
                "join_timeout_s": 180,
            },
        },
    }
    assert path.suffix == ".json", "the agent reads a profiles file by its suffix"
    path.write_text(json.dumps(document, indent=2))
    return path


def ray_processes() -> list[str]:
    """Processes of this checkout's Ray (its venv's programs, their workers) running now, as
    "pid command"; zombies (already dead, waiting to be reaped) are not counted."""
    found = []
    marker = str(RAY_VENV).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command = Path(entry.path, "cmdline").read_bytes()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (marker in command or command.startswith(b"ray::")):
            text = command.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name} {text[:160]}")
    return found
