"""Per-point set-up overhead: LoadGen-server mode (persistent sessions) against LoadGen-job mode
(a fresh LoadGen process per run that loads the dataset itself), in one run:

    .venv/bin/python -m bench.setup_modes [--points N] [--samples N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from controller.app import ControllerApp
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, sut_agent_pb2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4096, help="dataset size (samples of 3x224x224 uint8)")
    args = parser.parse_args()
    dataset = common_pb2.DatasetSpec(synthetic=common_pb2.SyntheticDataset(
        sample_count=args.samples, shape=[3, 224, 224], data_type=common_pb2.DATA_TYPE_UINT8))
    settings = common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SINGLE_STREAM, min_duration=durations.from_seconds(0.5), min_query_count=10,
        performance_sample_count=64, skip_mlperf_defaults=True)
    setup: dict[int, list[float]] = {controller_pb2.LOAD_GEN_MODE_SERVER: [], controller_pb2.LOAD_GEN_MODE_JOB: []}
    with tempfile.TemporaryDirectory() as data_dir:
        app = ControllerApp(ControllerSettings.load(data_dir=Path(data_dir), telemetry_interval_s=0))
        try:
            app.pool.deploy_sut("sut", sut_agent_pb2.SutConfig(synthetic=sut_agent_pb2.SyntheticBackendConfig()))
            for _ in range(args.points):
                for mode, times in setup.items():
                    spec = controller_pb2.RunSpec(experiment_id="bench-setup", sut_id="sut", settings=settings,
                                                  dataset=dataset, loadgen_mode=mode)  # type: ignore[arg-type]
                    run = app.runs.wait(app.runs.start_run(spec).run_id, timeout=300)
                    if run.state != common_pb2.RUN_STATE_SUCCEEDED:
                        raise SystemExit(f"run failed: {run.error}")
                    times.append(durations.to_seconds(run.results[0].loadgen_setup_time))
        finally:
            app.close()
    server = setup[controller_pb2.LOAD_GEN_MODE_SERVER]
    job = setup[controller_pb2.LOAD_GEN_MODE_JOB]
    # The first server-mode point opens the session; later points reuse it.
    print(f"dataset: {args.samples} samples of 3x224x224 uint8; {args.points} points per mode")
    print("| mode | first point (s) | median of later points (s) |")
    print("| --- | --- | --- |")
    print(f"| LoadGen server (persistent sessions) | {server[0]:.3f} | {statistics.median(server[1:]):.4f} |")
    print(f"| LoadGen job (fresh process per run) | {job[0]:.3f} | {statistics.median(job[1:]):.3f} |")
    ratio = statistics.median(job[1:]) / max(statistics.median(server[1:]), 1e-6)
    print(f"ratio job / server per point (later points): {ratio:.0f}x")


if __name__ == "__main__":
    main()
