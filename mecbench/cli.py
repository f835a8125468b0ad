"""The `mecbench` command: start services, run the quickstart and experiments, upload blobs.

Exit codes: 0 success, 1 a run failed or a result was INVALID, 2 bad usage or input (the
controller's field violations are printed), 3 a service could not be reached, 130 interrupted
(Ctrl-C cancels the experiment first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mecbench.client import DEFAULT_CONTROLLER, Client, default_address
from mecbench.core import durations
from mecbench.core.errors import MecbenchError
from mecbench.core.logging import configure_logging
from mecbench.experiment_file import load_experiment_file
from mecbench.v1 import common_pb2, controller_pb2

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


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
    """A plain-text table of every repeat's aggregate result (over all clients) of each run; token
    latencies and accuracy get columns when any result has them."""
    results = [repeat.aggregate for _, run in rows for repeat in run.results]
    tokens = any(result.HasField("ttft") for result in results)
    accuracy = any(result.accuracy for result in results)
    header = ["test", "state", "valid", "samples/s", "p50 ms", "p90 ms", "p99 ms", "queries"]
    header += ["TTFT p50 ms", "TPOT p50 ms", "tokens/s"] if tokens else []
    header += ["accuracy"] if accuracy else []
    lines = [header]
    for label, run in rows:
        state = common_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")
        for repeat in run.results:
            result = repeat.aggregate
            line = [
                label if len(run.results) == 1 else f"{label} #{repeat.repeat}",
                state,
                "VALID" if result.valid else "INVALID",
                f"{result.samples_per_second:.1f}",
                _ms(result.latency.p50),
                _ms(result.latency.p90),
                _ms(result.latency.p99),
                str(result.query_count),
            ]
            if tokens:
                line += [_ms(result.ttft.p50), _ms(result.tpot.p50), f"{result.tokens_per_second:.1f}"]
            if accuracy:
                metric = result.accuracy_scorer
                line.append(f"{metric} {result.accuracy[metric]:.4f}" if metric in result.accuracy else "-")
            lines.append(line)
        if not run.results:
            lines.append([label, state] + ["-"] * (len(header) - 2))
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


@contextlib.contextmanager
def embedded_controller(data_dir: str, prefix: str) -> Iterator[tuple[int, Path]]:
    """A controller in this process on an ephemeral loopback port, its agents local processes:
    (port, data directory), stopped on leaving. With no `data_dir`, a new temporary folder."""
    from controller.server import create_server
    from controller.settings import ControllerSettings

    directory = Path(data_dir or tempfile.mkdtemp(prefix=prefix)).resolve()
    running, port = create_server("127.0.0.1:0", ControllerSettings.load(data_dir=directory))
    try:
        yield port, directory
    finally:
        running.stop(grace=2.0)


def quickstart(args: argparse.Namespace) -> int:
    with embedded_controller(args.data_dir, "mecbench-quickstart-") as (port, data_dir):
        return _quickstart_on(port, data_dir, args)


def _quickstart_on(port: int, data_dir: Path, args: argparse.Namespace) -> int:
    from mecbench.core.channels import open_channel
    from mecbench.v1 import controller_pb2_grpc, sut_agent_pb2

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


def _client(args: argparse.Namespace) -> Client:
    return Client(args.controller or default_address())


def _print_json(message: Message | Sequence[Message]) -> None:
    if isinstance(message, Message):
        print(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2))
    else:
        print(json.dumps([json_format.MessageToDict(m, preserving_proto_field_name=True) for m in message], indent=2))


def storage_init(args: argparse.Namespace) -> int:
    with _client(args) as client:
        storage = client.init_storage()
    if args.json:
        _print_json(storage)
    for bucket in storage.buckets if not args.json else []:
        state = controller_pb2.BucketState.Name(bucket.state).removeprefix("BUCKET_STATE_").lower()
        print(f"{storage.backend}: bucket {bucket.name} {state}" + (f" ({bucket.message})" if bucket.message else ""))
    failed = any(b.state == controller_pb2.BUCKET_STATE_FAILED for b in storage.buckets)
    return EXIT_UNAVAILABLE if failed else EXIT_OK


def _readable_file(path: str) -> Path:
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"{path}: no such file")
    return source


def blob_upload(args: argparse.Namespace) -> int:
    source = _readable_file(args.file)
    with _client(args) as client:
        blob = client.upload_blob(
            source, args.key or source.name, content_type=args.content_type, overwrite=args.overwrite
        )
    if args.json:
        _print_json(blob)
    else:
        print(f"{blob.uri}  {blob.size_bytes} bytes  sha256 {blob.sha256}")
    return EXIT_OK


def blob_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        blobs = client.list_blobs(args.prefix)
    if args.json:
        _print_json(blobs)
    for blob in blobs if not args.json else []:
        print(f"{blob.uri}  {blob.size_bytes} bytes  sha256 {blob.sha256}")
    return EXIT_OK


def dataset_upload(args: argparse.Namespace) -> int:
    source = _readable_file(args.file)
    with _client(args) as client:
        dataset = client.upload_dataset(source, args.name, overwrite=args.overwrite)
    if args.json:
        _print_json(dataset)
    else:
        print(f"uploaded {source} as {dataset.uri} (sha256 {dataset.sha256})")
        print("in an experiment spec:")
        print(f"dataset:\n  uri: {dataset.uri}\n  sha256: {dataset.sha256}")
    return EXIT_OK


def _experiment_outcome(client: Client, experiment: controller_pb2.Experiment, as_json: bool) -> int:
    """Print the experiment's runs as a table (or JSON); non-zero unless every run succeeded
    and every result is VALID, so a CI pipeline can gate on it."""
    runs = [client.get_run(run_id) for run_id in experiment.run_ids]
    if as_json:
        print(
            json.dumps(
                {
                    "experiment": json_format.MessageToDict(experiment, preserving_proto_field_name=True),
                    "runs": [json_format.MessageToDict(run, preserving_proto_field_name=True) for run in runs],
                },
                indent=2,
            )
        )
    else:
        print(format_results_table([(run.spec.selector or run.run_id, run) for run in runs]))
        for peak in experiment.peaks:
            print(
                f"peak {peak.network_profile or 'unshaped'} x{peak.clients}: {peak.peak_qps:.1f} QPS"
                f" within the latency bound"
            )
        if experiment.HasField("calibration"):
            floor = experiment.calibration
            if floor.error:
                print(f"harness calibration failed: {floor.error}")
            else:
                print(
                    "harness floor (zero-time SUT, 1 client, unshaped): SingleStream p50"
                    f" {_ms(floor.single_stream_latency.p50)} ms, p99 {_ms(floor.single_stream_latency.p99)} ms;"
                    f" Offline ceiling {floor.offline_samples_per_second:.0f} samples/s"
                )
        state = common_pb2.RunState.Name(experiment.state).removeprefix("RUN_STATE_")
        print(f"experiment {experiment.experiment_id}: {state}" + (f": {experiment.error}" if experiment.error else ""))
    invalid = [
        f"{run.spec.selector} #{repeat.repeat}" for run in runs for repeat in run.results if not repeat.aggregate.valid
    ]
    if invalid and not as_json:
        print(f"INVALID results: {', '.join(invalid)}", file=sys.stderr)
    ok = experiment.state == common_pb2.RUN_STATE_SUCCEEDED and not invalid
    return EXIT_OK if ok else EXIT_RUN_FAILED


def _follow(client: Client, experiment_id: str, as_json: bool) -> controller_pb2.Experiment:
    """Watch to the end, printing each point as it starts and finishes; Ctrl-C cancels the
    experiment and waits for its clean-up before re-raising."""
    experiment = client.get_experiment(experiment_id)
    shown: tuple[int, int, int] | None = None
    try:
        for experiment in client.watch_experiment(experiment_id):
            progress = (experiment.state, experiment.points_done, len(experiment.run_ids))
            if not as_json and progress != shown:
                shown = progress
                state = common_pb2.RunState.Name(experiment.state).removeprefix("RUN_STATE_")
                current = ""
                started = len(experiment.run_ids)
                if experiment.state == common_pb2.RUN_STATE_RUNNING and started > experiment.points_done:
                    current = f": point {started} ({client.get_run(experiment.run_ids[-1]).spec.selector})"
                elif (
                    experiment.state == common_pb2.RUN_STATE_RUNNING
                    and not experiment.spec.skip_calibration
                    and not experiment.HasField("calibration")
                ):
                    current = ": measuring the harness's floor"
                print(f"[{experiment.points_done}/{experiment.points_total}] {state}{current}", flush=True)
    except KeyboardInterrupt:
        print(f"cancelling experiment {experiment_id}", file=sys.stderr)
        client.cancel_experiment(experiment_id)
        for _ in client.watch_experiment(experiment_id):
            pass
        raise
    return experiment


def run_experiment(args: argparse.Namespace) -> int:
    spec = load_experiment_file(_readable_file(args.file))
    if args.experiment_id:
        spec.experiment_id = args.experiment_id
    address = args.controller or os.environ.get("MECBENCH_CONTROLLER")
    if address:
        with Client(address) as client:
            experiment = client.start_experiment(spec)
            if not args.wait:
                if args.json:
                    _print_json(experiment)
                else:
                    print(f"experiment {experiment.experiment_id} started: {experiment.points_total} points")
                return EXIT_OK
            return _experiment_outcome(client, _follow(client, experiment.experiment_id, args.json), args.json)
    # No controller named: run this one experiment on an embedded controller (local processes).
    with embedded_controller(args.data_dir, "mecbench-run-") as (port, data_dir), Client(f"127.0.0.1:{port}") as client:
        client.init_storage()
        if not args.json:
            print(f"embedded controller on 127.0.0.1:{port}, results in {data_dir}")
        experiment = client.start_experiment(spec)
        return _experiment_outcome(client, _follow(client, experiment.experiment_id, args.json), args.json)


class UsageError(Exception):
    """Bad input found on this side, before any call."""


def _print_rpc_error(exc: grpc.RpcError) -> None:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    status = rpc_status.from_call(exc)
    for detail in status.details if status else []:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            for violation in bad_request.field_violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)


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

    def client_command(parent: Any, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        command = parent.add_parser(name, help=help_text)
        command.add_argument(
            "--controller",
            default="",
            help=f"controller HOST:PORT (default $MECBENCH_CONTROLLER or {DEFAULT_CONTROLLER})",
        )
        command.add_argument("--json", action="store_true", help="print JSON instead of text")
        command.set_defaults(handler=handler)
        return command

    run = client_command(commands, "run", "run an experiment file", run_experiment)
    run.add_argument("file", help="experiment spec (YAML or JSON)")
    run.add_argument(
        "--wait", action="store_true", help="watch to the end; exit 1 if a run failed or a result is INVALID"
    )
    run.add_argument("--experiment-id", default="", help="override the spec's experiment_id")
    run.add_argument(
        "--data-dir", default="", help="with no controller named: where the embedded controller keeps results"
    )
    run.epilog = (
        "With no --controller and no $MECBENCH_CONTROLLER, an embedded controller runs it and --wait is implied."
    )

    storage = commands.add_parser("storage", help="the results and blob buckets").add_subparsers(
        dest="verb", required=True
    )
    client_command(storage, "init", "create or check the buckets", storage_init)

    blob = commands.add_parser("blob", help="configs and files in the blob bucket").add_subparsers(
        dest="verb", required=True
    )
    upload = client_command(blob, "upload", "upload a file through the controller", blob_upload)
    upload.add_argument("file")
    upload.add_argument("--key", default="", help="object key (default: the file's name)")
    upload.add_argument("--content-type", default="", help="default: from the key's extension")
    upload.add_argument("--overwrite", action="store_true", help="replace an existing blob")
    listing = client_command(blob, "list", "list blobs", blob_list)
    listing.add_argument("--prefix", default="")

    dataset = commands.add_parser("dataset", help="datasets in the blob bucket").add_subparsers(
        dest="verb", required=True
    )
    dataset_up = client_command(dataset, "upload", "upload a dataset; prints the DatasetSpec to use", dataset_upload)
    dataset_up.add_argument("file", help="a tar archive, a .npy array or one file")
    dataset_up.add_argument("--name", default="", help="stored as datasets/NAME (default: the file's name)")
    dataset_up.add_argument("--overwrite", action="store_true")
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
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except (UsageError, MecbenchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except grpc.RpcError as exc:
        _print_rpc_error(exc)
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EXIT_UNAVAILABLE
        return EXIT_RUN_FAILED if exc.code() == grpc.StatusCode.INTERNAL else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
