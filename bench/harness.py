"""How much does the MECBench path itself cost? One command, one process run:

    .venv/bin/python -m bench.harness [--quick]

measures the references (in-process LoadGen, TCP ping-pong, plain grpcio unary) and the
MECBench path (controller -> LoadGen agent session -> batched data plane -> SUT agent with a
zero-time synthetic backend), with 1, 2 and 4 clients, and prints a table of ratios. Figures are
only compared within the run: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench import references
from bench.cpu import cpu_by_role, process_tree
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


def data_plane_options(
    transport: str, frame_interval_s: float = 0.0, issue_slack_s: float = 0.0
) -> loadgen_agent_pb2.DataPlaneOptions:
    """Every MECBench run's DataPlaneOptions: the transport, and the two options that trade up to
    their own length of latency for fewer wake-ups (0: not set)."""
    options = loadgen_agent_pb2.DataPlaneOptions(transport=TRANSPORTS[transport])
    if frame_interval_s:
        options.min_frame_interval.CopyFrom(durations.from_seconds(frame_interval_s))
    if issue_slack_s:
        options.issue_slack.CopyFrom(durations.from_seconds(issue_slack_s))
    return options


def _run(
    app: ControllerApp, settings: common_pb2.LoadGenSettings, clients: int,
    data_plane: loadgen_agent_pb2.DataPlaneOptions,
) -> controller_pb2.Run:
    spec = controller_pb2.RunSpec(
        experiment_id="bench", sut_id=SUT_ID, settings=settings, clients=clients, data_plane=data_plane
    )
    run = app.runs.start_run(spec)
    final = app.runs.wait(run.run_id, timeout=300)
    if final.state != common_pb2.RUN_STATE_SUCCEEDED:
        raise RuntimeError(f"bench run failed: {final.error}")
    return final


def _server_settings(qps: float, seconds: float, coalesce: bool) -> common_pb2.LoadGenSettings:
    return common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SERVER,
        server_target_qps=qps,
        server_target_latency=durations.from_seconds(0.100),
        server_coalesce_queries=coalesce,
        min_duration=durations.from_seconds(seconds),
        min_query_count=1,
        skip_mlperf_defaults=True,
    )


@dataclass(frozen=True)
class Ceiling:
    """The highest Server target QPS LoadGen judged VALID, and the lowest it did not, after a
    search: doubling from `start` until a step fails, then bisection until high/low <= 1 + precision."""

    valid_qps: float
    invalid_qps: float
    # Tests run (an INVALID step confirmed by a second try counts two).
    probes: int

    def text(self) -> str:
        upper = f"{self.invalid_qps:.0f}" if self.invalid_qps < float("inf") else "none found"
        return f"{self.valid_qps:.0f} (next INVALID {upper}, {self.probes} probes)"


def search_ceiling(
    valid: Callable[[float], bool], start: float, limit: float, precision: float = 0.05, confirm: bool = True
) -> Ceiling:
    """A ceiling searched for, not the top of a ladder: `valid(qps)` runs one test. With `confirm`,
    an INVALID step is tried once more before it counts: one stall of a shared machine (another
    process taking a core for a few hundred milliseconds) can fail a 2-second test, and a ceiling
    is the highest rate the path can be judged VALID at, not the first rate a stall hit."""
    tries = 0

    def judged(qps: float) -> bool:
        nonlocal tries
        tries += 1
        if valid(qps):
            return True
        if not confirm:
            return False
        tries += 1
        return valid(qps)

    ceiling = _search(judged, start, limit, precision)
    return Ceiling(ceiling.valid_qps, ceiling.invalid_qps, tries)


def _search(valid: Callable[[float], bool], start: float, limit: float, precision: float) -> Ceiling:
    low, high, probes = 0.0, float("inf"), 0
    qps = start
    while qps <= limit:
        probes += 1
        if not valid(qps):
            high = qps
            break
        low = qps
        qps *= 2
    if high == float("inf"):
        return Ceiling(low, high, probes)
    if low == 0.0:  # the start itself failed: look below it
        while high > 1 and low == 0.0:
            probes += 1
            qps = high / 2
            if valid(qps):
                low = qps
            else:
                high = qps
    while high / low > 1 + precision:
        middle = (low + high) / 2
        probes += 1
        if valid(middle):
            low = middle
        else:
            high = middle
    return Ceiling(low, high, probes)


def mecbench_server_ceiling(
    app: ControllerApp, clients: int, seconds: float, data_plane: loadgen_agent_pb2.DataPlaneOptions,
    coalesce: bool, limit: float,
) -> Ceiling:
    """Highest total target QPS (shared by the clients) LoadGen judges VALID, every client, p99
    under 100 ms."""

    def valid(total: float) -> bool:
        run = _run(app, _server_settings(total / clients, seconds, coalesce), clients, data_plane)
        return bool(run.results[0].aggregate.valid)

    return search_ceiling(valid, 2000.0, limit)


def inprocess_server_ceiling(
    seconds: float, coalesce: bool, trace: bool, limit: float, issue_slack_s: float = 0.0
) -> Ceiling:
    def valid(qps: float) -> bool:
        fields = references.loadgen_in_process(
            "server", qps, seconds, coalesce=coalesce, trace=trace, issue_slack_ns=int(issue_slack_s * 1e9)
        )
        return fields.get("Result is") == "VALID"

    return search_ceiling(valid, 2000.0, limit)


@dataclass(frozen=True)
class CpuCost:
    """CPU microseconds per sample of a whole Server run (test and result handling), by role."""

    clients: int
    total_qps: float
    samples: int
    loadgen_us: float
    sut_us: float

    @property
    def total_us(self) -> float:
        return self.loadgen_us + self.sut_us


def mecbench_cpu_cost(
    app: ControllerApp, clients: int, total_qps: float, seconds: float, data_plane: loadgen_agent_pb2.DataPlaneOptions
) -> CpuCost:
    """What a sample costs the LoadGen processes and the SUT agent at one total rate, read from
    /proc: the figure that says why N clients hold less than one on few cores, without the noise
    a ceiling has on a shared machine."""
    before = process_tree(os.getpid())
    run = _run(app, _server_settings(total_qps / clients, seconds, False), clients, data_plane)
    spent = cpu_by_role(before, process_tree(os.getpid()))
    samples = sum(client.result.sample_count for client in run.results[0].clients) or 1
    loadgen = spent.get("loadgen_agent.worker", 0.0) + spent.get("loadgen-agent", 0.0)
    return CpuCost(clients, total_qps, samples, loadgen / samples * 1e6, spent.get("sut-agent", 0.0) / samples * 1e6)


def mecbench_single_stream(
    app: ControllerApp, clients: int, seconds: float, data_plane: loadgen_agent_pb2.DataPlaneOptions
) -> tuple[float, float]:
    """(p50, p99) in microseconds of a SingleStream test per client against the zero-time SUT."""
    settings = common_pb2.LoadGenSettings(
        scenario=common_pb2.SCENARIO_SINGLE_STREAM,
        min_duration=durations.from_seconds(seconds),
        min_query_count=1,
        single_stream_expected_latency=durations.from_seconds(0.0005),
        skip_mlperf_defaults=True,
    )
    run = _run(app, settings, clients, data_plane)
    p50s = [durations.to_ns(c.result.latency.p50) / 1e3 for c in run.results[0].clients]
    p99s = [durations.to_ns(c.result.latency.p99) / 1e3 for c in run.results[0].clients]
    return max(p50s), max(p99s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s tests instead of 5 s")
    parser.add_argument(
        "--transports", nargs="+", choices=sorted(TRANSPORTS), default=["grpc", "tcp"], help="data planes to measure"
    )
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--limit", type=float, default=2_000_000.0, help="highest QPS the search may try")
    parser.add_argument("--data-dir", help="keep the controller's data (registry, results, agents' logs) here")
    parser.add_argument(
        "--min-frame-interval-us", type=float, default=0.0,
        help="DataPlaneOptions.min_frame_interval of every MECBench run (0: each message as soon as a sample waits)",
    )
    parser.add_argument(
        "--issue-slack-us", type=float, default=0.0,
        help="DataPlaneOptions.issue_slack of every MECBench run, and the in-process reference's issuing "
        "thread's timer slack (0: the kernel's default)",
    )
    parser.add_argument(
        "--cpu-qps", type=float, default=10_000.0, help="total QPS at which each client count's CPU cost is read"
    )
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 5.0
    interval_s = args.min_frame_interval_us / 1e6
    slack_s = args.issue_slack_us / 1e6

    tcp = references.tcp_ping_pong()
    unary = references.grpc_unary()
    inprocess_ss = float(references.loadgen_in_process("single", 0, seconds)["50.00 percentile latency (ns)"]) / 1e3
    inprocess = {
        (coalesce, trace): inprocess_server_ceiling(seconds, coalesce, trace, args.limit, slack_s)
        for coalesce in (False, True) for trace in (False, True)
    }

    rows: list[tuple[str, int, float, float, Ceiling, Ceiling]] = []
    costs: list[tuple[str, CpuCost]] = []
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data_dir) if args.data_dir else Path(scratch)
        app = ControllerApp(ControllerSettings.load(data_dir=data_dir))
        try:
            app.pool.deploy_sut(SUT_ID, _zero_time_sut())
            for transport in args.transports:
                data_plane = data_plane_options(transport, interval_s, slack_s)
                for clients in args.clients:
                    # A warm-up run opens the sessions, so set-up is not measured as latency.
                    mecbench_single_stream(app, clients, 0.5, data_plane)
                    p50, p99 = mecbench_single_stream(app, clients, seconds, data_plane)
                    costs.append((transport, mecbench_cpu_cost(app, clients, args.cpu_qps, seconds, data_plane)))
                    plain = mecbench_server_ceiling(app, clients, seconds, data_plane, False, args.limit)
                    coalesced = mecbench_server_ceiling(app, clients, seconds, data_plane, True, args.limit)
                    rows.append((transport, clients, p50, p99, plain, coalesced))
        finally:
            app.close()

    print(f"MECBench harness benchmark, {date.today().isoformat()}, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{seconds:.0f} s per probe, data-plane min_frame_interval {args.min_frame_interval_us:.0f} us, "
          f"issue_slack {args.issue_slack_us:.0f} us (the in-process reference's too)")
    print()
    print("| reference | figure |")
    print("| --- | --- |")
    print(f"| TCP ping-pong on loopback | p50 {tcp['p50_us']:.0f} us |")
    print(f"| grpcio unary on loopback | p50 {unary['p50_us']:.0f} us, {unary['calls_per_s']:.0f} calls/s |")
    print(f"| LoadGen in-process SUT | SingleStream p50 {inprocess_ss:.1f} us |")
    for (coalesce, trace), ceiling in inprocess.items():
        print(f"| LoadGen in-process Server ceiling, coalescing {'on' if coalesce else 'off'}, "
              f"trace {'on' if trace else 'off'} | {ceiling.text()} |")
    print()
    print("MECBench keeps every sample's latency with its own clock, not LoadGen's trace (one measuring")
    print("mode for every client count). The trace's cost in LoadGen itself: ceiling with trace / without, "
          "coalescing off "
          f"{inprocess[(False, True)].valid_qps / max(inprocess[(False, False)].valid_qps, 1):.2f}, on "
          f"{inprocess[(True, True)].valid_qps / max(inprocess[(True, False)].valid_qps, 1):.2f}.")
    print()
    print("| data plane | clients | SingleStream p50 (us) | p99 (us) | p50 / grpc unary p50 | p50 / TCP p50 "
          "| Server ceiling, no coalescing (QPS) | / in-process (trace off) | / 1 client "
          "| Server ceiling, coalescing (QPS) | / in-process (trace off) | / 1 client |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    single = {(t, "plain"): c for t, n, _, _, c, _ in rows if n == 1} | {
        (t, "coalesced"): c for t, n, _, _, _, c in rows if n == 1}
    for transport, clients, p50, p99, plain, coalesced in rows:
        base_plain = single.get((transport, "plain"), plain).valid_qps or 1
        base_coalesced = single.get((transport, "coalesced"), coalesced).valid_qps or 1
        print(
            f"| {transport} | {clients} | {p50:.0f} | {p99:.0f} | {p50 / unary['p50_us']:.2f}"
            f" | {p50 / tcp['p50_us']:.1f} "
            f"| {plain.text()} | {plain.valid_qps / max(inprocess[(False, False)].valid_qps, 1):.2f}"
            f" | {plain.valid_qps / base_plain:.2f} "
            f"| {coalesced.text()} | {coalesced.valid_qps / max(inprocess[(True, False)].valid_qps, 1):.2f}"
            f" | {coalesced.valid_qps / base_coalesced:.2f} |"
        )
    print()
    print("Each ceiling is searched: from 2000 QPS doubling until LoadGen judges a step INVALID (p99 over")
    print(f"100 ms, or fewer queries than scheduled), then bisection to 5 %, up to {args.limit:.0f} QPS;")
    print("an INVALID step is tried a second time before it counts (one stall of a shared machine).")
    print()
    print(f"CPU per sample of a whole Server run at {args.cpu_qps:.0f} QPS in total (no coalescing), from /proc:")
    print()
    print("| data plane | clients | samples | LoadGen processes (us) | SUT agent (us) | total (us) "
          "| total / 1 client |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    one = {transport: cost.total_us for transport, cost in costs if cost.clients == 1}
    for transport, cost in costs:
        print(f"| {transport} | {cost.clients} | {cost.samples} | {cost.loadgen_us:.1f} | {cost.sut_us:.1f} "
              f"| {cost.total_us:.1f} | {cost.total_us / one.get(transport, cost.total_us):.2f} |")


if __name__ == "__main__":
    main()
