"""mecbench.v1.Controller servicer: translates messages, nothing more."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from controller import blobs
from controller.agents import DEFAULT_LOADGEN
from controller.app import ControllerApp
from controller.validation import validate_sut
from mecbench.core import durations
from mecbench.core.errors import InvalidArgument, Violations
from mecbench.v1 import controller_pb2, controller_pb2_grpc
from store.layout import check_segment, repeat_prefix

_BUCKET_STATES = {True: controller_pb2.BUCKET_STATE_CREATED, False: controller_pb2.BUCKET_STATE_EXISTS}


class ControllerServicer(controller_pb2_grpc.ControllerServicer):
    def __init__(self, app: ControllerApp) -> None:
        self.app = app

    def InitStorage(
        self, request: controller_pb2.InitStorageRequest, context: grpc.ServicerContext
    ) -> controller_pb2.InitStorageResponse:
        buckets = self.app.store.init_buckets()
        return controller_pb2.InitStorageResponse(
            backend=self.app.store.backend_name,
            buckets=[
                controller_pb2.BucketStatus(name=b.name, state=_BUCKET_STATES[b.created], message=b.message)
                for b in buckets
            ],
        )

    def DeploySut(
        self, request: controller_pb2.DeploySutRequest, context: grpc.ServicerContext
    ) -> controller_pb2.DeploySutResponse:
        violations = Violations()
        if not request.HasField("config"):
            violations.add("config", "must be set")
        else:
            validate_sut(request.config, "config", violations)
        if request.sut_id:
            try:
                check_segment(request.sut_id, "sut_id")
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        violations.raise_if_any()
        sut_id = request.sut_id or self.app.pool.new_id("sut")
        handle = self.app.pool.deploy_sut(sut_id, request.config)
        return controller_pb2.DeploySutResponse(sut=self.app.pool.sut_deployment(handle))

    def DeployLoadGenServer(
        self, request: controller_pb2.DeployLoadGenServerRequest, context: grpc.ServicerContext
    ) -> controller_pb2.DeployLoadGenServerResponse:
        if request.loadgen_id:
            check_segment(request.loadgen_id, "loadgen_id")
        handle = self.app.pool.deploy_loadgen(request.loadgen_id or DEFAULT_LOADGEN)
        return controller_pb2.DeployLoadGenServerResponse(loadgen=self.app.pool.loadgen_deployment(handle))

    def StartRun(
        self, request: controller_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> controller_pb2.StartRunResponse:
        return controller_pb2.StartRunResponse(run=self.app.runs.start_run(request.spec))

    def GetRun(
        self, request: controller_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> controller_pb2.GetRunResponse:
        _require(request.run_id, "run_id")
        return controller_pb2.GetRunResponse(run=self.app.runs.get_run(request.run_id))

    def ListRuns(
        self, request: controller_pb2.ListRunsRequest, context: grpc.ServicerContext
    ) -> controller_pb2.ListRunsResponse:
        violations = Violations()
        violations.check(request.page_size >= 0, "page_size", "must not be negative")
        violations.check(
            not request.page_token or request.page_token.isdigit(), "page_token", "not a token this server issued"
        )
        violations.raise_if_any()
        return self.app.runs.list_runs(request)

    def WatchRun(
        self, request: controller_pb2.WatchRunRequest, context: grpc.ServicerContext
    ) -> Iterator[controller_pb2.WatchRunResponse]:
        _require(request.run_id, "run_id")
        yield from self.app.runs.watch_run(request.run_id, context.is_active)

    def CancelRun(
        self, request: controller_pb2.CancelRunRequest, context: grpc.ServicerContext
    ) -> controller_pb2.CancelRunResponse:
        _require(request.run_id, "run_id")
        return controller_pb2.CancelRunResponse(run=self.app.runs.cancel_run(request.run_id))

    def ListNodes(
        self, request: controller_pb2.ListNodesRequest, context: grpc.ServicerContext
    ) -> controller_pb2.ListNodesResponse:
        return controller_pb2.ListNodesResponse(nodes=self.app.pool.node_infos())

    def GetMetrics(
        self, request: controller_pb2.GetMetricsRequest, context: grpc.ServicerContext
    ) -> controller_pb2.GetMetricsResponse:
        since = durations.timestamp_seconds(request.since, "since") if request.HasField("since") else 0.0
        subject = request.WhichOneof("subject")
        if subject == "run_id" and request.run_id:
            self.app.runs.get_run(request.run_id)  # NOT_FOUND for an unknown run
            samples = self.app.registry.telemetry(run_id=request.run_id, since=since)
        elif subject == "node" and request.node:
            samples = self.app.registry.telemetry(node=request.node, since=since)
        else:
            raise InvalidArgument("set run_id or node", field="subject")
        return controller_pb2.GetMetricsResponse(samples=samples)

    def ListResults(
        self, request: controller_pb2.ListResultsRequest, context: grpc.ServicerContext
    ) -> controller_pb2.ListResultsResponse:
        return controller_pb2.ListResultsResponse(results=self.app.registry.list_results(request))

    def GetResult(
        self, request: controller_pb2.GetResultRequest, context: grpc.ServicerContext
    ) -> controller_pb2.GetResultResponse:
        _require(request.run_id, "run_id")
        record = self.app.registry.get_result(request.run_id, request.repeat or 1)
        response = controller_pb2.GetResultResponse(record=record)
        for name in request.include_files:
            if name not in record.files:
                raise InvalidArgument(f"no file {name!r} in this result (have: {', '.join(record.files)})",
                                      field="include_files")
            key = _key_for(record, name)
            response.files.add(name=name, data=self.app.store.get(self.app.store.results_bucket, key), last=True)
        return response


    def StartExperiment(
        self, request: controller_pb2.StartExperimentRequest, context: grpc.ServicerContext
    ) -> controller_pb2.StartExperimentResponse:
        return controller_pb2.StartExperimentResponse(experiment=self.app.experiments.start(request.spec))

    def GetExperiment(
        self, request: controller_pb2.GetExperimentRequest, context: grpc.ServicerContext
    ) -> controller_pb2.GetExperimentResponse:
        _require(request.experiment_id, "experiment_id")
        return controller_pb2.GetExperimentResponse(experiment=self.app.experiments.get(request.experiment_id))

    def ListExperiments(
        self, request: controller_pb2.ListExperimentsRequest, context: grpc.ServicerContext
    ) -> controller_pb2.ListExperimentsResponse:
        return controller_pb2.ListExperimentsResponse(experiments=self.app.experiments.list())

    def CancelExperiment(
        self, request: controller_pb2.CancelExperimentRequest, context: grpc.ServicerContext
    ) -> controller_pb2.CancelExperimentResponse:
        _require(request.experiment_id, "experiment_id")
        return controller_pb2.CancelExperimentResponse(experiment=self.app.experiments.cancel(request.experiment_id))

    def UploadBlob(
        self, request_iterator: Iterator[controller_pb2.UploadBlobRequest], context: grpc.ServicerContext
    ) -> controller_pb2.UploadBlobResponse:
        header, data = blobs.receive(request_iterator, self.app.settings.max_blob_bytes)
        return controller_pb2.UploadBlobResponse(blob=blobs.upload(self.app.store, header, data))

    def ListBlobs(
        self, request: controller_pb2.ListBlobsRequest, context: grpc.ServicerContext
    ) -> controller_pb2.ListBlobsResponse:
        return controller_pb2.ListBlobsResponse(blobs=blobs.list_blobs(self.app.store, request.prefix))


def _key_for(record: controller_pb2.ResultRecord, name: str) -> str:
    return repeat_prefix(record.experiment_id, record.selector, record.run_id, record.repeat) + name


def _require(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument("must not be empty", field=field)
