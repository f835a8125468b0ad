"""Experiment reports: PNG figures of an experiment's results and an HTML page that embeds them.

    with Client(address) as client:
        data = collect_report_data(client, "quick-sweep")
    page = write_report(data, Path("report"))  # report/report.html and report/*.png

Everything is fetched once through the Controller API (`collect_report_data`), then drawn
offline (`render_figures`, `write_report`), so a report can be redrawn or restyled without
asking the controller again. See docs/reports.md for how to read each figure.

Figures are drawn on `matplotlib.figure.Figure` objects, which render through the Agg canvas
when saved, and never through pyplot: no display is needed, the caller's own pyplot backend
(a notebook's, say) is left alone, and no figure outlives the call that drew it.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mecbench.breakdown import latency_breakdown
from mecbench.client import Client
from mecbench.core import durations
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, controller_pb2
from store.layout import SAMPLE_LATENCIES_NAME

log = get_logger("mecbench.report")

# Stored beside each repeat's results by the controller (see controller/telemetry.py).
TELEMETRY_FILE = "telemetry.json"
# One stored file per request; a stuck controller must not hang a report for ever.
FILE_TIMEOUT_S = 120.0

# Every figure has the same canvas, so a report's figures line up on the page and tests know
# what size to expect.
FIGURE_SIZE_IN = (12.0, 7.0)
FIGURE_DPI = 100
FIGURE_SIZE_PX = (int(FIGURE_SIZE_IN[0] * FIGURE_DPI), int(FIGURE_SIZE_IN[1] * FIGURE_DPI))

LATENCY_VS_CLIENTS = "latency_vs_clients.png"
QPS_VS_CLIENTS = "qps_vs_clients.png"
LATENCY_CDF = "latency_cdf.png"
CLIENT_FAIRNESS = "client_fairness.png"
TELEMETRY = "telemetry.png"
LATENCY_BY_GROUP = "latency_by_group.png"
LATENCY_BREAKDOWN = "latency_breakdown.png"
LINK_TIMELINE = "link_timeline.png"
RESULT_FILE = "result.json"
VS_RESOURCES = "throughput_latency_vs_resources.png"
REPORT_HTML = "report.html"

# File name -> (caption on the report page, why it is left out when it is).
FIGURES: dict[str, tuple[str, str]] = {
    LATENCY_BY_GROUP: (
        "Latency per client group of the points whose clients came in groups, each on its own network "
        "profile: p50 solid, p99 hatched, mean over repeats (bars: min-max).",
        "no point has client groups",
    ),
    LATENCY_BREAKDOWN: (
        "Where the time went: mean latency split into network and client (LoadGen's latency less the "
        "server's own time), server queueing and server compute (the SUT agent's per-sample timings), "
        "per point and, for client groups, per group; mean over repeats.",
        "no point has the SUT's timings",
    ),
    LINK_TIMELINE: (
        "Link state and latency on one time axis, for points on a time-varying link (SingleStream): each "
        "sample's latency at the time it was issued (top) and the link rate the node agent applied, read "
        "back from the kernel (bottom).",
        "no SingleStream point ran on a time-varying link",
    ),
    LATENCY_VS_CLIENTS: (
        "Latency percentiles (p50 solid, p90 dashed, p99 dotted) of all clients' samples vs the number of "
        "clients, one panel per scenario, one colour per network profile.",
        "no point has an aggregate latency",
    ),
    QPS_VS_CLIENTS: (
        "Samples per second summed over all clients vs the number of clients, one panel per scenario, "
        "one colour per network profile.",
        "no point has a result",
    ),
    LATENCY_CDF: (
        "Latency CDF per network profile and client count: from every sample's latency where the clients "
        "recorded them (several clients), else a step curve through LoadGen's quantiles (a lower bound).",
        "no point has latencies",
    ),
    CLIENT_FAIRNESS: (
        "Per-client samples/s and p99 latency of each point with several clients; J is Jain's fairness "
        "index of the clients' samples/s (1 = perfectly equal, 1/n = one client gets everything).",
        "no point has several clients",
    ),
    TELEMETRY: (
        "Node telemetry over the experiment: CPU, memory and (where present) GPU utilisation, seconds "
        "from the first sample, one colour per point.",
        "no telemetry was recorded",
    ),
    VS_RESOURCES: (
        "Samples per second (left) and latency p50 solid, p99 dotted (right) vs the CPU cores the SUT was "
        "confined to (read back from its cgroup), one line per scenario, clients and network profile.",
        "the experiment does not sweep SUT placements",
    ),
}

SCENARIO_NAMES: dict[int, str] = {
    common_pb2.SCENARIO_SINGLE_STREAM: "SingleStream",
    common_pb2.SCENARIO_MULTI_STREAM: "MultiStream",
    common_pb2.SCENARIO_SERVER: "Server",
    common_pb2.SCENARIO_OFFLINE: "Offline",
}

# LoadGen's quantiles as LatencyStats holds them, with the fraction of samples at or below each.
QUANTILE_LEVELS: tuple[tuple[str, float], ...] = (
    ("min", 0.0), ("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p97", 0.97), ("p99", 0.99), ("p999", 0.999),
    ("max", 1.0),
)
PLOTTED_PERCENTILES: tuple[tuple[str, str], ...] = (("p50", "-"), ("p90", "--"), ("p99", ":"))
CLIENT_LINESTYLES = ("-", "--", "-.", ":")
# An empirical CDF of millions of samples is drawn through this many of them, tail kept dense.
CDF_MAX_POINTS = 2000
# A y (or x) axis spanning more than this ratio is drawn on a log scale, so that a 2 ms unshaped
# profile and a 600 ms satellite one are both readable.
LOG_SCALE_RATIO = 30.0

LatencyArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
T = TypeVar("T")


# --- data ------------------------------------------------------------------------------------


@dataclass
class RepeatData:
    """One repeat of a point: what LoadGen reported, and the files the figures need."""

    repeat: int
    # Over all clients: summed throughput, percentiles over the pooled samples.
    aggregate: common_pb2.TestResult
    # Client index (0-based) -> that client's own result.
    clients: dict[int, common_pb2.TestResult] = field(default_factory=dict)
    # Client index -> latency of every sample in ns; only stored when the point has several clients.
    sample_latencies: dict[int, LatencyArray] = field(default_factory=dict)
    telemetry: list[common_pb2.TelemetrySample] = field(default_factory=list)
    # Names of every file stored for the repeat, and where they are.
    files: list[str] = field(default_factory=list)
    result_uri: str = ""
    # Per client group, when the run's clients came in groups on their own profiles.
    groups: list[controller_pb2.GroupResult] = field(default_factory=list)
    # Where the time went (mecbench/breakdown.py), when the SUT reported its timings.
    breakdown: dict[str, Any] | None = None
    # Time-varying links: each schedule's requested and applied steps (result.json's network.schedules).
    schedules: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PointData:
    """One run of the experiment: a point of the sweep, or a probe of a peak search."""

    run_id: str
    selector: str
    scenario: int
    clients: int
    network_profile: str
    # Server scenario: the total target over all clients; 0 otherwise.
    target_qps: float
    state: common_pb2.RunState.ValueType
    error: str = ""
    # A probe of the peak search rather than a point of the sweep: listed, not plotted vs clients.
    peak_probe: bool = False
    repeats: list[RepeatData] = field(default_factory=list)
    # CPU cores the SUT was confined to (its cgroup's quota read back; else what was asked); 0 = none.
    cpu_cores: float = 0.0
    # Its link changes during the test (a schedule): the applied timeline is fetched.
    has_schedule: bool = False

    @property
    def scenario_name(self) -> str:
        return SCENARIO_NAMES.get(self.scenario, "unspecified")

    @property
    def series(self) -> str:
        """What a figure's panel groups points by: the scenario, and the offered load for Server."""
        if self.scenario == common_pb2.SCENARIO_SERVER and self.target_qps:
            return f"Server, {round(self.target_qps, 6):g} QPS total"
        return self.scenario_name


@dataclass
class ReportData:
    """Everything the figures and the page need, fetched once."""

    experiment: controller_pb2.Experiment
    points: list[PointData] = field(default_factory=list)
    # What could not be fetched or read; shown on the page.
    notes: list[str] = field(default_factory=list)

    @property
    def sweep_points(self) -> list[PointData]:
        return [p for p in self.points if not p.peak_probe]


def collect_report_data(client: Client, experiment_id: str) -> ReportData:
    """Fetch an experiment, every run of it (calibration runs aside: the page gives their
    numbers) and, per repeat, its telemetry and per-client sample latencies where stored. A
    file that cannot be read costs its figure detail (a note says so), never the report."""
    experiment = client.get_experiment(experiment_id)
    records = {(r.run_id, r.repeat): r for r in client.list_results(experiment_id=experiment_id)}
    probes = {run_id for peak in experiment.peaks for run_id in peak.run_ids}
    calibration = set(experiment.calibration.run_ids)
    data = ReportData(experiment=experiment)
    for run_id in dict.fromkeys(experiment.run_ids):
        if run_id in calibration:
            continue
        run = client.get_run(run_id)
        spec = run.spec
        clients = spec.clients or 1
        scenario = spec.settings.scenario
        point = PointData(
            run_id=run_id,
            selector=spec.selector,
            scenario=scenario,
            clients=clients,
            network_profile=spec.network.name or "+".join(
                f"{g.name}={g.network.name or 'unshaped'}" for g in spec.client_groups) or "unshaped",
            # Each client's settings carry its share of the point's offered load.
            target_qps=spec.settings.server_target_qps * clients if scenario == common_pb2.SCENARIO_SERVER else 0.0,
            state=run.state,
            error=run.error,
            peak_probe=run_id in probes,
            has_schedule=_has_schedule(spec),
        )
        for result in run.results:
            if result.HasField("placement") and not point.cpu_cores:
                point.cpu_cores = result.placement.applied.cpu_cores or result.placement.requested.cpu_cores
            record = records.get((run_id, result.repeat))
            repeat = RepeatData(
                repeat=result.repeat,
                aggregate=result.aggregate,
                clients={c.client: c.result for c in result.clients},
                files=list(record.files) if record is not None else [],
                result_uri=result.result_uri,
                groups=list(result.groups),
                breakdown=latency_breakdown(result),
            )
            if _has_schedule(spec):
                repeat.files = [*repeat.files, RESULT_FILE] if RESULT_FILE not in repeat.files else repeat.files
            _fetch_files(client, point, repeat, data.notes)
            point.repeats.append(repeat)
        data.points.append(point)
    return data


def _fetch_files(client: Client, point: PointData, repeat: RepeatData, notes: list[str]) -> None:
    """Read the repeat's telemetry and sample latencies, one file per request so that no single
    answer nears gRPC's message limit."""
    for name in repeat.files:
        is_latencies = name.rsplit("/", 1)[-1] == SAMPLE_LATENCIES_NAME
        is_result = name == RESULT_FILE and _has_schedule_point(point)
        if name != TELEMETRY_FILE and not is_latencies and not is_result:
            continue
        where = f"{point.selector} repeat {repeat.repeat}: {name}"
        request = controller_pb2.GetResultRequest(run_id=point.run_id, repeat=repeat.repeat, include_files=[name])
        try:
            response: controller_pb2.GetResultResponse = client.stub.GetResult(request, timeout=FILE_TIMEOUT_S)
        except grpc.RpcError as exc:
            notes.append(f"{where} not read ({exc.code().name}: {exc.details()})")
            log.warning("report_file_unreadable", file=name, run_id=point.run_id, error=str(exc.details()))
            continue
        content = b"".join(chunk.data for chunk in response.files if chunk.name == name)
        try:
            if is_latencies:
                repeat.sample_latencies[_client_of(name)] = read_latencies(content)
            elif is_result:
                repeat.schedules = list(json.loads(content).get("network", {}).get("schedules", []))
            else:
                repeat.telemetry = read_telemetry(content)
        except (ValueError, EOFError, OSError) as exc:  # np.load's ways of saying "not a .npy"
            notes.append(f"{where} unreadable: {exc}")
            log.warning("report_file_unreadable", file=name, run_id=point.run_id, error=str(exc))


def _has_schedule(spec: controller_pb2.RunSpec) -> bool:
    return spec.network.HasField("schedule") or any(g.network.HasField("schedule") for g in spec.client_groups)


def _has_schedule_point(point: PointData) -> bool:
    return point.has_schedule


def _client_of(name: str) -> int:
    """`client-3/sample_latencies.npy` -> 3; a single client's files have no prefix."""
    folder = name.rpartition("/")[0]
    if folder.startswith("client-") and folder.removeprefix("client-").isdigit():
        return int(folder.removeprefix("client-"))
    return 0


def read_latencies(content: bytes) -> LatencyArray:
    """Per-sample latencies (ns) from sample_latencies.npy: int64 rows of (query sequence, latency ns)."""
    array = np.load(io.BytesIO(content), allow_pickle=False)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"expected rows of (query sequence, latency ns), got shape {array.shape}")
    latencies: LatencyArray = array[:, 1].astype(np.int64)
    return latencies


def read_telemetry(content: bytes) -> list[common_pb2.TelemetrySample]:
    """TelemetrySample messages from telemetry.json (a JSON list of them)."""
    try:
        items = json.loads(content)
        if not isinstance(items, list):
            raise ValueError("expected a JSON list of telemetry samples")
        return [json_format.ParseDict(item, common_pb2.TelemetrySample(), ignore_unknown_fields=True)
                for item in items]
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from exc


# --- numbers behind the figures ----------------------------------------------------------------


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index, (sum x)^2 / (n * sum x^2): 1 when every client gets the same,
    1/n when one client gets everything."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("Jain's index of no values")
    if np.any(array < 0):
        raise ValueError("Jain's index of negative values")
    squares = float(np.sum(array * array))
    if squares == 0:
        # Nobody got anything: equally so.
        return 1.0
    return float(np.sum(array) ** 2 / (array.size * squares))


def quantile_step_cdf(stats: common_pb2.LatencyStats) -> tuple[FloatArray, FloatArray]:
    """(latency ms, fraction of samples) through LoadGen's quantiles, to be drawn as steps after
    each point: at p50's latency at least half the samples are done, and so on. Between two
    quantiles the true CDF is at or above the step, so the curve is a lower bound. Quantiles
    that are not set (0) are left out; fewer than two give empty arrays."""
    xs: list[float] = []
    ys: list[float] = []
    for name, level in QUANTILE_LEVELS:
        ns = durations.to_ns(getattr(stats, name))
        if ns > 0:
            xs.append(ns / 1e6)
            ys.append(level)
    if len(xs) < 2:
        return np.array([], dtype=np.float64), np.array([], dtype=np.float64)
    # LoadGen's quantiles are monotone; the accumulate guards against a rounded one that is not.
    return np.maximum.accumulate(np.array(xs, dtype=np.float64)), np.array(ys, dtype=np.float64)


def empirical_cdf(latencies_ns: npt.ArrayLike, max_points: int = CDF_MAX_POINTS) -> tuple[FloatArray, FloatArray]:
    """(latency ms, fraction of samples at or below it) of every sample, thinned to at most about
    `max_points`, spaced evenly in probability and densely in the tail where p99.9 lives."""
    ordered = np.sort(np.asarray(latencies_ns, dtype=np.int64).ravel())
    count = ordered.size
    if count == 0:
        return np.array([], dtype=np.float64), np.array([], dtype=np.float64)
    fractions = np.arange(1, count + 1, dtype=np.float64) / count
    if count > max_points:
        even = np.linspace(0, count - 1, max_points // 2).astype(np.int64)
        tail = count - np.geomspace(1, count, max_points // 2).astype(np.int64)
        keep = np.unique(np.concatenate([even, tail, [0, count - 1]]))
        ordered, fractions = ordered[keep], fractions[keep]
    return ordered.astype(np.float64) / 1e6, fractions


def _ms(duration: Duration) -> float:
    return durations.to_ns(duration) / 1e6


def _has_latency(stats: common_pb2.LatencyStats) -> bool:
    # Several clients without every client's samples have an aggregate with no latency at all.
    return durations.to_ns(stats.p50) > 0 or durations.to_ns(stats.max) > 0


def _mean_stats(all_stats: Sequence[common_pb2.LatencyStats]) -> common_pb2.LatencyStats:
    """Each quantile's mean over repeats."""
    mean = common_pb2.LatencyStats()
    for name, _level in QUANTILE_LEVELS:
        values = [durations.to_ns(getattr(s, name)) for s in all_stats]
        getattr(mean, name).CopyFrom(durations.from_ns(sum(values) / len(values)))
    return mean


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, and how far below and above it the smallest and largest are."""
    mean = float(np.mean(values))
    return mean, mean - min(values), max(values) - mean


def _unique(items: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(items))


# --- figures ---------------------------------------------------------------------------------


def render_figures(data: ReportData, out_dir: Path) -> list[Path]:
    """Draw every figure that has data into `out_dir` and return their paths. A figure with
    nothing to show is not drawn, and a stale copy of it from an earlier report is removed, so
    the folder holds exactly this report's figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers: dict[str, Callable[[ReportData, Figure], bool]] = {
        LATENCY_VS_CLIENTS: _draw_latency_vs_clients,
        QPS_VS_CLIENTS: _draw_qps_vs_clients,
        LATENCY_CDF: _draw_latency_cdf,
        CLIENT_FAIRNESS: _draw_client_fairness,
        TELEMETRY: _draw_telemetry,
        LATENCY_BY_GROUP: _draw_latency_by_group,
        LATENCY_BREAKDOWN: _draw_latency_breakdown,
        LINK_TIMELINE: _draw_link_timeline,
        VS_RESOURCES: _draw_vs_resources,
    }
    written = []
    for name, draw in drawers.items():
        path = out_dir / name
        figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="constrained")
        if draw(data, figure):
            figure.savefig(path, dpi=FIGURE_DPI, format="png", facecolor="white")
            written.append(path)
        else:
            path.unlink(missing_ok=True)
    return written


def _colours(names: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(index % palette.N) for index, name in enumerate(names)}


def _panels(figure: Figure, count: int) -> list[Axes]:
    """`count` panels, at most three a row; unused cells of the grid are hidden."""
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    grid = figure.subplots(rows, columns, squeeze=False)
    axes: list[Axes] = list(grid.ravel())
    for unused in axes[count:]:
        unused.set_visible(False)
    return axes[:count]


def _auto_log(axis: Axes, values: Iterable[float], which: str = "y") -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        if which == "y":
            axis.set_yscale("log")
        else:
            axis.set_xscale("log")


def _title(data: ReportData, what: str) -> str:
    return f"{data.experiment.experiment_id}: {what}"


def _draw_vs_clients(
    data: ReportData,
    figure: Figure,
    lines: Sequence[tuple[str, str, Callable[[common_pb2.TestResult], float | None]]],
    ylabel: str,
    title: str,
    targets: dict[str, float] | None = None,
) -> bool:
    """One panel per series (scenario), one colour per network profile, one line per
    (profile, what): the mean over repeats at each client count, min-max bars over repeats.
    `targets` (series -> value) draws a reference line, and then the axis starts at zero so that
    a shortfall reads at its true size."""
    def usable(point: PointData) -> bool:
        return any(value(r.aggregate) is not None for r in point.repeats for _, _, value in lines)

    points = [p for p in data.sweep_points if usable(p)]
    if not points:
        return False
    profiles = _unique(p.network_profile for p in points)
    colours = _colours(profiles)
    for axis, series in zip(_panels(figure, len(_unique(p.series for p in points))),
                            _unique(p.series for p in points), strict=True):
        plotted: list[float] = []
        ticks: set[int] = set()
        for profile in profiles:
            chosen = sorted((p for p in points if p.series == series and p.network_profile == profile),
                            key=lambda p: p.clients)
            for label, style, value in lines:
                xs, means, below, above = [], [], [], []
                for point in chosen:
                    values = [v for r in point.repeats if (v := value(r.aggregate)) is not None]
                    if not values:
                        continue
                    mean, low, high = _spread(values)
                    xs.append(point.clients)
                    means.append(mean)
                    below.append(low)
                    above.append(high)
                    plotted += values
                if not xs:
                    continue
                ticks.update(xs)
                spread = [below, above] if any(below) or any(above) else None
                axis.errorbar(xs, means, yerr=spread, color=colours[profile], linestyle=style, marker="o",
                              markersize=4, capsize=3, label=f"{profile} {label}".strip())
        axis.set_title(series)
        axis.set_xlabel("clients")
        axis.set_ylabel(ylabel)
        axis.set_xticks(sorted(ticks))
        target = (targets or {}).get(series)
        if target:
            axis.axhline(target, color="grey", linestyle=":", label=f"target {target:g}")
        _auto_log(axis, plotted)
        if targets is not None and axis.get_yscale() == "linear":
            # Headroom above the target line, which would otherwise sit on the frame.
            axis.set_ylim(0, max(axis.get_ylim()[1], (target or 0) * 1.1))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(_title(data, title))
    return True


def _percentile(name: str) -> Callable[[common_pb2.TestResult], float | None]:
    def value(result: common_pb2.TestResult) -> float | None:
        return _ms(getattr(result.latency, name)) if _has_latency(result.latency) else None

    return value


def _draw_latency_vs_clients(data: ReportData, figure: Figure) -> bool:
    lines = [(name, style, _percentile(name)) for name, style in PLOTTED_PERCENTILES]
    return _draw_vs_clients(data, figure, lines, "latency (ms)",
                            "latency percentiles vs clients (mean over repeats, bars: min-max)")


def _draw_qps_vs_clients(data: ReportData, figure: Figure) -> bool:
    def throughput(result: common_pb2.TestResult) -> float | None:
        return result.samples_per_second

    # Server points are offered a fixed total; the line shows how much of it was completed.
    targets = {p.series: p.target_qps for p in data.sweep_points}
    return _draw_vs_clients(data, figure, [("", "-", throughput)], "samples/s (sum over clients)",
                            "throughput vs clients (mean over repeats, bars: min-max)", targets)


def _draw_vs_resources(data: ReportData, figure: Figure) -> bool:
    """Throughput and latency against the SUT's CPU cores, where the sweep placed it at two or
    more: the mean over repeats, min-max bars."""
    points = [p for p in data.sweep_points if p.cpu_cores and p.repeats]
    if len({p.cpu_cores for p in points}) < 2:
        return False
    throughput_axis, latency_axis = _panels(figure, 2)
    lines = _unique((p.series, p.clients, p.network_profile) for p in points)
    colours = _colours([f"{s}, {c} clients, {n}" for s, c, n in lines])
    for series, clients, profile in lines:
        label = f"{series}, {clients} clients, {profile}"
        chosen = sorted((p for p in points if (p.series, p.clients, p.network_profile) == (series, clients, profile)),
                        key=lambda p: p.cpu_cores)
        draws: list[tuple[Axes, str, str, Callable[[common_pb2.TestResult], float | None]]] = [
            (throughput_axis, "", "-", lambda r: r.samples_per_second),
            (latency_axis, " p50", "-", _percentile("p50")),
            (latency_axis, " p99", ":", _percentile("p99")),
        ]
        for axis, suffix, style, value in draws:
            xs, means, below, above = [], [], [], []
            for point in chosen:
                values = [v for r in point.repeats if (v := value(r.aggregate)) is not None]
                if values:
                    mean, low, high = _spread(values)
                    xs.append(point.cpu_cores)
                    means.append(mean)
                    below.append(low)
                    above.append(high)
            if xs:
                axis.errorbar(xs, means, yerr=[below, above], color=colours[label], linestyle=style, marker="o",
                              markersize=4, capsize=3, label=label + suffix)
    for axis, ylabel, title in ((throughput_axis, "samples/s (sum over clients)", "throughput"),
                                (latency_axis, "latency (ms)", "latency")):
        axis.set_xlabel("SUT CPU cores (cgroup quota)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.set_xticks(sorted({p.cpu_cores for p in points}))
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(_title(data, "throughput and latency vs SUT resources (mean over repeats, bars: min-max)"))
    return True


def _draw_latency_cdf(data: ReportData, figure: Figure) -> bool:
    """One panel per series; one curve per (profile, clients): pooled samples where every client
    of every repeat recorded them, else steps through the repeats' mean quantiles."""
    curves: dict[str, list[tuple[str, int, str, FloatArray, FloatArray]]] = {}
    for point in data.sweep_points:
        repeats = [r for r in point.repeats if r.aggregate.ByteSize()]
        if not repeats:
            continue
        complete = all(r.sample_latencies and len(r.sample_latencies) >= len(r.clients) for r in repeats)
        if complete:
            xs, ys = empirical_cdf(np.concatenate([a for r in repeats for a in r.sample_latencies.values()]))
            source = "all samples"
        else:
            stats = [r.aggregate.latency for r in repeats if _has_latency(r.aggregate.latency)]
            if not stats:
                continue
            xs, ys = quantile_step_cdf(_mean_stats(stats))
            source = "LoadGen quantiles"
        if xs.size:
            curves.setdefault(point.series, []).append((point.network_profile, point.clients, source, xs, ys))
    if not curves:
        return False
    profiles = _unique(profile for series in curves.values() for profile, *_ in series)
    colours = _colours(profiles)
    client_counts = sorted({clients for series in curves.values() for _, clients, *_ in series})
    for axis, (series, drawn) in zip(_panels(figure, len(curves)), curves.items(), strict=True):
        for profile, clients, source, xs, ys in sorted(drawn, key=lambda c: (profiles.index(c[0]), c[1])):
            style = CLIENT_LINESTYLES[client_counts.index(clients) % len(CLIENT_LINESTYLES)]
            label = f"{profile}, {clients} client{'s' if clients > 1 else ''} ({source})"
            axis.step(xs, ys, where="post", color=colours[profile], linestyle=style, label=label)
        _auto_log(axis, [x for *_, xs, _ys in drawn for x in (float(xs[0]), float(xs[-1]))], which="x")
        axis.set_title(series)
        axis.set_xlabel("latency (ms)")
        axis.set_ylabel("fraction of samples at or below")
        axis.set_ylim(0, 1.02)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small", loc="lower right")
    figure.suptitle(_title(data, "latency CDF per network profile and client count"))
    return True


def _draw_client_fairness(data: ReportData, figure: Figure) -> bool:
    """Bar groups, one per point with several clients: each client's samples/s (top) and p99
    (bottom), mean over repeats with min-max bars; Jain's index of samples/s under each group."""
    points = [p for p in data.sweep_points if any(len(r.clients) > 1 for r in p.repeats)]
    if not points:
        return False
    width_clients = max(len(r.clients) for p in points for r in p.repeats)
    top, bottom = figure.subplots(2, 1, sharex=True)
    palette = _colours([str(c) for c in range(width_clients)])
    labels = []
    p99s: list[float] = []
    in_legend: set[int] = set()
    for group, point in enumerate(points):
        repeats = [r for r in point.repeats if len(r.clients) > 1]
        clients = sorted({c for r in repeats for c in r.clients})
        throughput_means = []
        # Each group fills its slot whatever its client count; colours follow the client.
        bar = 0.8 / len(clients)
        for slot, client in enumerate(clients):
            x = group - 0.4 + bar * (slot + 0.5)
            label = None if slot in in_legend else f"client {client}"
            in_legend.add(slot)
            rates = [r.clients[client].samples_per_second for r in repeats if client in r.clients]
            mean, low, high = _spread(rates)
            throughput_means.append(mean)
            top.bar(x, mean, bar, yerr=[[low], [high]] if len(rates) > 1 else None, capsize=2,
                    color=palette[str(slot)], label=label)
            tails = [_ms(r.clients[client].latency.p99) for r in repeats
                     if client in r.clients and _has_latency(r.clients[client].latency)]
            if tails:
                mean, low, high = _spread(tails)
                p99s += tails
                bottom.bar(x, mean, bar, yerr=[[low], [high]] if len(tails) > 1 else None, capsize=2,
                           color=palette[str(slot)])
        labels.append(f"{point.selector}\nJ = {jain_index(throughput_means):.3f}")
    top.set_ylabel("samples/s per client")
    top.set_title("throughput per client (mean over repeats, bars: min-max)")
    bottom.set_ylabel("p99 latency per client (ms)")
    bottom.set_title("p99 latency per client")
    _auto_log(bottom, p99s)
    bottom.set_xticks(range(len(points)))
    bottom.set_xticklabels(labels, rotation=30 if len(points) > 4 else 0, ha="right" if len(points) > 4 else "center",
                           fontsize="small")
    for axis in (top, bottom):
        axis.grid(True, axis="y", alpha=0.3)
    if width_clients <= 16:
        # Headroom so that the legend sits above the bars rather than on them.
        top.set_ylim(0, top.get_ylim()[1] * (1.12 + 0.08 * math.ceil(width_clients / 8)))
        top.legend(fontsize="small", ncols=min(width_clients, 8), loc="upper right")
    figure.suptitle(_title(data, "per-client fairness (J: Jain's index of samples/s, 1 = equal)"))
    return True


def _draw_latency_by_group(data: ReportData, figure: Figure) -> bool:
    """Bar groups, one per point whose clients came in groups: each group's p50 (solid) and p99
    (hatched), mean over repeats with min-max bars, named with its network profile."""
    points = [p for p in data.sweep_points if any(r.groups for r in p.repeats)]
    if not points:
        return False
    axis = figure.subplots()
    names = _unique(g.name for p in points for r in p.repeats for g in r.groups)
    palette = _colours(names)
    labels, values = [], []
    in_legend: set[str] = set()
    for slot_of_point, point in enumerate(points):
        groups = _unique(g.name for r in point.repeats for g in r.groups)
        bar = 0.8 / (2 * len(groups))
        profiles = {}
        for slot, name in enumerate(groups):
            entries = [g for r in point.repeats for g in r.groups if g.name == name and _has_latency(g.result.latency)]
            if not entries:
                continue
            profiles[name] = entries[0].network_profile
            for offset, (which, hatch) in enumerate((("p50", ""), ("p99", "//"))):
                figures = [_ms(getattr(g.result.latency, which)) for g in entries]
                mean, low, high = _spread(figures)
                values += figures
                x = slot_of_point - 0.4 + bar * (2 * slot + offset + 0.5)
                label = f"{name} {which}" if f"{name} {which}" not in in_legend else None
                in_legend.add(f"{name} {which}")
                axis.bar(x, mean, bar, yerr=[[low], [high]] if len(figures) > 1 else None, capsize=2,
                         color=palette[name], hatch=hatch, edgecolor="black", linewidth=0.5, label=label)
        labels.append(point.selector + "\n" + ", ".join(f"{n}: {p}" for n, p in profiles.items()))
    axis.set_xticks(range(len(points)))
    axis.set_xticklabels(labels, fontsize="small")
    axis.set_ylabel("latency (ms)")
    _auto_log(axis, values)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize="small", ncols=min(len(names) * 2, 6))
    figure.suptitle(_title(data, "latency per client group (p50 solid, p99 hatched; mean over repeats)"))
    return True


BREAKDOWN_PARTS = (
    ("network_and_client_ms", "network + client", "#4c72b0"),
    ("server_queue_ms", "server queueing", "#dd8452"),
    ("server_compute_ms", "server compute", "#55a868"),
)


def _draw_latency_breakdown(data: ReportData, figure: Figure) -> bool:
    """A stacked bar per point (per client group where it has groups): mean network-and-client,
    server queueing and server compute, each the mean over the point's repeats."""
    bars: list[tuple[str, dict[str, float]]] = []
    for point in data.sweep_points:
        found = [r.breakdown for r in point.repeats if r.breakdown]
        if not found:
            continue
        names = _unique(name for b in found for name in b.get("groups", {}))
        entries = [(f"{point.selector}", [b["pooled"] for b in found])]
        entries += [(f"{point.selector}\n{name} ({found[0]['groups'][name]['network_profile']})",
                     [b["groups"][name] for b in found if name in b.get("groups", {})]) for name in names]
        for label, splits in entries:
            bars.append((label, {key: float(np.mean([s[key] for s in splits])) for key, _, _ in BREAKDOWN_PARTS}))
    if not bars:
        return False
    axis = figure.subplots()
    bottom = np.zeros(len(bars))
    for key, label, colour in BREAKDOWN_PARTS:
        values = np.array([b[key] for _, b in bars])
        axis.bar(range(len(bars)), values, 0.6, bottom=bottom, label=label, color=colour)
        bottom += values
    axis.set_xticks(range(len(bars)))
    axis.set_xticklabels([label for label, _ in bars], fontsize="small", rotation=30 if len(bars) > 4 else 0,
                         ha="right" if len(bars) > 4 else "center")
    axis.set_ylabel("mean latency (ms)")
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize="small")
    figure.suptitle(_title(data, "where the time went (mean latency, stacked)"))
    return True


def _draw_link_timeline(data: ReportData, figure: Figure) -> bool:
    """Top: each sample's latency at its issue time; bottom: the applied link rate, same axis.
    SingleStream only: its queries run back to back, so a sample's issue time is the sum of the
    latencies before it (other scenarios keep no per-sample issue time)."""
    shown = [
        (point, repeat) for point in data.sweep_points if point.scenario == common_pb2.SCENARIO_SINGLE_STREAM
        for repeat in point.repeats[:1] if repeat.schedules and repeat.sample_latencies
    ]
    if not shown:
        return False
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    palette = _colours([f"{p.selector}" for p, _ in shown])
    rates: list[float] = []
    for point, repeat in shown:
        colour = palette[point.selector]
        for client, latencies in sorted(repeat.sample_latencies.items()):
            latency_ms = latencies / 1e6
            issued_s = np.concatenate([[0.0], np.cumsum(latency_ms)[:-1] / 1e3])
            top.plot(issued_s, latency_ms, ".", markersize=2, color=colour,
                     label=point.selector if client == min(repeat.sample_latencies) else None)
        for timeline in repeat.schedules:
            steps = [
                (float(str(step.get("applied", "0s")).rstrip("s")),
                 float(step.get("params", {}).get("rate_bps", "nan")) / 1e6)
                for step in timeline.get("applied", [])
            ]
            if not steps:
                continue
            end = max(float(np.sum(lat)) / 1e9 for lat in repeat.sample_latencies.values())
            xs = [t for t, _ in steps] + [max(end, steps[-1][0])]
            ys = [r for _, r in steps] + [steps[-1][1]]
            rates += ys
            bottom.step(xs, ys, where="post", color=colour,
                        label=f"client {timeline.get('client', 0)} ({timeline.get('profile', '')})")
    top.set_ylabel("latency (ms)")
    _auto_log(top, [v for _, r in shown for lat in r.sample_latencies.values() for v in (lat / 1e6)])
    top.grid(True, alpha=0.3)
    top.legend(fontsize="small", markerscale=4)
    bottom.set_ylabel("link rate (Mbit/s)")
    bottom.set_xlabel("seconds into the test")
    bottom.grid(True, alpha=0.3)
    if rates:
        bottom.set_ylim(0, max((r for r in rates if math.isfinite(r)), default=1.0) * 1.15)
        bottom.legend(fontsize="small")
    figure.suptitle(_title(data, "link state and latency over the test"))
    return True


def _draw_telemetry(data: ReportData, figure: Figure) -> bool:
    """CPU, memory and GPU utilisation over the experiment's time, each point in its colour;
    each repeat is its own segment, so the gaps between repeats stay visible as gaps."""
    with_samples = [p for p in data.points if any(r.telemetry for r in p.repeats)]
    if not with_samples:
        return False
    start = min(s.time.ToNanoseconds() for p in with_samples for r in p.repeats for s in r.telemetry)
    has_gpu = any(s.gpus for p in with_samples for r in p.repeats for s in r.telemetry)
    axes = list(figure.subplots(3 if has_gpu else 2, 1, sharex=True, squeeze=False).ravel())
    colours = _colours([p.selector for p in with_samples])
    nodes = _unique(s.node for p in with_samples for r in p.repeats for s in r.telemetry)
    for point in with_samples:
        colour = colours[point.selector]
        for repeat in point.repeats:
            for node in nodes:
                samples = sorted((s for s in repeat.telemetry if s.node == node), key=lambda s: s.time.ToNanoseconds())
                if not samples:
                    continue
                style = CLIENT_LINESTYLES[nodes.index(node) % len(CLIENT_LINESTYLES)]
                times = [(s.time.ToNanoseconds() - start) / 1e9 for s in samples]
                axes[0].plot(times, [s.cpu_percent for s in samples], color=colour, linestyle=style)
                axes[1].plot(times, [s.memory_used_bytes / 2**30 for s in samples], color=colour, linestyle=style)
                if has_gpu:
                    indices = _unique(g.index for s in samples for g in s.gpus)
                    for index in indices:
                        readings = [(t, g.utilization_percent) for t, s in zip(times, samples, strict=True)
                                    for g in s.gpus if g.index == index]
                        axes[2].plot([t for t, _ in readings], [u for _, u in readings], color=colour,
                                     linestyle=style, marker=".", markersize=2)
        # One legend entry per point, however many repeats and nodes it has.
        axes[0].plot([], [], color=colour, label=point.selector)
    axes[0].set_ylabel("CPU (%)")
    axes[0].set_title("CPU utilisation" + (f" (line style per node: {', '.join(nodes)})" if len(nodes) > 1 else ""))
    axes[1].set_ylabel("memory used (GiB)")
    axes[1].set_title("memory used")
    if has_gpu:
        axes[2].set_ylabel("GPU utilisation (%)")
        axes[2].set_title("GPU utilisation")
    axes[-1].set_xlabel("time since the first sample (s)")
    for axis in axes:
        axis.grid(True, alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(nbins=12))
    entries = len(with_samples)
    figure.legend(loc="outside right upper", fontsize="x-small" if entries > 12 else "small",
                  ncols=1 if entries <= 24 else 2)
    figure.suptitle(_title(data, "node telemetry over the run"))
    return True


# --- the page --------------------------------------------------------------------------------


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Render the figures into `out_dir` and write `report.html` beside them: the figures as
    relative <img> links and a table of every point. The page needs nothing else: no scripts,
    no network. Returns the page's path."""
    figures = render_figures(data, out_dir)
    page = out_dir / REPORT_HTML
    page.write_text(report_html(data, [f.name for f in figures]), encoding="utf-8")
    return page


def report_html(data: ReportData, figures: Sequence[str]) -> str:
    """The page for `data`, embedding `figures` (file names relative to the page)."""
    experiment = data.experiment
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>MECBench report: {e(experiment.experiment_id)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Experiment {e(experiment.experiment_id)}</h1>",
        f"<p>{e(_experiment_line(experiment))}</p>",
    ]
    if experiment.error:
        parts.append(f'<p class="bad">Error: {e(experiment.error)}</p>')
    if experiment.HasField("calibration"):
        parts.append(f"<p>{e(_calibration_line(experiment.calibration))}</p>")
    if data.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in data.notes) + "</ul>")
    parts.append("<h2>Points</h2>")
    parts.append(_points_table(data.points))
    if experiment.peaks:
        parts.append("<h2>Peak search</h2>")
        parts.append(_peaks_table(experiment.peaks))
    parts.append("<h2>Figures</h2>")
    for name in figures:
        caption = FIGURES.get(name, ("", ""))[0]
        parts.append(
            f'<figure><img src="{e(name)}" alt="{e(Path(name).stem.replace("_", " "))}" width="{FIGURE_SIZE_PX[0]}" '
            f'height="{FIGURE_SIZE_PX[1]}"><figcaption>{e(caption)}</figcaption></figure>'
        )
    skipped = [(name, why) for name, (_caption, why) in FIGURES.items() if name not in figures]
    if skipped:
        parts.append("<p>Not drawn: " + "; ".join(f"{e(name)} ({e(why)})" for name, why in skipped) + ".</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1300px}"
    "table{border-collapse:collapse;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:0.25em 0.5em;text-align:right}"
    "th{background:#f0f0f0}td.text{text-align:left}"
    ".bad{color:#b00}figure{margin:1.5em 0}img{max-width:100%;height:auto}"
)


def _experiment_line(experiment: controller_pb2.Experiment) -> str:
    state = common_pb2.RunState.Name(experiment.state).removeprefix("RUN_STATE_")
    line = f"State {state}, {experiment.points_done} of {experiment.points_total} points done"
    if experiment.created_at.ToNanoseconds():
        line += f", created {experiment.created_at.ToJsonString()}"
    if experiment.finished_at.ToNanoseconds():
        line += f", finished {experiment.finished_at.ToJsonString()}"
    if experiment.spec.model:
        line += f", model {experiment.spec.model}"
    backend = experiment.spec.sut.WhichOneof("backend")
    if backend:
        line += f", SUT backend {backend}"
    return line + "."


def _calibration_line(calibration: controller_pb2.HarnessCalibration) -> str:
    if calibration.error:
        return f"Harness calibration failed: {calibration.error}"
    latency = calibration.single_stream_latency
    return (
        f"Harness floor (zero-time SUT, one client, unshaped): SingleStream p50 {_ms(latency.p50):.3f} ms, "
        f"p99 {_ms(latency.p99):.3f} ms; Offline {calibration.offline_samples_per_second:.1f} samples/s."
    )


def _numbers(values: Sequence[float], digits: int) -> str:
    """The mean, with the min-max range over repeats when there are several."""
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _points_table(points: Sequence[PointData]) -> str:
    results = [r.aggregate for p in points for r in p.repeats]
    tokens = any(r.HasField("ttft") for r in results)
    accuracy = any(r.accuracy for r in results)
    header = ["selector", "scenario", "clients", "network profile", "state", "repeats", "valid", "samples/s",
              "p50 ms", "p99 ms"]
    header += ["TTFT p50 ms", "TPOT p50 ms", "tokens/s"] if tokens else []
    header += ["accuracy"] if accuracy else []
    placed = any(p.cpu_cores for p in points)
    header += ["SUT CPU cores"] if placed else []
    header += ["notes"]
    e = html.escape
    rows = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for point in points:
        aggregates = [r.aggregate for r in point.repeats]
        timed = [a for a in aggregates if _has_latency(a.latency)]
        valid = sum(a.valid for a in aggregates)
        validity = "VALID" if valid == len(aggregates) else f"INVALID ({valid}/{len(aggregates)} valid)"
        validity = validity if aggregates else "-"
        state = common_pb2.RunState.Name(point.state).removeprefix("RUN_STATE_")
        notes = _unique([reason for a in aggregates for reason in a.invalid_reasons] + [point.error])
        notes = [n for n in notes if n]
        text = [point.selector + (" (peak search)" if point.peak_probe else ""), point.series]
        cells = [f'<td class="text">{e(t)}</td>' for t in text] + [f"<td>{point.clients}</td>"]
        cells += [f'<td class="text">{e(t)}</td>' for t in (point.network_profile, state)]
        numbers = [str(len(point.repeats)), validity, _numbers([a.samples_per_second for a in aggregates], 1),
                   _numbers([_ms(a.latency.p50) for a in timed], 3), _numbers([_ms(a.latency.p99) for a in timed], 3)]
        if tokens:
            with_tokens = [a for a in aggregates if a.HasField("ttft")]
            numbers += [_numbers([_ms(a.ttft.p50) for a in with_tokens], 3),
                        _numbers([_ms(a.tpot.p50) for a in with_tokens], 3),
                        _numbers([a.tokens_per_second for a in with_tokens], 1)]
        if accuracy:
            scored = [a for a in aggregates if a.accuracy_scorer in a.accuracy]
            scorer = scored[0].accuracy_scorer if scored else ""
            numbers.append(f"{scorer} {_numbers([a.accuracy[scorer] for a in scored], 4)}" if scored else "-")
        if placed:
            numbers.append(f"{point.cpu_cores:g}" if point.cpu_cores else "-")
        cells += [f"<td>{e(n)}</td>" for n in numbers]
        cells.append(f'<td class="text{" bad" if notes else ""}">{e("; ".join(notes))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _peaks_table(peaks: Sequence[controller_pb2.PeakResult]) -> str:
    e = html.escape
    rows = ["<table><thead><tr><th>network profile</th><th>clients</th><th>peak QPS</th><th>latency at peak ms</th>"
            "<th>probes</th></tr></thead><tbody>"]
    for peak in peaks:
        rows.append(
            f'<tr><td class="text">{e(peak.network_profile)}</td><td>{peak.clients}</td><td>{peak.peak_qps:.1f}</td>'
            f"<td>{_ms(peak.latency_at_peak):.3f}</td><td>{len(peak.run_ids)}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)
