"""What every `mecbench` command shares: exit codes, output (tables, key-value blocks, JSON),
the controller's address and client, and the mapping of errors to exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from mecbench.client import DEFAULT_CONTROLLER, Client
from mecbench.client_errors import ClientError, from_rpc_error
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2

EXIT_OK = 0
# A run failed or was cancelled, a result is INVALID, or the server failed.
EXIT_FAILED = 1
# Bad usage or input: nothing was started; every field violation is printed.
EXIT_USAGE = 2
# The controller or node agent could not be reached.
EXIT_UNAVAILABLE = 3
# No run, experiment, result or file by that name.
EXIT_NOT_FOUND = 4
# Ctrl-C (128 + SIGINT, as a shell reports it); a running experiment is cancelled first.
EXIT_INTERRUPTED = 130

# Kept for callers of the single-module CLI.
EXIT_RUN_FAILED = EXIT_FAILED

EXIT_CODES_HELP = """exit codes:
  0    success
  1    a run failed or was cancelled, a result is INVALID, or the server failed
  2    bad usage or input (every field violation is printed); nothing was started
  3    the controller or node agent could not be reached
  4    no run, experiment, result or file by that name
  130  interrupted (Ctrl-C); `run` cancels its experiment first"""

# Codes that mean "change what you asked for": the same request would fail again.
_USAGE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
_UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class UsageError(Exception):
    """Bad input found on this side, before any call; `violations` (flag to reason) when there
    are several, so all of them are printed at once."""

    def __init__(self, message: str, violations: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.violations = dict(violations or {})


class NotFound(Exception):
    """Something named on the command line does not exist (exit 4) and no server said so."""


# --- output ------------------------------------------------------------------------------------
# Output goes through these two rather than print(): one place decides buffering, and the
# project's lint forbids stray prints in library code.


def out(text: str = "", *, flush: bool = False) -> None:
    sys.stdout.write(text + "\n")
    if flush:
        sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def to_jsonable(value: Any) -> Any:
    """Messages as MessageToDict (proto field names, as in the .proto files and YAML specs);
    lists and dicts of them recursively; anything else as is."""
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def print_json(value: Any, *, indent: int | None = 2) -> None:
    out(json.dumps(to_jsonable(value), indent=indent), flush=True)


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, trailing blanks trimmed."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def render_fields(fields: Iterable[tuple[str, str]]) -> str:
    """`key   value` lines, keys padded to the longest; empty values are left out."""
    kept = [(key, value) for key, value in fields if value]
    width = max((len(key) for key, _ in kept), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in kept)


def ms(d: Duration) -> str:
    return f"{durations.to_ns(d) / 1e6:.3f}"


def seconds_text(d: Duration) -> str:
    return f"{durations.to_seconds(d):.1f}s"


def when(ts: Timestamp) -> str:
    """Local time to the second, or "" when unset."""
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.ToNanoseconds() / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def state_name(state: int) -> str:
    return common_pb2.RunState.Name(state).removeprefix("RUN_STATE_")  # type: ignore[arg-type]


def scenario_name(scenario: int) -> str:
    names: dict[int, str] = {
        common_pb2.SCENARIO_SINGLE_STREAM: "SingleStream",
        common_pb2.SCENARIO_MULTI_STREAM: "MultiStream",
        common_pb2.SCENARIO_SERVER: "Server",
        common_pb2.SCENARIO_OFFLINE: "Offline",
    }
    return names.get(scenario, "-")


def enum_value(enum: Any, prefix: str, text: str, flag: str) -> int:
    """An enum value from what a user types: `running`, `RUN_STATE_RUNNING`, `single-stream`,
    `SingleStream` all work; anything else is a usage error listing the choices."""
    def key(name: str) -> str:
        return "".join(ch for ch in name.upper().removeprefix(prefix) if ch.isalnum())

    wanted = key(text)
    for name, number in enum.items():
        if number and key(name) == wanted:
            return int(number)
    choices = ", ".join(name.removeprefix(prefix).lower() for name, number in enum.items() if number)
    raise UsageError(f"{flag}: {text!r} is not one of {choices}")


def network_text(profile: common_pb2.NetworkProfile) -> str:
    """`lte (25 Mbit/s, delay 20 ms, jitter 5 ms, loss 0.1%)`, or `unshaped`."""
    if not profile.name and not profile.HasField("netem"):
        return "unshaped"
    parts = netem_parts(profile.netem)
    name = profile.name or "custom"
    return f"{name} ({', '.join(parts)})" if parts else name


def netem_parts(netem: common_pb2.NetemConfig) -> list[str]:
    parts = []
    if netem.rate_bps:
        parts.append(f"{netem.rate_bps / 1e6:g} Mbit/s")
    if netem.HasField("delay") and durations.to_ns(netem.delay):
        parts.append(f"delay {durations.to_ns(netem.delay) / 1e6:g} ms")
    if netem.HasField("jitter") and durations.to_ns(netem.jitter):
        parts.append(f"jitter {durations.to_ns(netem.jitter) / 1e6:g} ms")
    for label, value in (
        ("loss", netem.loss_percent),
        ("reorder", netem.reorder_percent),
        ("duplicate", netem.duplicate_percent),
        ("corrupt", netem.corrupt_percent),
    ):
        if value:
            parts.append(f"{label} {value:g}%")
    return parts


def format_results_table(rows: Sequence[tuple[str, controller_pb2.Run]]) -> str:
    """A plain-text table of every repeat's aggregate result (over all clients) of each run; token
    latencies and accuracy get columns when any result has them."""
    results = [repeat.aggregate for _, run in rows for repeat in run.results]
    tokens = any(result.HasField("ttft") for result in results)
    accuracy = any(result.accuracy for result in results)
    header = ["test", "state", "valid", "samples/s", "p50 ms", "p90 ms", "p99 ms", "queries"]
    header += ["TTFT p50 ms", "TPOT p50 ms", "tokens/s"] if tokens else []
    header += ["accuracy"] if accuracy else []
    lines: list[list[str]] = []
    reasons: list[str] = []
    for label, run in rows:
        state = state_name(run.state)
        # The pooled result of all clients, then each client group's own (indented).
        entries: list[tuple[str, common_pb2.TestResult]] = []
        for repeat in run.results:
            entries.append((label if len(run.results) == 1 else f"{label} #{repeat.repeat}", repeat.aggregate))
            entries += [(f"  {group.name} ({group.network_profile})", group.result) for group in repeat.groups]
        for test, result in entries:
            line = [
                test,
                state,
                "VALID" if result.valid else "INVALID",
                f"{result.samples_per_second:.1f}",
                ms(result.latency.p50),
                ms(result.latency.p90),
                ms(result.latency.p99),
                str(result.query_count),
            ]
            if tokens:
                line += [ms(result.ttft.p50), ms(result.tpot.p50), f"{result.tokens_per_second:.1f}"]
            if accuracy:
                metric = result.accuracy_scorer
                line.append(f"{metric} {result.accuracy[metric]:.4f}" if metric in result.accuracy else "-")
            lines.append(line)
            if not result.valid:
                why = "; ".join(result.invalid_reasons) or "LoadGen gave no reason"
                reasons.append(f"{test.strip()}: INVALID: {why}")
        if not run.results:
            lines.append([label, state] + ["-"] * (len(header) - 2))
    # Every INVALID verdict with LoadGen's own reason beside it.
    return "\n".join([render_table(header, lines), *reasons])


# --- where the controller is ------------------------------------------------------------------


def state_dir() -> Path:
    """Where `mecbench up` records the stack it started."""
    explicit = os.environ.get("MECBENCH_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mecbench"


def state_file() -> Path:
    return state_dir() / "stack.json"


def pid_alive(pid: int) -> bool:
    """True while `pid` runs. A zombie counts as gone: once `up` has exited the controller is
    not our child, and in a container whose init never reaps it the pid would look alive forever."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def read_stack_state() -> dict[str, Any] | None:
    """The stack `mecbench up` recorded, if its controller still runs."""
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not pid_alive(int(state.get("pid", 0))):
        return None
    return state


def named_controller(args: argparse.Namespace) -> str:
    """The controller the user named: --controller, then $MECBENCH_CONTROLLER, then the stack
    `mecbench up` started; "" when none."""
    if getattr(args, "controller", ""):
        return str(args.controller)
    if os.environ.get("MECBENCH_CONTROLLER"):
        return os.environ["MECBENCH_CONTROLLER"]
    state = read_stack_state()
    return str(state["address"]) if state else ""


def controller_address(args: argparse.Namespace) -> str:
    return named_controller(args) or DEFAULT_CONTROLLER


def open_client(args: argparse.Namespace, address: str | None = None) -> Client:
    files: dict[str, str | None] = {}
    for option in ("ca_file", "cert_file", "key_file"):
        value = getattr(args, option, "") or None
        if value and not Path(value).is_file():
            raise UsageError(f"--{option.replace('_', '-')} {value}: no such file")
        files[option] = value
    if bool(files["cert_file"]) != bool(files["key_file"]):
        raise UsageError("--cert-file and --key-file go together (a client certificate and its key)")
    try:
        return _client(args, address, files)
    except ValueError as exc:  # a token that would travel in clear, say
        raise UsageError(str(exc)) from None


def _client(args: argparse.Namespace, address: str | None, files: dict[str, str | None]) -> Client:
    return Client(
        address or controller_address(args),
        tls=bool(getattr(args, "tls", False) or any(files.values())),
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        token=getattr(args, "token", "") or None,
        insecure_token=bool(getattr(args, "insecure_token", False)),
    )


def env_client(address: str, *, retries: int = 3, timeout_s: float | None = 60.0) -> Client:
    """A client of a controller this command started or embeds: TLS, client certificate and
    token from the environment the controller read too (MECBENCH_TLS_*, $MECBENCH_TOKEN)."""
    ca_file = os.environ.get("MECBENCH_TLS_CA") or None
    cert_file = os.environ.get("MECBENCH_TLS_CERT") or None
    return Client(
        address, tls=bool(ca_file or cert_file), ca_file=ca_file, cert_file=cert_file,
        key_file=os.environ.get("MECBENCH_TLS_KEY") or None, token=os.environ.get("MECBENCH_TOKEN") or None,
        retries=retries, timeout_s=timeout_s,
    )


def add_client_options(command: argparse.ArgumentParser) -> None:
    connection = command.add_argument_group("controller connection")
    connection.add_argument(
        "--controller",
        default="",
        metavar="HOST:PORT",
        help=f"default: $MECBENCH_CONTROLLER, else the stack `mecbench up` started, else {DEFAULT_CONTROLLER}",
    )
    connection.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca-file)")
    connection.add_argument("--ca-file", default=os.environ.get("MECBENCH_TLS_CA", ""), metavar="PEM",
                            help="CA certificate to verify the controller; implies --tls (default: $MECBENCH_TLS_CA)")
    # --cert-file/--key-file, like --ca-file (`blob upload --key` is an object key).
    connection.add_argument("--cert-file", default=os.environ.get("MECBENCH_TLS_CERT", ""), metavar="PEM",
                            help="client certificate, for a controller that asks for mutual TLS; implies --tls"
                            " (default: $MECBENCH_TLS_CERT)")
    connection.add_argument("--key-file", default=os.environ.get("MECBENCH_TLS_KEY", ""), metavar="PEM",
                            help="the client certificate's private key (default: $MECBENCH_TLS_KEY)")
    connection.add_argument(
        "--token", default=os.environ.get("MECBENCH_TOKEN", ""), help="bearer token (default: $MECBENCH_TOKEN)"
    )
    connection.add_argument(
        "--insecure-token", action="store_true",
        help="send the token over a plaintext connection to a host other than this one (it can be read on the way)",
    )
    command.add_argument("--json", action="store_true", help="print JSON instead of text")


# --- errors ------------------------------------------------------------------------------------


def exit_code_for(code: grpc.StatusCode) -> int:
    if code in _USAGE_CODES:
        return EXIT_USAGE
    if code in _UNAVAILABLE_CODES:
        return EXIT_UNAVAILABLE
    if code == grpc.StatusCode.NOT_FOUND:
        return EXIT_NOT_FOUND
    return EXIT_FAILED


def report_client_error(error: ClientError | grpc.RpcError) -> int:
    """Print the error and every field violation on stderr; the exit code it means."""
    if not isinstance(error, ClientError):
        # A direct stub call (a node agent): the same typed view as the SDK's.
        error = from_rpc_error(error, "")
    if error.field_violations:
        # The details are these violations joined on one line: each on its own reads better.
        count = len(error.field_violations)
        err(f"error: {error.code.name}: {count} bad field{'s' if count > 1 else ''}:")
    else:
        err(f"error: {error.code.name}: {error.details}")
    for field, reason in error.field_violations.items():
        err(f"  {field}: {reason}")
    if error.code == grpc.StatusCode.UNAVAILABLE and error.method:
        # An SDK call (not a node agent's): the controller is the thing to start or name.
        err("is the controller running? `mecbench up` starts one; --controller or $MECBENCH_CONTROLLER names one")
    return exit_code_for(error.code)


def report_usage_error(error: UsageError) -> int:
    err(f"error: {error}")
    for field, reason in error.violations.items():
        err(f"  {field}: {reason}")
    return EXIT_USAGE
