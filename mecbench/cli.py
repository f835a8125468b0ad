"""The `mecbench` command: start services, and run the quickstart.

Exit codes: 0 success, 1 a run failed or a result was INVALID, 2 bad usage or input,
3 a service could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from mecbench.core import durations
from mecbench.core.logging import configure_logging
from mecbench.v1 import common_pb2, controller_pb2

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def _serve_controller(address: str) -> None:
    from controller.server import serve

    serve(address)


def _serve_sut_agent(address: str) -> None:
    from sut_agent.server import serve

    serve(address)


def _serve_loadgen_agent(address: str) -> None:
    from loadgen_agent.server import serve

    serve(address)


def _serve_node_agent(address: str) -> None:
    from node_agent.server import serve

    serve(address)


SERVICES: dict[str, Callable[[str], None]] = {
    "controller": _serve_controller,
    "sut-agent": _serve_sut_agent,
    "loadgen-agent": _serve_loadgen_agent,
    "node-agent": _serve_node_agent,
}


def _ms(d: object) -> str:
    from google.protobuf.duration_pb2 import Duration

    assert isinstance(d, Duration)
    return f"{durations.to_ns(d) / 1e6:.3f}"


def format_results_table(rows: Sequence[tuple[str, controller_pb2.Run]]) -> str:
    """A plain-text table of each run's first repeat result."""
    header = ["test", "state", "valid", "samples/s", "p50 ms", "p90 ms", "p99 ms", "queries"]
    lines = [header]
    for label, run in rows:
        state = common_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")
        if run.results:
            result = run.results[0].aggregate
            lines.append(
                [
                    label,
                    state,
                    "VALID" if result.valid else "INVALID",
                    f"{result.samples_per_second:.1f}",
                    _ms(result.latency.p50),
                    _ms(result.latency.p90),
                    _ms(result.latency.p99),
                    str(result.query_count),
                ]
            )
        else:
            lines.append([label, state, "-", "-", "-", "-", "-", "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def quickstart_specs(experiment_id: str) -> list[tuple[str, controller_pb2.RunSpec]]:
    """A short Server test at a modest QPS and a SingleStream test against the synthetic SUT."""
    common = {"experiment_id": experiment_id, "sut_id": "quickstart-synthetic"}
    server = controller_pb2.RunSpec(
        selector="server-qps200",
        settings=common_pb2.LoadGenSettings(
            scenario=common_pb2.SCENARIO_SERVER,
            server_target_qps=200,
            server_target_latency=durations.from_seconds(0.010),
            min_duration=durations.from_seconds(3),
            min_query_count=100,
        ),
        **common,  # type: ignore[arg-type]
    )
    single = controller_pb2.RunSpec(
        selector="singlestream",
        settings=common_pb2.LoadGenSettings(
            scenario=common_pb2.SCENARIO_SINGLE_STREAM,
            min_duration=durations.from_seconds(2),
            min_query_count=100,
            # LoadGen sizes a SingleStream test as min_duration / expected latency queries up
            # front: expecting the SUT's 2 ms makes the test last at least min_duration.
            single_stream_expected_latency=durations.from_seconds(0.002),
        ),
        **common,  # type: ignore[arg-type]
    )
    return [("Server @200 QPS", server), ("SingleStream", single)]


def quickstart(args: argparse.Namespace) -> int:
    from controller.server import create_server
    from controller.settings import ControllerSettings
    from mecbench.core.channels import open_channel
    from mecbench.v1 import controller_pb2_grpc, sut_agent_pb2

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="mecbench-quickstart-")).resolve()
    settings = ControllerSettings.load(data_dir=data_dir)
    running, port = create_server("127.0.0.1:0", settings)
    channel = open_channel(f"127.0.0.1:{port}")
    stub = controller_pb2_grpc.ControllerStub(channel)
    try:
        print(f"controller on 127.0.0.1:{port}, data in {data_dir}")
        storage = stub.InitStorage(controller_pb2.InitStorageRequest())
        for bucket in storage.buckets:
            state = controller_pb2.BucketState.Name(bucket.state).removeprefix("BUCKET_STATE_").lower()
            print(f"storage ({storage.backend}): bucket {bucket.name} {state}")
        sut = stub.DeploySut(
            controller_pb2.DeploySutRequest(
                sut_id="quickstart-synthetic",
                config=sut_agent_pb2.SutConfig(
                    synthetic=sut_agent_pb2.SyntheticBackendConfig(
                        distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT,
                        mean=durations.from_seconds(0.002),
                    )
                ),
            )
        ).sut
        print(f"SUT agent {sut.sut_id} (synthetic, 2 ms constant service time) at {sut.endpoint.address}")
        finished: list[tuple[str, controller_pb2.Run]] = []
        for label, spec in quickstart_specs(args.experiment):
            run = stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
            print(f"{label}: run {run.run_id} started")
            final = run
            for event in stub.WatchRun(controller_pb2.WatchRunRequest(run_id=run.run_id)):
                final = event.run
            finished.append((label, final))
        print()
        print(format_results_table(finished))
        print()
        for label, run in finished:
            if run.error:
                print(f"{label}: {run.error}")
            for repeat in run.results:
                print(f"{label}: files at {repeat.result_uri}")
        if args.json:
            print(json.dumps([json_format.MessageToDict(run) for _, run in finished], indent=2))
        ok = all(run.state == common_pb2.RUN_STATE_SUCCEEDED for _, run in finished)
        return EXIT_OK if ok else EXIT_RUN_FAILED
    finally:
        channel.close()
        running.stop(grace=2.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mecbench", description="Benchmark AI inference at the network edge.")
    parser.add_argument("--log-level", default=os.environ.get("MECBENCH_LOG_LEVEL", "info"))
    commands = parser.add_subparsers(dest="command", required=True)
    for name in SERVICES:
        service = commands.add_parser(name, help=f"run the {name} gRPC server")
        service.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind (port 0: any free port)")
        service.add_argument("--netns", default="", help="run inside this named network namespace (root)")
    quick = commands.add_parser("quickstart", help="start a local stack, run two short tests, print the results")
    quick.add_argument("--data-dir", default="", help="where results go (default: a new temporary folder)")
    quick.add_argument("--experiment", default="quickstart", help="experiment id")
    quick.add_argument("--json", action="store_true", help="also print the runs as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVICES:
        if args.netns:
            # First, before any thread exists: a network namespace is per thread, and every
            # thread started later (gRPC's included) inherits it from this one.
            from mecbench.core.netns import enter_netns

            enter_netns(args.netns)
        configure_logging(args.log_level)
        SERVICES[args.command](args.listen)
        return EXIT_OK
    # Interactive commands keep the services' logs quiet unless asked.
    configure_logging(os.environ.get("MECBENCH_LOG_LEVEL", "warning"))
    try:
        if args.command == "quickstart":
            return quickstart(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.code() == grpc.StatusCode.UNAVAILABLE else EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
