"""The asyncio Python SDK: `AsyncClient`, the same methods as `mecbench.Client` as coroutines.

    import asyncio
    from mecbench import AsyncClient

    async def main() -> None:
        async with AsyncClient("127.0.0.1:50051") as client:
            experiment = await client.start_experiment("examples/quick-sweep.yaml")
            final = await client.wait_experiment(experiment.experiment_id)
            print((await client.results_table(experiment_id=final.experiment_id)).to_text())

    asyncio.run(main())

Streams are async iterators (`async for event in client.watch_run(run_id)`). Errors, retries
and the results table are those of `mecbench.client` (see its docstring): UNAVAILABLE is retried
with backoff except for calls that could start something twice, and failures raise the typed
errors of `mecbench.client_errors`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from mecbench.client import (
    NON_IDEMPOTENT,
    TERMINAL_STATES,
    UPLOAD_CHUNK_BYTES,
    ConnectionSettings,
    ResultTable,
    _deadline,
    _left,
    _out_of_time,
    _page_size,
    _too_late,
    experiment_spec,
    file_sha256,
    list_results_request,
    metrics_request,
    result_rows,
)
from mecbench.client_errors import from_rpc_error
from mecbench.core.channels import CHANNEL_OPTIONS
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2

__all__ = ["AsyncClient"]

log = logging.getLogger("mecbench.aio")

R = TypeVar("R", bound=Message)


class AsyncClient:
    """A grpc.aio connection to a MECBench controller; arguments as for `mecbench.Client`.

    The channel is opened on first use, inside the running event loop (a grpc.aio channel
    belongs to the loop it was made in), so the client may be constructed anywhere but must
    be used from one loop. Close it with `await client.close()` or `async with`.
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
        self._channel: grpc.aio.Channel | None = None
        self._stub: controller_pb2_grpc.ControllerAsyncStub | None = None

    @property
    def stub(self) -> controller_pb2_grpc.ControllerAsyncStub:
        """The generated grpc.aio stub, for anything the SDK does not wrap."""
        if self._stub is None:
            options = [*CHANNEL_OPTIONS, *self.settings.extra_options]
            if self.settings.credentials is not None:
                self._channel = grpc.aio.secure_channel(self.address, self.settings.credentials, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
            self._stub = controller_pb2_grpc.ControllerStub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return self.settings.metadata or None

    async def _unary(self, method: str, request: Message, response_type: type[R], *, retry: bool = True) -> R:
        """Call one unary RPC, retrying UNAVAILABLE when `retry`; typed errors out."""
        rpc: Callable[..., Any] = getattr(self.stub, method)
        attempt = 0
        while True:
            try:
                response = await rpc(request, timeout=self.settings.timeout_s, metadata=self._metadata())
                return cast(R, response)
            except grpc.RpcError as exc:
                if not self.settings.may_retry(exc, attempt, retry):
                    raise from_rpc_error(exc, method) from exc
                delay = self.settings.delay(attempt)
                attempt += 1
                log.debug("%s unavailable; retry %d of %d in %.2f s", method, attempt, self.settings.retries, delay)
                await asyncio.sleep(delay)

    async def call(self, method: str, request: Message) -> Any:
        """Call any unary Controller RPC by name (`"ListRuns"`) with its request message; the
        reply message comes back. Retried and typed like the wrapped methods; for fields the
        SDK does not surface."""
        return await self._unary(method, request, Message, retry=method not in NON_IDEMPOTENT)

    # --- storage ----------------------------------------------------------------------------

    async def init_storage(self) -> controller_pb2.InitStorageResponse:
        """Create the results and blob buckets where they are missing; says which were created."""
        return await self._unary("InitStorage", controller_pb2.InitStorageRequest(),
                                 controller_pb2.InitStorageResponse)

    async def upload_blob(self, path: str | Path, key: str, *, content_type: str = "", overwrite: bool = False,
                          timeout: float | None = None) -> controller_pb2.Blob:
        """Upload a file to the blob bucket under `key` (see `Client.upload_blob`); the file is
        hashed and read in worker threads so the event loop keeps running. Not retried."""
        source = Path(path)
        digest = await asyncio.to_thread(file_sha256, source)
        header = controller_pb2.BlobHeader(key=key, content_type=content_type, sha256=digest, overwrite=overwrite)

        async def parts() -> AsyncIterator[controller_pb2.UploadBlobRequest]:
            yield controller_pb2.UploadBlobRequest(header=header)
            handle = await asyncio.to_thread(source.open, "rb")
            try:
                while block := await asyncio.to_thread(handle.read, UPLOAD_CHUNK_BYTES):
                    yield controller_pb2.UploadBlobRequest(chunk=block)
            finally:
                handle.close()

        try:
            response: controller_pb2.UploadBlobResponse = await self.stub.UploadBlob(
                parts(), timeout=timeout, metadata=self._metadata()
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "UploadBlob") from exc
        return response.blob

    async def upload_dataset(self, path: str | Path, name: str = "", *,
                             overwrite: bool = False) -> common_pb2.DatasetSpec:
        """Upload a dataset as `datasets/<name>`; returns the DatasetSpec naming it by digest."""
        source = Path(path)
        blob = await self.upload_blob(source, f"datasets/{name or source.name}", overwrite=overwrite)
        return common_pb2.DatasetSpec(uri=blob.uri, sha256=blob.sha256)

    async def list_blobs(self, prefix: str = "") -> list[controller_pb2.Blob]:
        """Blobs whose key starts with `prefix` (key and URI)."""
        response = await self._unary("ListBlobs", controller_pb2.ListBlobsRequest(prefix=prefix),
                                     controller_pb2.ListBlobsResponse)
        return list(response.blobs)

    # --- deployments and nodes --------------------------------------------------------------

    async def deploy_sut(self, sut_id: str, config: sut_agent_pb2.SutConfig) -> controller_pb2.SutDeployment:
        """Deploy (or reconfigure) the SUT `sut_id`; retried only with an id (see Client)."""
        request = controller_pb2.DeploySutRequest(sut_id=sut_id, config=config)
        response = await self._unary("DeploySut", request, controller_pb2.DeploySutResponse, retry=bool(sut_id))
        return response.sut

    async def deploy_loadgen_server(
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
        response = await self._unary("DeployLoadGenServer", request, controller_pb2.DeployLoadGenServerResponse)
        return response.loadgen

    async def list_nodes(self) -> list[common_pb2.NodeInfo]:
        """The nodes the controller knows, with their interfaces."""
        response = await self._unary("ListNodes", controller_pb2.ListNodesRequest(), controller_pb2.ListNodesResponse)
        return list(response.nodes)

    async def get_metrics(self, *, run_id: str = "", node: str = "",
                          since: datetime | Timestamp | None = None) -> list[common_pb2.TelemetrySample]:
        """Telemetry samples of a run or of a node (set one), optionally from `since` on."""
        request = metrics_request(run_id, node, since)
        response = await self._unary("GetMetrics", request, controller_pb2.GetMetricsResponse)
        return list(response.samples)

    # --- experiments ------------------------------------------------------------------------

    async def start_experiment(self, spec: controller_pb2.ExperimentSpec | Mapping[str, Any] | str | Path, *,
                               experiment_id: str = "") -> controller_pb2.Experiment:
        """Start an experiment from a message, a mapping or a YAML/JSON file (see Client); the
        file is read in a worker thread. Not retried."""
        message = await asyncio.to_thread(experiment_spec, spec, experiment_id)
        request = controller_pb2.StartExperimentRequest(spec=message)
        response = await self._unary("StartExperiment", request, controller_pb2.StartExperimentResponse, retry=False)
        return response.experiment

    async def get_experiment(self, experiment_id: str) -> controller_pb2.Experiment:
        """The experiment's state, progress, run ids and peaks."""
        request = controller_pb2.GetExperimentRequest(experiment_id=experiment_id)
        return (await self._unary("GetExperiment", request, controller_pb2.GetExperimentResponse)).experiment

    async def list_experiments(self) -> list[controller_pb2.Experiment]:
        """Every experiment the controller knows."""
        response = await self._unary("ListExperiments", controller_pb2.ListExperimentsRequest(),
                                     controller_pb2.ListExperimentsResponse)
        return list(response.experiments)

    async def watch_experiment(self, experiment_id: str, poll_s: float = 0.5, *,
                               timeout: float | None = None) -> AsyncIterator[controller_pb2.Experiment]:
        """Yield the experiment each time its state or progress changes; ends when it ends
        (polls GetExperiment; see Client.watch_experiment)."""
        deadline = _deadline(timeout)
        last: controller_pb2.Experiment | None = None
        while True:
            experiment = await self.get_experiment(experiment_id)
            if experiment != last:
                yield experiment
                last = experiment
            if experiment.state in TERMINAL_STATES:
                return
            if _too_late(deadline, poll_s):
                raise _out_of_time("watch_experiment", timeout)
            await asyncio.sleep(poll_s)

    async def wait_experiment(self, experiment_id: str, timeout: float | None = None,
                              poll_s: float = 0.5) -> controller_pb2.Experiment:
        """Wait for the experiment to end; returns its final state. DeadlineExceededError if
        `timeout` passes first (the experiment goes on)."""
        final: controller_pb2.Experiment | None = None
        async for experiment in self.watch_experiment(experiment_id, poll_s, timeout=timeout):
            final = experiment
        assert final is not None  # watch_experiment yields at least once or raises
        return final

    async def cancel_experiment(self, experiment_id: str) -> controller_pb2.Experiment:
        """Stop the experiment: the point running is cancelled, no more start."""
        request = controller_pb2.CancelExperimentRequest(experiment_id=experiment_id)
        return (await self._unary("CancelExperiment", request, controller_pb2.CancelExperimentResponse)).experiment

    # --- runs -------------------------------------------------------------------------------

    async def start_run(self, spec: controller_pb2.RunSpec) -> controller_pb2.Run:
        """Start one run; returns at once with its id. Not retried."""
        request = controller_pb2.StartRunRequest(spec=spec)
        return (await self._unary("StartRun", request, controller_pb2.StartRunResponse, retry=False)).run

    async def get_run(self, run_id: str) -> controller_pb2.Run:
        """The run's state, progress and results so far."""
        request = controller_pb2.GetRunRequest(run_id=run_id)
        return (await self._unary("GetRun", request, controller_pb2.GetRunResponse)).run

    async def list_runs(self, *, experiment_id: str = "", state: common_pb2.RunState.ValueType | None = None,
                        limit: int = 0) -> list[controller_pb2.Run]:
        """Runs, optionally of one experiment and in one state; up to `limit` (0: all)."""
        runs: list[controller_pb2.Run] = []
        request = controller_pb2.ListRunsRequest(
            experiment_id=experiment_id, state=state or common_pb2.RUN_STATE_UNSPECIFIED
        )
        while True:
            request.page_size = _page_size(limit, len(runs))
            response = await self._unary("ListRuns", request, controller_pb2.ListRunsResponse)
            runs.extend(response.runs)
            if not response.next_page_token or (limit and len(runs) >= limit):
                return runs[:limit] if limit else runs
            request.page_token = response.next_page_token

    async def watch_run(self, run_id: str, *,
                        timeout: float | None = None) -> AsyncIterator[controller_pb2.WatchRunResponse]:
        """State changes and progress of a run to its end, re-opened after UNAVAILABLE as
        `Client.watch_run` describes (one snapshot may repeat after a reconnect)."""
        deadline = _deadline(timeout)
        request = controller_pb2.WatchRunRequest(run_id=run_id)
        attempt = 0
        last_ns = -1
        while True:
            call = self.stub.WatchRun(request, timeout=_left(deadline, "watch_run", timeout),
                                      metadata=self._metadata())
            try:
                async for event in call:
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
                await asyncio.sleep(delay)
            finally:
                # A caller that stops iterating early must not leave the stream open.
                call.cancel()

    async def wait_run(self, run_id: str, timeout: float | None = None) -> controller_pb2.Run:
        """Wait for the run to end; returns its final state with results. DeadlineExceededError
        if `timeout` passes first (the run goes on)."""
        deadline = _deadline(timeout)
        while True:
            final: controller_pb2.Run | None = None
            async for event in self.watch_run(run_id, timeout=_left(deadline, "wait_run", timeout)):
                final = event.run
            if final is None or final.state not in TERMINAL_STATES:
                # The stream ended before the run did (a controller shutting down cleanly).
                final = await self.get_run(run_id)
            if final.state in TERMINAL_STATES:
                return final
            await asyncio.sleep(self.settings.backoff_s)

    async def cancel_run(self, run_id: str) -> controller_pb2.Run:
        """Cancel a run; its state becomes CANCELLED once the LoadGen side has stopped."""
        request = controller_pb2.CancelRunRequest(run_id=run_id)
        return (await self._unary("CancelRun", request, controller_pb2.CancelRunResponse)).run

    # --- results ----------------------------------------------------------------------------

    async def list_results(
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
        return list((await self._unary("ListResults", request, controller_pb2.ListResultsResponse)).results)

    async def results_table(
        self,
        *,
        experiment_id: str = "",
        selector: str = "",
        run_id: str = "",
        network_profile: str = "",
        sut_backend: str = "",
        scenario: common_pb2.Scenario.ValueType = common_pb2.SCENARIO_UNSPECIFIED,
    ) -> ResultTable:
        """`list_results` as a ResultTable (see `mecbench.client.result_rows`)."""
        records = await self.list_results(
            experiment_id=experiment_id, selector=selector, run_id=run_id,
            network_profile=network_profile, sut_backend=sut_backend, scenario=scenario,
        )
        return result_rows(records)

    async def get_result(self, run_id: str, repeat: int = 0,
                         include_files: Iterable[str] = ()) -> controller_pb2.GetResultResponse:
        """One repeat's record (from 1; 0 = the first) and the stored files named."""
        request = controller_pb2.GetResultRequest(run_id=run_id, repeat=repeat, include_files=list(include_files))
        return await self._unary("GetResult", request, controller_pb2.GetResultResponse)
