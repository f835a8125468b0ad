"""The `mecbench` command.

    mecbench up | down                       the local stack in the background
    mecbench quickstart                      two short tests on a throw-away stack
    mecbench run FILE [--wait]               an experiment file, with live progress
    mecbench experiments list|show|watch|cancel
    mecbench runs list|show|watch|cancel     runs on the controller
    mecbench results list|show|compare|export
    mecbench plot|report EXPERIMENT --out DIR
    mecbench nodes                           node agents: GPUs, qdisc support
    mecbench shape apply|clear|list --node   shaping on a node agent, by hand
    mecbench storage init | blob ... | dataset upload|make-prompts
    mecbench token create --name N --role read|run   a bearer token and its tokens-file entry
    mecbench controller|node-agent|loadgen-agent|sut-agent --listen HOST:PORT

Human tables by default, `--json` for scripts; the exit codes are in EXIT_CODES_HELP (and
`mecbench --help`, docs/cli.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import grpc

from mecbench.cli.common import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    NotFound,
    UsageError,
    add_client_options,
    err,
    format_results_table,
    report_client_error,
    report_usage_error,
)
from mecbench.cli.nodes import DIRECTIONS, nodes, shape_apply, shape_clear, shape_list
from mecbench.cli.results import (
    add_result_filters,
    plot,
    report,
    results_compare,
    results_export,
    results_list,
    results_show,
)
from mecbench.cli.runs import (
    experiments_cancel,
    experiments_list,
    experiments_show,
    experiments_watch,
    run_experiment,
    runs_cancel,
    runs_list,
    runs_show,
    runs_watch,
)
from mecbench.cli.stack import SERVICES, down, embedded_controller, quickstart, quickstart_specs, up
from mecbench.cli.storage import blob_list, blob_upload, dataset_upload, storage_init
from mecbench.cli.tokens import ROLES, token_create
from mecbench.cli.workloads import add_make_prompts_arguments, dataset_make_prompts
from mecbench.client_errors import ClientError, from_local_error
from mecbench.core.errors import MecbenchError
from mecbench.core.logging import configure_logging
from mecbench.core.settings import SettingsError
from mecbench.profiles import PROFILES

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "embedded_controller",
    "format_results_table",
    "main",
    "quickstart_specs",
]

Handler = Callable[[argparse.Namespace], int]


def _group(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
           ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command with verbs of its own (`runs list`)."""
    parser = commands.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.add_subparsers(dest="verb", required=True, metavar="VERB")


def _command(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str,
             handler: Handler, *, client: bool = True) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=help_text, description=help_text, epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if client:
        add_client_options(parser)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mecbench",
        description="Benchmark AI inference at the network edge: MLPerf LoadGen tests of inference servers"
        " behind emulated networks.",
        epilog=EXIT_CODES_HELP
        + "\n\nThe controller: --controller HOST:PORT, else $MECBENCH_CONTROLLER, else the stack"
        " `mecbench up` started,\nelse 127.0.0.1:50051. `mecbench COMMAND --help` for each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default=os.environ.get("MECBENCH_LOG_LEVEL", "info"),
                        help="of services (commands log warnings only unless $MECBENCH_LOG_LEVEL says otherwise)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- the stack ---
    stack_up = _command(commands, "up", "start a controller in the background and print its address", up,
                        client=False)
    stack_up.add_argument("--data-dir", default="", help="results, registry and controller.log"
                          " (default: $XDG_DATA_HOME/mecbench or ~/.local/share/mecbench)")
    stack_up.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                          help="where the controller listens (port 0: any free port)")
    stack_up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to serve")
    stack_up.add_argument("--no-agents", action="store_true", help="do not ask for the node agent's address")
    stack_up.add_argument("--json", action="store_true", help="print the saved state as JSON")
    stack_down = _command(commands, "down", "stop the controller `mecbench up` started (and its agents)", down,
                          client=False)
    stack_down.add_argument("--timeout", type=float, default=15.0, help="seconds after SIGTERM before SIGKILL")
    stack_down.add_argument("--json", action="store_true")

    quick = _command(commands, "quickstart", "start a throw-away local stack, run two short tests, print the results",
                     quickstart, client=False)
    quick.add_argument("--data-dir", default="", help="where results go (default: a new temporary folder)")
    quick.add_argument("--experiment", default="quickstart", help="experiment id")
    quick.add_argument("--json", action="store_true", help="also print the runs as JSON")

    # --- experiments and runs ---
    run = _command(commands, "run", "run an experiment file (YAML or JSON)", run_experiment)
    run.add_argument("file", help="experiment spec")
    run.add_argument("--wait", action="store_true",
                     help="follow it to the end with live progress; exit 1 if a run failed or a result is INVALID")
    run.add_argument("--experiment-id", default="", help="override the spec's experiment_id")
    run.add_argument("--data-dir", default="", help="with no controller named or up: where the embedded"
                     " controller keeps results")
    run.epilog = (
        "With no controller named (--controller, $MECBENCH_CONTROLLER) and none up, an embedded controller"
        " runs it and --wait is implied. Ctrl-C cancels the experiment and exits 130.\n\n" + EXIT_CODES_HELP
    )

    experiments = _group(commands, "experiments", "experiments on the controller")
    _command(experiments, "list", "every experiment the controller knows", experiments_list)
    _command(experiments, "show", "an experiment's state and its points' results", experiments_show).add_argument(
        "experiment_id"
    )
    _command(
        experiments, "watch", "live progress to the end; exit 1 if a run failed or a result is INVALID"
        " (Ctrl-C stops watching, the experiment goes on)", experiments_watch,
    ).add_argument("experiment_id")
    stop = _command(experiments, "cancel", "cancel an experiment and wait until it has stopped", experiments_cancel)
    stop.add_argument("experiment_id")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")

    runs = _group(commands, "runs", "runs on the controller")
    runs_ls = _command(runs, "list", "list runs, newest first", runs_list)
    runs_ls.add_argument("--experiment", default="", metavar="ID")
    runs_ls.add_argument("--state", default="", help="pending, deploying, running, uploading, succeeded, failed,"
                         " cancelled")
    runs_ls.add_argument("--limit", type=int, default=50)
    _command(runs, "show", "a run's spec, state, error and every repeat's result", runs_show).add_argument("run_id")
    _command(runs, "watch", "print a run's events until it ends; exit 1 if it failed or a result is INVALID",
             runs_watch).add_argument("run_id")
    cancel = _command(runs, "cancel", "cancel a run and wait until it has stopped", runs_cancel)
    cancel.add_argument("run_id")
    cancel.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")

    # --- results ---
    results = _group(commands, "results", "stored results")
    listing = _command(results, "list", "one row per stored repeat", results_list)
    add_result_filters(listing)
    listing.add_argument("--wide", action="store_true", help="every column")
    show = _command(results, "show", "one repeat's result, or one of its stored files", results_show)
    show.add_argument("run_id")
    show.add_argument("--repeat", type=int, default=0, help="from 1 (default: the first)")
    show.add_argument("--file", default="", metavar="NAME",
                      help="print this stored file as is, e.g. mlperf_log_summary.txt")
    compare = _command(results, "compare", "two runs or experiments side by side, points matched by selector",
                       results_compare)
    compare.add_argument("a", metavar="A", help="a run id or an experiment id")
    compare.add_argument("b", metavar="B", help="a run id or an experiment id")
    export = _command(results, "export", "results as CSV, every column", results_export)
    add_result_filters(export)
    export.add_argument("--csv", default="-", metavar="FILE", help="where to write (default: stdout)")

    plots = _command(commands, "plot", "draw an experiment's figures (PNG)", plot)
    plots.add_argument("experiment_id")
    plots.add_argument("--out", required=True, metavar="DIR")
    page = _command(commands, "report", "an experiment's figures and report.html", report)
    page.add_argument("experiment_id")
    page.add_argument("--out", required=True, metavar="DIR")

    # --- nodes and shaping ---
    node_list = _command(commands, "nodes", "node agents: address, CPUs, memory, GPUs, qdisc support", nodes)
    node_list.add_argument("--interfaces", action="store_true", help="also each node's network interfaces")
    shape = _group(commands, "shape", "shaping on a node agent, by hand (for debugging)")
    shape_set = _command(shape, "apply", "apply a network profile to an interface", shape_apply, client=False)
    _node_options(shape_set, target_required=True)
    figures = shape_set.add_argument_group("what to apply (a profile, flags over it, or flags alone)")
    shipped = ", ".join(name for name, profile in PROFILES.items() if profile.HasField("netem"))
    figures.add_argument("--profile", default="", help=f"a shipped profile: {shipped}")
    figures.add_argument("--rate", help="e.g. 10mbit")
    figures.add_argument("--delay", help="one way, e.g. 20ms")
    figures.add_argument("--jitter", help="e.g. 5ms (normal distribution)")
    figures.add_argument("--loss", help="percent, e.g. 0.5")
    figures.add_argument("--reorder", help="percent (needs --delay)")
    figures.add_argument("--duplicate", help="percent")
    figures.add_argument("--corrupt", help="percent")
    shape_set.add_argument("--direction", choices=list(DIRECTIONS), default="",
                           help="default: the profile's, else egress")
    shape_set.add_argument("--lease-s", type=float, default=0.0,
                           help="removed this long after unless renewed (default: the agent's, 60 s)")
    shape_set.add_argument("--owner", default="mecbench-cli", help="recorded with the lease")
    shape_set.add_argument("--replace", action="store_true", help="replace MECBench shaping already there")
    shape_ls = _command(shape, "list", "shaping installed, as the kernel reads it back", shape_list, client=False)
    _node_options(shape_ls, target_required=False, target=False)
    shape_ls.add_argument("--all", action="store_true", help="also qdiscs MECBench did not install")
    shape_rm = _command(shape, "clear", "remove shaping (idempotent)", shape_clear, client=False)
    _node_options(shape_rm, target_required=False)
    which = shape_rm.add_mutually_exclusive_group()
    which.add_argument("--shaping-id", default="")
    which.add_argument("--lease-id", default="")
    which.add_argument("--owner", default="", help="everything this owner holds")

    # --- storage ---
    storage = _group(commands, "storage", "the results and blob buckets")
    _command(storage, "init", "create or check the buckets", storage_init)
    blob = _group(commands, "blob", "configs and files in the blob bucket")
    upload = _command(blob, "upload", "upload a file through the controller", blob_upload)
    upload.add_argument("file")
    upload.add_argument("--key", default="", help="object key (default: the file's name)")
    upload.add_argument("--content-type", default="", help="default: from the key's extension")
    upload.add_argument("--overwrite", action="store_true", help="replace an existing blob")
    blobs = _command(blob, "list", "list blobs", blob_list)
    blobs.add_argument("--prefix", default="")
    dataset = _group(commands, "dataset", "datasets in the blob bucket")
    dataset_up = _command(dataset, "upload", "upload a dataset; prints the DatasetSpec to use", dataset_upload)
    dataset_up.add_argument("file", help="a tar archive, a .npy array or one file")
    dataset_up.add_argument("--name", default="", help="stored as datasets/NAME (default: the file's name)")
    dataset_up.add_argument("--overwrite", action="store_true")
    make_prompts = _command(dataset, "make-prompts", "an LLM workload: synthetic prompts with token-length "
                            "distributions, or prompts from JSONL/ShareGPT files", dataset_make_prompts, client=False)
    add_make_prompts_arguments(make_prompts)

    # --- tokens ---
    token = _group(commands, "token", "bearer tokens for the controller API (docs/security.md)")
    create = _command(token, "create", "make a token; prints it and its entry for the tokens file", token_create,
                      client=False)
    create.add_argument("--name", required=True, help="who the token is for (shown in the controller's logs)")
    create.add_argument("--role", required=True, choices=ROLES, help="read: Get/List/Watch only; run: everything")
    create.add_argument("--json", action="store_true", help="print JSON instead of text")

    # --- the services themselves ---
    for name in SERVICES:
        service = commands.add_parser(name, help=f"run the {name} gRPC server")
        service.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind (port 0: any free port)")
        service.add_argument("--netns", default="", help="run inside this named network namespace (root)")
    return parser


def _node_options(command: argparse.ArgumentParser, *, target_required: bool, target: bool = True) -> None:
    command.add_argument("--node", default="", metavar="HOST:PORT",
                         help="the node agent (default: $MECBENCH_NODE_AGENT)")
    command.add_argument("--json", action="store_true", help="print JSON instead of text")
    if not target:
        return
    command.add_argument("--interface", required=target_required, default="", metavar="IF")
    netns = command.add_mutually_exclusive_group()
    netns.add_argument("--netns", default="", metavar="NAME", help="a named namespace (/var/run/netns/NAME)")
    netns.add_argument("--netns-path", default="", metavar="PATH", help="e.g. /proc/PID/ns/net")


def _check_clear_target(args: argparse.Namespace) -> None:
    if args.command == "shape" and args.verb == "clear" and not (
        args.shaping_id or args.lease_id or args.owner or args.interface
    ):
        raise UsageError("shape clear: give --interface (with --netns), --shaping-id, --lease-id or --owner")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVICES:
        if args.netns:
            # First, before any thread exists: a network namespace is per thread, and every
            # thread started later (gRPC's included) inherits it from this one.
            from mecbench.core.netns import enter_netns

            enter_netns(args.netns)
        configure_logging(args.log_level)
        try:
            SERVICES[args.command](args.listen)
        except (SettingsError, MecbenchError) as exc:
            # A bad environment (a setting's value, TLS files, a tokens file, a topology that
            # cannot be made): one line, not a traceback.
            err(f"error: {args.command}: {exc}")
            return EXIT_USAGE
        return EXIT_OK
    # Interactive commands keep the services' logs quiet unless asked.
    configure_logging(os.environ.get("MECBENCH_LOG_LEVEL", "warning"))
    handler: Handler = args.handler
    try:
        _check_clear_target(args)
        return handler(args)
    except UsageError as exc:
        return report_usage_error(exc)
    except NotFound as exc:
        err(f"error: {exc}")
        return EXIT_NOT_FOUND
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ClientError, grpc.RpcError) as exc:
        return report_client_error(exc)
    except MecbenchError as exc:
        # Found on this side (a spec file that does not parse): reported as the server would.
        return report_client_error(from_local_error(exc, ""))
    except BrokenPipeError:
        # `mecbench results export | head`: the reader left, nothing is wrong. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
