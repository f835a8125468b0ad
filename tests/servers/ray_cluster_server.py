"""A real server that spans a Ray cluster, for the tests of cluster SUTs: an OpenAI-compatible
front (completions and chat, streamed or not, /health, /v1/models, /metrics) on the head, and
one Ray actor pinned to every node of the cluster that computes the answers, taken in turn.

It runs in Ray's own virtual environment (.venv-ray, made by `scripts/setup --test-servers`):

    .venv-ray/bin/python tests/servers/ray_cluster_server.py --address HEAD:PORT --nodes N \
        --host 127.0.0.1 --port 8000 --model NAME

It waits until the cluster has `--nodes` live nodes, places a replica on each (hard node
affinity: a replica dies with its node), and answers /health with 503 once a replica is gone.
/metrics counts the requests each node's replica served (`ray_server_requests_total{node=...}`),
so a test reads back that the load really crossed to the worker.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class Replica:
    """One node's share of the model: answers a prompt with a deterministic text of max_tokens words."""

    def __init__(self) -> None:
        self.node = ray.util.get_node_ip_address()

    def where(self) -> str:
        return str(self.node)

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, list[str]]:
        words = prompt.split() or ["token"]
        tokens = [words[i % len(words)].lower() for i in range(max(1, min(max_tokens, 64)))]
        return self.node, tokens


class Cluster:
    def __init__(self, nodes: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [node for node in ray.nodes() if node["Alive"]]
            if len(alive) >= nodes:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster has {len(alive)} of {nodes} nodes after {timeout_s:g}s")
            time.sleep(0.5)
        self.replicas = [
            Replica.options(  # type: ignore[attr-defined]
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote()
            for node in alive
        ]
        self.nodes = ray.get([replica.where.remote() for replica in self.replicas], timeout=timeout_s)
        print(f"ray-cluster-server: one replica on each node: {', '.join(self.nodes)}", flush=True)
        self.served = dict.fromkeys(self.nodes, 0)
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int) -> list[str]:
        replica = self.replicas[next(self._turn) % len(self.replicas)]
        node, tokens = ray.get(replica.complete.remote(prompt, max_tokens), timeout=30)
        with self._lock:
            self.served[node] += 1
        return list(tokens)

    def healthy(self) -> bool:
        try:
            ray.get([replica.where.remote() for replica in self.replicas], timeout=2)
        except (ray.exceptions.RayError, TimeoutError):
            return False
        return True


def handler(cluster: Cluster, model: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                healthy = cluster.healthy()
                self._send(200 if healthy else 503, b"{}" if healthy else b'{"error": "a replica is gone"}')
            elif self.path == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode())
            elif self.path == "/metrics":
                lines = ["# TYPE ray_server_requests_total counter"]
                lines += [f'ray_server_requests_total{{node="{node}"}} {count}' for node, count in cluster.served.items()]
                self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, b'{"error": "not JSON"}')
                return
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                self._send(404, b'{"error": "not found"}')
                return
            if chat:
                messages = body.get("messages") or [{}]
                prompt = str(messages[-1].get("content", ""))
            else:
                prompt = str(body.get("prompt", ""))
            try:
                tokens = cluster.complete(prompt, int(body.get("max_tokens") or 16))
            except (ray.exceptions.RayError, TimeoutError) as error:  # a replica died with its node
                self._send(500, json.dumps({"error": f"{type(error).__name__}: {error}"[:500]}).encode())
                return
            text = " ".join(tokens)
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens)}
            if body.get("stream"):
                self._stream(chat, tokens, usage)
                return
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            self._send(200, json.dumps({"object": "chat.completion" if chat else "text_completion",
                                        "model": model, "choices": [choice], "usage": usage}).encode())

        def _stream(self, chat: bool, tokens: list[str], usage: dict[str, int]) -> None:
            events = []
            for index, token in enumerate(tokens):
                piece = token if index == 0 else f" {token}"
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                events.append({"choices": [choice]})
            events.append({"choices": [], "usage": usage})
            payload = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
            self._send(200, payload + b"data: [DONE]\n\n", "text/event-stream")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the Ray head's host:port")
    parser.add_argument("--nodes", type=int, required=True, help="nodes to place a replica on")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="ray-model")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    cluster = Cluster(args.nodes, args.timeout)
    server = ThreadingHTTPServer((args.host, args.port), handler(cluster, args.model))
    server.daemon_threads = True
    print(f"ray-cluster-server: listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
