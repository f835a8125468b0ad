"""The Python SDK: a typed client over the Controller API.

    from mecbench import Client

    with Client("127.0.0.1:50051") as client:
        experiment = client.start_experiment("examples/quick-sweep.yaml")
        for experiment in client.watch_experiment(experiment.experiment_id):
            print(experiment.points_done, "of", experiment.points_total)
        print(client.results_table(experiment_id=experiment.experiment_id).to_text())

Methods return the API's protobuf messages (typed by their mypy-protobuf stubs) and raise the
typed errors of `mecbench.client_errors` (`NotFoundError`, `InvalidArgumentError` with its
`field_violations`, ...), never a raw `grpc.RpcError`. `mecbench.AsyncClient` offers the same
methods for asyncio. Blobs go through the controller, which holds the store's credentials: users
need none.

Retries: a call that fails with UNAVAILABLE (controller restarting, connection refused) is tried
again up to `retries` more times, waiting `backoff_s`, then twice as long each time (with up to
+50 % jitter so many clients do not return in step). StartRun, StartExperiment, UploadBlob and
DeploySut without a `sut_id` are never retried by the SDK: UNAVAILABLE can also mean the request
arrived and the reply was lost, and a second try would start a second run or experiment (gRPC
itself still re-sends transparently when it knows nothing left this side). DEADLINE_EXCEEDED and
every other code are raised at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar, cast

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from mecbench.client_errors import DeadlineExceededError, error_for, from_local_error, from_rpc_error
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.core.errors import MecbenchError
from mecbench.experiment_file import load_experiment_file, parse_experiment
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2

__all__ = [
    "DEFAULT_CONTROLLER",
    "RESULT_COLUMNS",
    "TERMINAL_STATES",
    "Client",
    "ResultTable",
    "default_address",
    "file_sha256",
    "result_rows",
]

log = logging.getLogger("mecbench.client")

TERMINAL_STATES = frozenset(
    {common_pb2.RUN_STATE_SUCCEEDED, common_pb2.RUN_STATE_FAILED, common_pb2.RUN_STATE_CANCELLED}
)

DEFAULT_CONTROLLER = "127.0.0.1:50051"
# Well under gRPC's message limit, large enough that per-message cost does not matter.
UPLOAD_CHUNK_BYTES = 1024 * 1024
# The longest single wait between retries, however many are allowed.
MAX_BACKOFF_S = 10.0
# RPCs whose lost reply may hide a success: retrying could start a second run or experiment.
NON_IDEMPOTENT = frozenset({"StartRun", "StartExperiment", "UploadBlob"})

R = TypeVar("R", bound=Message)


def is_loopback_address(address: str) -> bool:
    """Whether HOST:PORT (or a unix: target) stays on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_address() -> str:
    """The controller to talk to: `$MECBENCH_CONTROLLER`, else 127.0.0.1:50051."""
    return os.environ.get("MECBENCH_CONTROLLER", DEFAULT_CONTROLLER)


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(UPLOAD_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# --- connection settings shared by Client and AsyncClient -------------------------------------


@dataclass(frozen=True)
class ConnectionSettings:
    """What both clients derive from their constructor arguments (see `Client`)."""

    address: str
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    # Channel options over mecbench.core.channels.CHANNEL_OPTIONS.
    extra_options: list[tuple[str, int | str]]
    retries: int
    backoff_s: float
    timeout_s: float | None

    @classmethod
    def create(
        cls,
        address: str | None,
        *,
        tls: bool,
        ca_file: str | Path | None,
        token: str | None,
        retries: int,
        backoff_s: float,
        timeout_s: float | None,
        credentials: grpc.ChannelCredentials | None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        insecure_token: bool = False,
    ) -> ConnectionSettings:
        """Check the arguments and work out credentials, metadata and channel options."""
        if retries < 0:
            raise ValueError("retries must not be negative")
        if backoff_s < 0:
            raise ValueError("backoff_s must not be negative")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("timeout_s must be positive (or None for no deadline)")
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate and its key)")
        if credentials is not None and cert_file is not None:
            raise ValueError("give credentials or cert_file/key_file, not both")
        secure = credentials is not None or tls or ca_file is not None or cert_file is not None
        metadata: tuple[tuple[str, str], ...] = ()
        if secure:
            if credentials is None:
                root = Path(ca_file).read_bytes() if ca_file is not None else None
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=root,
                    private_key=Path(key_file).read_bytes() if key_file is not None else None,
                    certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None,
                )
            if token:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(token)
                )
        elif token:
            # gRPC refuses call credentials on a plaintext channel (they would travel in clear);
            # a local development controller has no TLS, so the header is sent as metadata, but
            # only to this machine unless the caller says the network may read it.
            target = address or default_address()
            if not insecure_token and not is_loopback_address(target):
                raise ValueError(
                    f"refusing to send a bearer token in clear to {target}: connect with TLS (tls/ca_file, "
                    "--tls/--ca-file), or allow it with insecure_token=True (--insecure-token)"
                )
            metadata = (("authorization", f"Bearer {token}"),)
        # gRPC's own reconnect backoff starts at 1 s and every call fails at once while it
        # waits, so short SDK retries could all be spent before a controller that came back is
        # even dialled: start the channel's backoff at the SDK's.
        options: list[tuple[str, int | str]] = [
            ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
        ]
        return cls(address or default_address(), credentials, metadata, options, retries, backoff_s, timeout_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0-based): backoff_s x 2^attempt, capped at
        MAX_BACKOFF_S, plus up to 50 % jitter; never less than the plain schedule."""
        base = min(self.backoff_s * 2.0**attempt, MAX_BACKOFF_S)
        return base * (1.0 + random.random() * 0.5)

    def may_retry(self, error: grpc.RpcError, attempt: int, retry: bool) -> bool:
        """Whether a call that may be retried (`retry`) and failed with `error` on try
        `attempt` (0-based) gets another: only UNAVAILABLE, only while retries remain."""
        return retry and attempt < self.retries and _code_of(error) == grpc.StatusCode.UNAVAILABLE


def _code_of(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _out_of_time(method: str, timeout: float | None) -> DeadlineExceededError:
    return DeadlineExceededError(f"not finished within {timeout} s", method=method)


def _left(deadline: float | None, method: str, timeout: float | None) -> float | None:
    """Seconds left before `deadline` (None: no deadline); DeadlineExceededError when none."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _out_of_time(method, timeout)
    return left


def _too_late(deadline: float | None, delay: float) -> bool:
    return deadline is not None and time.monotonic() + delay >= deadline


# --- request builders shared by Client and AsyncClient ----------------------------------------


def experiment_spec(
    spec: controller_pb2.ExperimentSpec | Mapping[str, Any] | str | Path, experiment_id: str = ""
) -> controller_pb2.ExperimentSpec:
    """An ExperimentSpec from a message (copied), a mapping shaped like a spec file, or the path
    of a YAML/JSON spec file; a file that does not parse raises InvalidArgumentError."""
    try:
        if isinstance(spec, controller_pb2.ExperimentSpec):
            message = controller_pb2.ExperimentSpec()
            message.CopyFrom(spec)
        elif isinstance(spec, Mapping):
            # JSON is YAML: one parser, so a dict reads exactly as the same file would.
            message = parse_experiment(json.dumps(dict(spec)), "spec")
        else:
            message = load_experiment_file(Path(spec))
    except MecbenchError as exc:
        raise from_local_error(exc, "StartExperiment") from None
    if experiment_id:
        message.experiment_id = experiment_id
    return message


def list_results_request(
    experiment_id: str,
    selector: str,
    run_id: str,
    network_profile: str,
    sut_backend: str,
    scenario: common_pb2.Scenario.ValueType,
) -> controller_pb2.ListResultsRequest:
    """The ListResults request for the filters both clients take."""
    return controller_pb2.ListResultsRequest(
        experiment_id=experiment_id,
        selector=selector,
        run_id=run_id,
        network_profile=network_profile,
        sut_backend=sut_backend,
        scenario=scenario,
    )


def metrics_request(run_id: str, node: str, since: datetime | Timestamp | None) -> controller_pb2.GetMetricsRequest:
    """The GetMetrics request; both subjects at once is refused here (the oneof would keep only
    the last one set, silently)."""
    if run_id and node:
        raise error_for(
            grpc.StatusCode.INVALID_ARGUMENT,
            "set run_id or node, not both",
            field_violations={"subject": "set run_id or node, not both"},
            method="GetMetrics",
        )
    request = controller_pb2.GetMetricsRequest()
    if run_id:
        request.run_id = run_id
    elif node:
        request.node = node
    if isinstance(since, Timestamp):
        request.since.CopyFrom(since)
    elif since is not None:
        request.since.FromDatetime(since if since.tzinfo else since.replace(tzinfo=UTC))
    return request


def _page_size(limit: int, collected: int) -> int:
    # The server caps a page at 500; 0 asks for its default.
    return min(limit - collected, 500) if limit else 0


# --- results as a plain table ------------------------------------------------------------------

RESULT_COLUMNS = [
    "experiment_id",
    "selector",
    "run_id",
    "repeat",
    "scenario",
    "clients",
    "network_profile",
    # A client group's own row ("" = the pooled row of all the repeat's clients).
    "group",
    "sut_backend",
    # "measurement", or "calibration" for the harness's own floor (selectors calibration-*):
    # short tests LoadGen does not judge, so their `valid` is None rather than false.
    "kind",
    "valid",
    "samples_per_second",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "tpot_p50_ms",
    "tokens_per_second",
    "accuracy_metric",
    "accuracy",
    "created_at",
    "result_uri",
]

CALIBRATION_PREFIX = "calibration-"

SCENARIO_NAMES = {
    common_pb2.SCENARIO_SINGLE_STREAM: "SingleStream",
    common_pb2.SCENARIO_MULTI_STREAM: "MultiStream",
    common_pb2.SCENARIO_SERVER: "Server",
    common_pb2.SCENARIO_OFFLINE: "Offline",
}


@dataclass
class ResultTable:
    """Rows of plain Python values under named columns: what pandas would hold, without pandas.

    `rows` are dicts keyed by `columns`; a value is None where it does not apply (no token
    latencies for an image model, no accuracy for a performance run).
    """

    columns: list[str]
    rows: list[dict[str, object]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, object]]:
        return iter(self.rows)

    def column(self, name: str) -> list[object]:
        """Every row's value in one column."""
        return [row.get(name) for row in self.rows]

    def to_csv(self, path_or_file: str | Path | IO[str] | None = None) -> str:
        """The table as CSV (header first; None as an empty cell, booleans as true/false), also
        written to `path_or_file` when given; returns the text either way."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([_csv_cell(row.get(name)) for name in self.columns])
        text = buffer.getvalue()
        if isinstance(path_or_file, (str, Path)):
            Path(path_or_file).write_text(text, encoding="utf-8", newline="")
        elif path_or_file is not None:
            path_or_file.write(text)
        return text

    def to_text(self, columns: Sequence[str] | None = None) -> str:
        """An aligned plain-text table for a terminal: milliseconds to 3 decimals, rates to 1,
        accuracy to 4, `-` where a value does not apply. `columns` picks and orders columns."""
        chosen = list(columns) if columns is not None else self.columns
        lines = [chosen] + [[_text_cell(name, row.get(name)) for name in chosen] for row in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(chosen))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _text_cell(column: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if column.endswith("_ms"):
            return f"{value:.3f}"
        return f"{value:.4f}" if column == "accuracy" else f"{value:.1f}"
    return str(value)


def _ms(stats: common_pb2.LatencyStats, name: str) -> float:
    return float(durations.to_ns(getattr(stats, name)) / 1e6)


def _iso(stamp: Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).isoformat()


def _with_groups(
    records: Iterable[controller_pb2.ResultRecord],
) -> Iterator[tuple[controller_pb2.ResultRecord, controller_pb2.GroupResult | None]]:
    """Each record (pooled), then each of its client groups."""
    for record in records:
        yield record, None
        for group in record.groups:
            yield record, group


def result_rows(records: Iterable[controller_pb2.ResultRecord]) -> ResultTable:
    """One row per stored repeat (a ResultRecord from `list_results`), with the aggregate over
    all clients of that repeat, then one per client group of a run with groups (`group` names
    it); columns as in RESULT_COLUMNS."""
    table = ResultTable(list(RESULT_COLUMNS))
    for record, group in _with_groups(records):
        result = group.result if group is not None else record.result
        scenario = record.scenario or result.scenario
        latency = result.latency if result.HasField("latency") else None
        tokens = result.HasField("ttft")
        calibration = record.selector.startswith(CALIBRATION_PREFIX)
        metric = result.accuracy_scorer
        table.rows.append(
            {
                "experiment_id": record.experiment_id,
                "selector": record.selector,
                "run_id": record.run_id,
                "repeat": record.repeat,
                "scenario": SCENARIO_NAMES.get(scenario, ""),
                "clients": len(group.clients) if group is not None else record.clients,
                "network_profile": group.network_profile if group is not None else record.network_profile,
                "group": group.name if group is not None else "",
                "sut_backend": record.sut_backend,
                "kind": "calibration" if calibration else "measurement",
                "valid": None if calibration else result.valid,
                "samples_per_second": result.samples_per_second,
                "latency_p50_ms": _ms(latency, "p50") if latency else None,
                "latency_p90_ms": _ms(latency, "p90") if latency else None,
                "latency_p99_ms": _ms(latency, "p99") if latency else None,
                "ttft_p50_ms": _ms(result.ttft, "p50") if tokens else None,
                "tpot_p50_ms": _ms(result.tpot, "p50") if tokens and result.HasField("tpot") else None,
                "tokens_per_second": result.tokens_per_second if tokens else None,
                "accuracy_metric": metric if metric in result.accuracy else None,
                "accuracy": result.accuracy.get(metric),
                "created_at": _iso(record.created_at) if record.HasField("created_at") else None,
                "result_uri": record.result_uri,
            }
        )
    return table


# --- the synchronous client --------------------------------------------------------------------


class Client:
    """A connection to a MECBench controller.

    Args:
        address: HOST:PORT of the controller; default `$MECBENCH_CONTROLLER` or 127.0.0.1:50051.
        tls: connect over TLS, checking the server against the system's roots (or `ca_file`).
        ca_file: PEM file of the CA (or self-signed certificate) to trust; implies TLS.
        token: sent as `authorization: Bearer <token>` on every call (as call credentials over
            TLS; as plain metadata on a plaintext channel, for local development: to a loopback
            address only, unless `insecure_token`).
        insecure_token: allow a token over a plaintext channel to another host, where the
            network between is trusted (ValueError otherwise).
        retries: how many more times a call that failed with UNAVAILABLE is tried (see the
            module docstring for which calls); 0 disables retries.
        backoff_s: the first wait between tries; each further wait doubles, with jitter.
        timeout_s: deadline of each unary call (None: none). Watches and uploads have none
            unless given one, since runs and datasets can take hours.
        cert_file, key_file: PEM client certificate and its key, for a controller that asks for
            mutual TLS; imply TLS.
        credentials: ready-made channel credentials; imply TLS and take the place of
            `tls`/`ca_file`/`cert_file`; `token` is still added.

    The connection is plaintext unless one of `tls`, `ca_file`, `cert_file` or `credentials`
    says otherwise: the MECBENCH_TLS_* environment the services read does not apply here.

    Every method raises a `mecbench.client_errors.ClientError` subclass on failure. A Client is
    safe to share between threads; close it (or use `with`) to release the channel.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        tls: bool = False,
        ca_file: str | Path | None = None,
        token: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
        timeout_s: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        insecure_token: bool = False,
    ) -> None:
        self.settings = ConnectionSettings.create(
            address, tls=tls, ca_file=ca_file, token=token, retries=retries, backoff_s=backoff_s,
            timeout_s=timeout_s, credentials=credentials, cert_file=cert_file, key_file=key_file,
            insecure_token=insecure_token,
        )
        self.address = self.settings.address
        # plaintext: the arguments decide, not the services' TLS environment (see above).
        self._channel = open_channel(
            self.address, self.settings.credentials, self.settings.extra_options, plaintext=True
        )
        self.stub = controller_pb2_grpc.ControllerStub(self._channel)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return self.settings.metadata or None

    def _unary(self, method: str, request: Message, response_type: type[R], *, retry: bool = True) -> R:
        """Call one unary RPC, retrying UNAVAILABLE when `retry`; typed errors out."""
        rpc: Callable[..., Any] = getattr(self.stub, method)
        attempt = 0
        while True:
            try:
                response = rpc(request, timeout=self.settings.timeout_s, metadata=self._metadata())
                return cast(R, response)
            except grpc.RpcError as exc:
                if not self.settings.may_retry(exc, attempt, retry):
                    raise from_rpc_error(exc, method) from exc
                delay = self.settings.delay(attempt)
                attempt += 1
                log.debug("%s unavailable; retry %d of %d in %.2f s", method, attempt, self.settings.retries, delay)
                time.sleep(delay)

    def call(self, method: str, request: Message) -> Any:
        """Call any unary Controller RPC by name (`"ListRuns"`) with its request message; the
        reply message comes back. Retried and typed like the wrapped methods; for fields the
        SDK does not surface."""
        return self._unary(method, request, Message, retry=method not in NON_IDEMPOTENT)

    # --- storage ----------------------------------------------------------------------------

    def init_storage(self) -> controller_pb2.InitStorageResponse:
        """Create the results and blob buckets where they are missing; says which were created."""
        return self._unary("InitStorage", controller_pb2.InitStorageRequest(), controller_pb2.InitStorageResponse)

    def upload_blob(self, path: str | Path, key: str, *, content_type: str = "", overwrite: bool = False,
                    timeout: float | None = None) -> controller_pb2.Blob:
        """Upload a file to the blob bucket under `key`; its SHA-256 is computed here and checked
        by the controller, which stores nothing if the two differ. Not retried (see the module
        docstring); `timeout` bounds the whole upload (default: none)."""
        source = Path(path)
        header = controller_pb2.BlobHeader(key=key, content_type=content_type, sha256=file_sha256(source),
                                           overwrite=overwrite)

        def parts() -> Iterator[controller_pb2.UploadBlobRequest]:
            yield controller_pb2.UploadBlobRequest(header=header)
            with source.open("rb") as handle:
                for block in iter(lambda: handle.read(UPLOAD_CHUNK_BYTES), b""):
                    yield controller_pb2.UploadBlobRequest(chunk=block)

        try:
            response: controller_pb2.UploadBlobResponse = self.stub.UploadBlob(
                parts(), timeout=timeout, metadata=self._metadata()
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "UploadBlob") from exc
        return response.blob

    def upload_dataset(self, path: str | Path, name: str = "", *, overwrite: bool = False) -> common_pb2.DatasetSpec:
        """Upload a dataset (a tar archive, a .npy array or one file) as `datasets/<name>` and
        return the DatasetSpec that names it, pinned by its digest, for an experiment or run."""
        source = Path(path)
        blob = self.upload_blob(source, f"datasets/{name or source.name}", overwrite=overwrite)
        return common_pb2.DatasetSpec(uri=blob.uri, sha256=blob.sha256)

    def list_blobs(self, prefix: str = "") -> list[controller_pb2.Blob]:
        """Blobs whose key starts with `prefix` (key and URI)."""
        response = self._unary("ListBlobs", controller_pb2.ListBlobsRequest(prefix=prefix),
                               controller_pb2.ListBlobsResponse)
        return list(response.blobs)

    # --- deployments and nodes --------------------------------------------------------------

    def deploy_sut(self, sut_id: str, config: sut_agent_pb2.SutConfig) -> controller_pb2.SutDeployment:
        """Deploy (or reconfigure) the SUT `sut_id` with `config`; an empty id asks the
        controller for a new one. Retried only with an id: deploying it twice is harmless,
        while a retry without one could deploy a second SUT."""
        request = controller_pb2.DeploySutRequest(sut_id=sut_id, config=config)
        return self._unary("DeploySut", request, controller_pb2.DeploySutResponse, retry=bool(sut_id)).sut

    def deploy_loadgen_server(
        self,
        loadgen_id: str = "",
        *,
        node_selector: Mapping[str, str] | None = None,
        resources: common_pb2.ResourceLimits | None = None,
    ) -> controller_pb2.LoadGenDeployment:
        """Deploy a LoadGen server (LoadGen agent); an empty id names the default one."""
        request = controller_pb2.DeployLoadGenServerRequest(
            loadgen_id=loadgen_id, node_selector=dict(node_selector or {}), resources=resources
        )
        return self._unary("DeployLoadGenServer", request, controller_pb2.DeployLoadGenServerResponse).loadgen

    def list_nodes(self) -> list[common_pb2.NodeInfo]:
        """The nodes the controller knows, with their interfaces."""
        response = self._unary("ListNodes", controller_pb2.ListNodesRequest(), controller_pb2.ListNodesResponse)
        return list(response.nodes)

    def get_metrics(self, *, run_id: str = "", node: str = "",
                    since: datetime | Timestamp | None = None) -> list[common_pb2.TelemetrySample]:
        """Telemetry samples of a run or of a node (set one), optionally only those from
        `since` on (a naive datetime is taken as UTC)."""
        request = metrics_request(run_id, node, since)
        return list(self._unary("GetMetrics", request, controller_pb2.GetMetricsResponse).samples)

    # --- experiments ------------------------------------------------------------------------

    def start_experiment(self, spec: controller_pb2.ExperimentSpec | Mapping[str, Any] | str | Path, *,
                         experiment_id: str = "") -> controller_pb2.Experiment:
        """Start an experiment from a spec message, a mapping shaped like a spec file, or a
        YAML/JSON file; returns at once. The controller validates the whole spec first and
        starts nothing if any field is wrong (InvalidArgumentError naming every field). A file
        that does not parse raises the same error before any call. `experiment_id` overrides
        the spec's. Not retried (see the module docstring)."""
        message = experiment_spec(spec, experiment_id)
        request = controller_pb2.StartExperimentRequest(spec=message)
        return self._unary("StartExperiment", request, controller_pb2.StartExperimentResponse, retry=False).experiment

    def get_experiment(self, experiment_id: str) -> controller_pb2.Experiment:
        """The experiment's state, progress, run ids and peaks."""
        request = controller_pb2.GetExperimentRequest(experiment_id=experiment_id)
        return self._unary("GetExperiment", request, controller_pb2.GetExperimentResponse).experiment

    def list_experiments(self) -> list[controller_pb2.Experiment]:
        """Every experiment the controller knows."""
        response = self._unary("ListExperiments", controller_pb2.ListExperimentsRequest(),
                               controller_pb2.ListExperimentsResponse)
        return list(response.experiments)

    def watch_experiment(self, experiment_id: str, poll_s: float = 0.5, *,
                         timeout: float | None = None) -> Iterator[controller_pb2.Experiment]:
        """Yield the experiment each time its state or progress changes; ends when it ends.
        Polls GetExperiment, so a controller that restarts meanwhile is simply asked again
        (each poll retried as any call). `timeout` bounds the whole watch
        (DeadlineExceededError)."""
        deadline = _deadline(timeout)
        last: controller_pb2.Experiment | None = None
        while True:
            experiment = self.get_experiment(experiment_id)
            if experiment != last:
                yield experiment
                last = experiment
            if experiment.state in TERMINAL_STATES:
                return
            if _too_late(deadline, poll_s):
                raise _out_of_time("watch_experiment", timeout)
            time.sleep(poll_s)

    def wait_experiment(self, experiment_id: str, timeout: float | None = None,
                        poll_s: float = 0.5) -> controller_pb2.Experiment:
        """Block until the experiment ends; returns its final state. DeadlineExceededError if
        `timeout` passes first (the experiment goes on)."""
        final: controller_pb2.Experiment | None = None
        for experiment in self.watch_experiment(experiment_id, poll_s, timeout=timeout):
            final = experiment
        assert final is not None  # watch_experiment yields at least once or raises
        return final

    def cancel_experiment(self, experiment_id: str) -> controller_pb2.Experiment:
        """Stop the experiment: the point running is cancelled, no more start."""
        request = controller_pb2.CancelExperimentRequest(experiment_id=experiment_id)
        return self._unary("CancelExperiment", request, controller_pb2.CancelExperimentResponse).experiment

    # --- runs -------------------------------------------------------------------------------

    def start_run(self, spec: controller_pb2.RunSpec) -> controller_pb2.Run:
        """Start one run (a LoadGen test, or a repeat series); returns at once with its id.
        Not retried (see the module docstring)."""
        request = controller_pb2.StartRunRequest(spec=spec)
        return self._unary("StartRun", request, controller_pb2.StartRunResponse, retry=False).run

    def get_run(self, run_id: str) -> controller_pb2.Run:
        """The run's state, progress and results so far."""
        return self._unary("GetRun", controller_pb2.GetRunRequest(run_id=run_id), controller_pb2.GetRunResponse).run

    def list_runs(self, *, experiment_id: str = "", state: common_pb2.RunState.ValueType | None = None,
                  limit: int = 0) -> list[controller_pb2.Run]:
        """Runs, optionally of one experiment and in one state; every page is fetched, up to
        `limit` runs (0: all)."""
        runs: list[controller_pb2.Run] = []
        request = controller_pb2.ListRunsRequest(
            experiment_id=experiment_id, state=state or common_pb2.RUN_STATE_UNSPECIFIED
        )
        while True:
            request.page_size = _page_size(limit, len(runs))
            response = self._unary("ListRuns", request, controller_pb2.ListRunsResponse)
            runs.extend(response.runs)
            if not response.next_page_token or (limit and len(runs) >= limit):
                return runs[:limit] if limit else runs
            request.page_token = response.next_page_token

    def watch_run(self, run_id: str, *, timeout: float | None = None) -> Iterator[controller_pb2.WatchRunResponse]:
        """State changes and progress of a run, from its current state to its end; `event.run`
        is a snapshot after each event.

        When the stream breaks with UNAVAILABLE it is re-opened (backing off, up to `retries`
        times in a row; the count starts again once an event arrives). A re-opened stream
        starts with the run's current state, so one snapshot may repeat what was already
        seen; events older than the last one yielded are skipped. `timeout` bounds the whole
        watch (DeadlineExceededError)."""
        deadline = _deadline(timeout)
        request = controller_pb2.WatchRunRequest(run_id=run_id)
        attempt = 0
        last_ns = -1
        while True:
            call = self.stub.WatchRun(request, timeout=_left(deadline, "watch_run", timeout),
                                      metadata=self._metadata())
            try:
                for event in call:
                    stamp = event.time.ToNanoseconds()
                    if stamp < last_ns:
                        continue
                    last_ns = stamp
                    attempt = 0
                    yield event
                return
            except grpc.RpcError as exc:
                delay = self.settings.delay(attempt)
                if not self.settings.may_retry(exc, attempt, True) or _too_late(deadline, delay):
                    raise from_rpc_error(exc, "WatchRun") from exc
                attempt += 1
                log.debug("WatchRun unavailable; reconnect %d of %d in %.2f s", attempt, self.settings.retries, delay)
                time.sleep(delay)
            finally:
                # A caller that stops iterating early must not leave the stream open.
                call.cancel()

    def wait_run(self, run_id: str, timeout: float | None = None) -> controller_pb2.Run:
        """Block until the run ends; returns its final state with results. DeadlineExceededError
        if `timeout` passes first (the run goes on)."""
        deadline = _deadline(timeout)
        while True:
            final: controller_pb2.Run | None = None
            for event in self.watch_run(run_id, timeout=_left(deadline, "wait_run", timeout)):
                final = event.run
            if final is None or final.state not in TERMINAL_STATES:
                # The stream ended without the end of the run (a controller shutting down
                # cleanly): ask for the state, and watch again if it is still going.
                final = self.get_run(run_id)
            if final.state in TERMINAL_STATES:
                return final
            time.sleep(self.settings.backoff_s)

    def cancel_run(self, run_id: str) -> controller_pb2.Run:
        """Cancel a run; its state becomes CANCELLED once the LoadGen side has stopped."""
        return self._unary("CancelRun", controller_pb2.CancelRunRequest(run_id=run_id),
                           controller_pb2.CancelRunResponse).run

    # --- results ----------------------------------------------------------------------------

    def list_results(
        self,
        *,
        experiment_id: str = "",
        selector: str = "",
        run_id: str = "",
        network_profile: str = "",
        sut_backend: str = "",
        scenario: common_pb2.Scenario.ValueType = common_pb2.SCENARIO_UNSPECIFIED,
    ) -> list[controller_pb2.ResultRecord]:
        """Stored results, one record per repeat, oldest first; every filter given must match."""
        request = list_results_request(experiment_id, selector, run_id, network_profile, sut_backend, scenario)
        return list(self._unary("ListResults", request, controller_pb2.ListResultsResponse).results)

    def results_table(
        self,
        *,
        experiment_id: str = "",
        selector: str = "",
        run_id: str = "",
        network_profile: str = "",
        sut_backend: str = "",
        scenario: common_pb2.Scenario.ValueType = common_pb2.SCENARIO_UNSPECIFIED,
    ) -> ResultTable:
        """`list_results` as a ResultTable (see `result_rows`): `.to_text()`, `.to_csv()`."""
        return result_rows(
            self.list_results(
                experiment_id=experiment_id, selector=selector, run_id=run_id,
                network_profile=network_profile, sut_backend=sut_backend, scenario=scenario,
            )
        )

    def get_result(self, run_id: str, repeat: int = 0,
                   include_files: Iterable[str] = ()) -> controller_pb2.GetResultResponse:
        """One repeat's record (repeats count from 1; 0 means the first) and, for each name in
        `include_files` (e.g. "mlperf_log_summary.txt"), that stored file's contents."""
        request = controller_pb2.GetResultRequest(run_id=run_id, repeat=repeat, include_files=list(include_files))
        return self._unary("GetResult", request, controller_pb2.GetResultResponse)

