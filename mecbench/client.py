"""The Python SDK: a typed client over the Controller API.

    from mecbench.client import Client

    with Client("127.0.0.1:50051") as client:
        spec = load_experiment_file(Path("examples/quick-sweep.yaml"))
        spec.dataset.CopyFrom(client.upload_dataset("images-300.tar"))  # uri and sha256
        experiment = client.start_experiment(spec)
        for experiment in client.watch_experiment(experiment.experiment_id):
            print(experiment.points_done, "of", experiment.points_total)
        rows = client.list_results(experiment_id=experiment.experiment_id)

Blobs go through the controller, which holds the store's credentials: users need none.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import grpc

from mecbench.core.channels import open_channel
from mecbench.experiment_file import load_experiment_file
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc

TERMINAL_STATES = frozenset(
    {common_pb2.RUN_STATE_SUCCEEDED, common_pb2.RUN_STATE_FAILED, common_pb2.RUN_STATE_CANCELLED}
)

DEFAULT_CONTROLLER = "127.0.0.1:50051"
# Well under gRPC's message limit, large enough that per-message cost does not matter.
UPLOAD_CHUNK_BYTES = 1024 * 1024


def default_address() -> str:
    return os.environ.get("MECBENCH_CONTROLLER", DEFAULT_CONTROLLER)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(UPLOAD_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


class Client:
    """A connection to a MECBench controller. Methods raise `grpc.RpcError` with the server's
    status (INVALID_ARGUMENT carries the field violations as a google.rpc BadRequest)."""

    def __init__(self, address: str | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address or default_address()
        self._channel = open_channel(self.address, credentials)
        self.stub = controller_pb2_grpc.ControllerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # --- storage ----------------------------------------------------------------------------

    def init_storage(self) -> controller_pb2.InitStorageResponse:
        """Create the results and blob buckets where they are missing; says which were created."""
        response: controller_pb2.InitStorageResponse = self.stub.InitStorage(controller_pb2.InitStorageRequest())
        return response

    def upload_blob(self, path: str | Path, key: str, *, content_type: str = "", overwrite: bool = False,
                    timeout: float | None = None) -> controller_pb2.Blob:
        """Upload a file to the blob bucket under `key`; its SHA-256 is computed here and checked
        by the controller, which stores nothing if the two differ."""
        source = Path(path)
        header = controller_pb2.BlobHeader(key=key, content_type=content_type, sha256=file_sha256(source),
                                           overwrite=overwrite)

        def parts() -> Iterator[controller_pb2.UploadBlobRequest]:
            yield controller_pb2.UploadBlobRequest(header=header)
            with source.open("rb") as handle:
                for block in iter(lambda: handle.read(UPLOAD_CHUNK_BYTES), b""):
                    yield controller_pb2.UploadBlobRequest(chunk=block)

        response: controller_pb2.UploadBlobResponse = self.stub.UploadBlob(parts(), timeout=timeout)
        return response.blob

    def upload_dataset(self, path: str | Path, name: str = "", *, overwrite: bool = False) -> common_pb2.DatasetSpec:
        """Upload a dataset (a tar archive, a .npy array or one file) as `datasets/<name>` and
        return the DatasetSpec that names it, pinned by its digest, for an experiment or run."""
        source = Path(path)
        blob = self.upload_blob(source, f"datasets/{name or source.name}", overwrite=overwrite)
        return common_pb2.DatasetSpec(uri=blob.uri, sha256=blob.sha256)

    def list_blobs(self, prefix: str = "") -> list[controller_pb2.Blob]:
        response: controller_pb2.ListBlobsResponse = self.stub.ListBlobs(controller_pb2.ListBlobsRequest(prefix=prefix))
        return list(response.blobs)

    # --- experiments ------------------------------------------------------------------------

    def start_experiment(self, spec: controller_pb2.ExperimentSpec | str | Path) -> controller_pb2.Experiment:
        """Start an experiment from a spec or a YAML/JSON file; returns at once. The controller
        validates the whole spec first and starts nothing if any field is wrong."""
        if not isinstance(spec, controller_pb2.ExperimentSpec):
            spec = load_experiment_file(Path(spec))
        response: controller_pb2.StartExperimentResponse = self.stub.StartExperiment(
            controller_pb2.StartExperimentRequest(spec=spec)
        )
        return response.experiment

    def get_experiment(self, experiment_id: str) -> controller_pb2.Experiment:
        response: controller_pb2.GetExperimentResponse = self.stub.GetExperiment(
            controller_pb2.GetExperimentRequest(experiment_id=experiment_id)
        )
        return response.experiment

    def watch_experiment(self, experiment_id: str, poll_s: float = 0.5) -> Iterator[controller_pb2.Experiment]:
        """Yield the experiment each time its state or progress changes; ends when it ends."""
        last: controller_pb2.Experiment | None = None
        while True:
            experiment = self.get_experiment(experiment_id)
            if experiment != last:
                yield experiment
                last = experiment
            if experiment.state in TERMINAL_STATES:
                return
            time.sleep(poll_s)

    def cancel_experiment(self, experiment_id: str) -> controller_pb2.Experiment:
        response: controller_pb2.CancelExperimentResponse = self.stub.CancelExperiment(
            controller_pb2.CancelExperimentRequest(experiment_id=experiment_id)
        )
        return response.experiment

    # --- runs and results -------------------------------------------------------------------

    def start_run(self, spec: controller_pb2.RunSpec) -> controller_pb2.Run:
        response: controller_pb2.StartRunResponse = self.stub.StartRun(controller_pb2.StartRunRequest(spec=spec))
        return response.run

    def get_run(self, run_id: str) -> controller_pb2.Run:
        response: controller_pb2.GetRunResponse = self.stub.GetRun(controller_pb2.GetRunRequest(run_id=run_id))
        return response.run

    def watch_run(self, run_id: str) -> Iterator[controller_pb2.WatchRunResponse]:
        """State changes and progress of a run, from its current state to its end."""
        yield from self.stub.WatchRun(controller_pb2.WatchRunRequest(run_id=run_id))

    def cancel_run(self, run_id: str) -> controller_pb2.Run:
        response: controller_pb2.CancelRunResponse = self.stub.CancelRun(controller_pb2.CancelRunRequest(run_id=run_id))
        return response.run

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
        request = controller_pb2.ListResultsRequest(
            experiment_id=experiment_id,
            selector=selector,
            run_id=run_id,
            network_profile=network_profile,
            sut_backend=sut_backend,
            scenario=scenario,
        )
        response: controller_pb2.ListResultsResponse = self.stub.ListResults(request)
        return list(response.results)
