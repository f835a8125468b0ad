"""How much does the MECBench path itself cost? One command, one process run:

    .venv/bin/python -m bench.harness [--quick]

measures the references (in-process LoadGen, TCP ping-pong, plain grpcio unary) and the
MECBench path (controller -> LoadGen agent session -> batched data plane -> SUT agent with a
zero-time synthetic backend), with 1, 2 and 4 clients, and prints a table of ratios. Figures are
only compared within the run: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path

from bench import references
from controller.app import ControllerApp
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2

SUT_ID = "zero-time"


def _zero_time_sut() -> sut_agent_pb2.SutConfig:
    return sut_agent_pb2.SutConfig(
        synthetic=sut_agent_pb2.SyntheticBackendConfig(distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT)
    )


TRANSPORTS = {
    "grpc": loadgen_agent_pb2.DATA_PLANE_TRANSPORT_GRPC,
    "tcp": loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP,
}


def _run(
    app: ControllerApp, settings: common_pb2.LoadGenSettings, clients: int, transport: str = "grpc"
) -> controller_pb2.Run:
    spec = controller_pb2.RunSpec(
        experiment_id="bench",
        sut_id=SUT_ID,
        settings=settings,
        clients=clients,
        data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=TRANSPORTS[transport]),
    )
    run = app.runs.start_run(spec)
    final = app.runs.wait(run.run_id, timeout=300)
    if final.state != common_pb2.RUN_STATE_SUCCEEDED:
        raise RuntimeError(f"bench run failed: {final.error}")
    return final


def _server_settings(qps: float, seconds: float) -> common_pb2.LoadGenSettings:
    return common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SERVER,
        server_target_qps=qps,
        server_target_latency=durations.from_seconds(0.100),
        server_coalesce_queries=True,
        min_duration=durations.from_seconds(seconds),
        min_query_count=1,
        skip_mlperf_defaults=True,
    )


def mecbench_server_ceiling(
    app: ControllerApp, clients: int, ladder: list[float], seconds: float, transport: str
) -> float:
    """Highest total target QPS in the ladder that LoadGen judges VALID (p99 under 100 ms)."""
    best = 0.0
    for total in ladder:
        run = _run(app, _server_settings(total / clients, seconds), clients, transport)
        if not run.results[0].aggregate.valid:
            break
        best = total
    return best


def inprocess_server_ceiling(ladder: list[float], seconds: float) -> float:
    best = 0.0
    for qps in ladder:
        fields = references.loadgen_in_process("server", qps, seconds)
        if fields.get("Result is") != "VALID":
            break
        best = qps
    return best


def mecbench_single_stream(app: ControllerApp, clients: int, seconds: float, transport: str) -> tuple[float, float]:
    """(p50, p99) in microseconds of a SingleStream test per client against the zero-time SUT."""
    settings = common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SINGLE_STREAM,
        min_duration=durations.from_seconds(seconds),
        min_query_count=1,
        single_stream_expected_latency=durations.from_seconds(0.0005),
        skip_mlperf_defaults=True,
    )
    run = _run(app, settings, clients, transport)
    p50s = [durations.to_ns(c.result.latency.p50) / 1e3 for c in run.results[0].clients]
    p99s = [durations.to_ns(c.result.latency.p99) / 1e3 for c in run.results[0].clients]
    return max(p50s), max(p99s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter tests and a coarser ladder")
    parser.add_argument(
        "--transports", nargs="+", choices=sorted(TRANSPORTS), default=["grpc", "tcp"], help="data planes to measure"
    )
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 5.0
    ladder = [2000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 60000.0, 80000.0]

    tcp = references.tcp_ping_pong()
    unary = references.grpc_unary()
    inprocess_ss = float(references.loadgen_in_process("single", 0, seconds)["50.00 percentile latency (ns)"]) / 1e3
    inprocess_ceiling = inprocess_server_ceiling([*ladder, 100000.0], seconds)

    rows: list[tuple[str, int, float, float, float]] = []
    with tempfile.TemporaryDirectory() as data_dir:
        app = ControllerApp(ControllerSettings.load(data_dir=Path(data_dir)))
        try:
            app.pool.deploy_sut(SUT_ID, _zero_time_sut())
            for transport in args.transports:
                for clients in (1, 2, 4):
                    # A warm-up run opens the sessions, so set-up is not measured as latency.
                    mecbench_single_stream(app, clients, 0.5, transport)
                    p50, p99 = mecbench_single_stream(app, clients, seconds, transport)
                    ceiling = mecbench_server_ceiling(app, clients, ladder, seconds, transport)
                    rows.append((transport, clients, p50, p99, ceiling))
        finally:
            app.close()

    print(f"MECBench harness benchmark, {date.today().isoformat()}, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print()
    print("| reference | figure |")
    print("| --- | --- |")
    print(f"| TCP ping-pong on loopback | p50 {tcp['p50_us']:.0f} us |")
    print(f"| grpcio unary on loopback | p50 {unary['p50_us']:.0f} us, {unary['calls_per_s']:.0f} calls/s |")
    print(f"| LoadGen in-process SUT | SingleStream p50 {inprocess_ss:.1f} us; "
          f"Server ceiling {inprocess_ceiling:.0f} QPS |")
    print()
    print("| data plane | clients | SingleStream p50 (us) | p99 (us) | p50 / grpc unary p50 | p50 / TCP p50 "
          "| Server ceiling (QPS) | ceiling / in-process | ceiling / grpc unary calls/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for transport, clients, p50, p99, ceiling in rows:
        print(
            f"| {transport} | {clients} | {p50:.0f} | {p99:.0f} | {p50 / unary['p50_us']:.2f}"
            f" | {p50 / tcp['p50_us']:.1f} "
            f"| {ceiling:.0f} | {ceiling / max(inprocess_ceiling, 1):.2f} | {ceiling / unary['calls_per_s']:.1f} |"
        )
    print()
    print("Ladder of Server target QPS:", ", ".join(f"{q:.0f}" for q in ladder),
          f"({seconds:.0f} s each); a ceiling is the highest VALID step.")


if __name__ == "__main__":
    main()
