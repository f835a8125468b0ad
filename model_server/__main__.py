"""`python -m model_server`: load the models of a directory, serve them over HTTP (KServe v2,
OpenAI, Ollama) and gRPC (KServe v2) until SIGTERM or SIGINT, then stop cleanly and exit 0.

The bound ports are logged (`listening`) and, with --port-file, written there as one JSON line
{"http_port": N, "grpc_port": M or null} once both servers accept connections, so a launcher that
asked for port 0 learns the ports. Nothing is printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from mecbench.core.logging import configure_logging, get_logger
from model_server.grpc_service import start_grpc_server
from model_server.http_server import FailEvery, ModelHttpServer, build_router
from model_server.models import ModelRepository

log = get_logger("model_server")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mecbench-model-server",
        description="Serve ONNX models over KServe v2 (REST and gRPC), OpenAI-compatible and Ollama APIs.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address both servers bind (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port; 0 picks a free one (default 8000)")
    parser.add_argument(
        "--grpc-port", type=int, default=-1, help="gRPC port; 0 picks a free one, -1 disables gRPC (default -1)"
    )
    parser.add_argument(
        "--models", type=Path, required=True, help="directory of NAME.onnx tensor models and NAME.lm.onnx LMs"
    )
    parser.add_argument(
        "--startup-delay", type=float, default=0.0, help="seconds to wait before loading models and listening"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads per model (default 1: requests run in "
        "parallel on the servers' threads instead)",
    )
    parser.add_argument("--port-file", type=Path, help='write {"http_port":..,"grpc_port":..} here once listening')
    parser.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds in-flight requests get to finish")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--fail-every", type=int, default=0,
        help="fault injection for tests: answer every N-th generation request with HTTP 500 (default 0: never)",
    )
    args = parser.parse_args(argv)
    if args.fail_every < 0:
        parser.error("--fail-every must not be negative")
    if args.http_port < 0 or args.http_port > 65535 or args.grpc_port < -1 or args.grpc_port > 65535:
        parser.error("ports are 0..65535 (gRPC also -1)")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.startup_delay < 0:
        parser.error("--startup-delay must not be negative")
    return args


def write_port_file(path: Path, http_port: int, grpc_port: int | None) -> None:
    # Written whole and renamed into place, so a launcher polling for the file never reads half a line.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"http_port": http_port, "grpc_port": grpc_port}) + "\n")
    partial.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level=args.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if args.startup_delay > 0:
        log.info("startup_delay", seconds=args.startup_delay)
        if stop.wait(args.startup_delay):
            return 0
    if not args.models.is_dir():
        log.error("models_directory_missing", models=str(args.models))
        return 2
    repository = ModelRepository(args.models, threads=args.threads)
    repository.load_all()

    faults = FailEvery(args.fail_every) if args.fail_every else None
    http_server = ModelHttpServer((args.host, args.http_port), build_router(repository, faults))
    http_thread = threading.Thread(target=http_server.serve_forever, name="http", daemon=True)
    http_thread.start()
    grpc_server, grpc_port = (None, None)
    if args.grpc_port >= 0:
        grpc_server, grpc_port = start_grpc_server(repository, args.host, args.grpc_port)
    if args.port_file is not None:
        write_port_file(args.port_file, http_server.port, grpc_port)
    log.info(
        "listening",
        host=args.host,
        http_port=http_server.port,
        grpc_port=grpc_port,
        tensor_models=[model.name for model in repository.tensor_models()],
        language_models=[model.name for model in repository.language_models()],
    )

    stop.wait()
    # Stop accepting first, then give requests in flight the grace period to finish.
    http_server.shutdown()
    http_server.server_close()
    if grpc_server is not None:
        grpc_server.stop(args.shutdown_grace).wait(args.shutdown_grace + 1)
    if not http_server.wait_idle(args.shutdown_grace):
        log.warning("http_requests_abandoned", grace_s=args.shutdown_grace)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
